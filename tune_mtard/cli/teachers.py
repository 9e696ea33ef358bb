"""``teachers --config FILE``: train the teachers a config names that do not exist yet (docs/methods.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, add_set_flag, parser_for, progress_wanted


def build_parser() -> ArgumentParser:
    """The ``teachers`` command's flags (docs/cli.md, "teachers")."""
    parser = parser_for("teachers", "Train the teachers a config names that do not exist yet, save them where the "
                                    "config says and print their clean and PGD accuracy on the test split.")
    parser.add_argument("--config", required=True, help="run config or search space file")
    add_set_flag(parser)
    parser.add_argument("--roles", default="clean,robust", help="which teachers (default: clean,robust)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
    from tune_mtard.workflows.teachers import TeachersRequest, train_missing

    reports = train_missing(TeachersRequest(config=args.config, roles=args.roles, overrides=args.overrides,
                                            progress=progress_wanted(args.no_progress)))
    for r in reports:
        print(f"{r.role:6s} {r.arch:18s} {r.status:7s} clean {r.clean_acc:.4f}  PGD-{r.pgd_steps} {r.pgd_acc:.4f}  "
              f"(test, n={r.n}, eps={r.epsilon:.4g})  {r.path}", flush=True)
        print(f"       val clean {r.val_clean_acc:.4f}  PGD-{r.pgd_steps} {r.val_pgd_acc:.4f}  "
              f"loaded with: {r.mapping}",
              flush=True)
    return 0
