"""``export --experiment DIR``: the run config of a search's best (or a named) trial (docs/search.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, parser_for
from tune_mtard.files import BEST_CONFIG


def build_parser() -> ArgumentParser:
    """The ``export`` command's flags (docs/cli.md, "export")."""
    parser = parser_for("export", "Write a complete run config for the best (or the named) trial of a finished "
                                  "or interrupted search.")
    parser.add_argument("--experiment", required=True, help="the search's folder, <storage>/<name> (a folder or s3://bucket/prefix/name)")
    parser.add_argument("--trial", default=None, help="a trial id (default: the best, or the seed-confirmed, trial)")
    parser.add_argument("--pareto", action="store_true", help="print the search's Pareto front instead")
    parser.add_argument("--clean-weight", type=float, default=None, metavar="W",
                        help="the front point maximising W * clean + (1 - W) * robust validation accuracy")
    parser.add_argument("--out", default=None, help=f"output file (default: DIR/{BEST_CONFIG}, or DIR/trial_<ID>.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
    from tune_mtard.search.export import ExportRequest, export_trial

    exported = export_trial(ExportRequest(experiment=args.experiment, trial=args.trial, out=args.out,
                                          pareto=args.pareto, clean_weight=args.clean_weight))
    if args.pareto:
        print(exported.front_table)
        return 0
    t = exported.trial
    print(f"trial {t.trial_id}: {exported.metric} {t.metric(exported.metric):.4f} after "
          f"{t.epochs}/{exported.full_epochs} epochs")
    print(f"wrote {exported.location or exported.path}")
    return 0
