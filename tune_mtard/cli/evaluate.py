"""``evaluate --config FILE --checkpoint FILE --attacks LIST``: a saved model under attack (docs/evaluation.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, add_set_flag, parser_for, progress_wanted
from tune_mtard.workflows.evaluate import DEFAULT_SQUARE_QUERIES, SPLITS, EvaluateRequest, evaluate


def build_parser() -> ArgumentParser:
    """The ``evaluate`` command's flags (docs/cli.md, "evaluate")."""
    parser = parser_for("evaluate", "Evaluate a saved model on the first N examples of a split under each attack; "
                                    "print a table and write JSON.")
    parser.add_argument("--config", required=True, help="run config (dataset, arch, attack.epsilon, eval.*)")
    parser.add_argument("--checkpoint", required=True,
                        help="weights of the model to evaluate (e.g. runs/NAME/student.pt)")
    parser.add_argument("--attacks", required=True,
                        help="comma-separated, from clean,fgsm,pgd20,cw,aa,square (and transfer_pgd20,transfer_cw "
                             "with --source-checkpoint); clean is always included")
    parser.add_argument("--n", type=int, default=None, help="evaluate the first N examples of the split (default: all)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate (default: test)")
    parser.add_argument("--out", default=None,
                        help="JSON file (default: eval_<split>.json next to the checkpoint; <name>.eval_<split>.json "
                             "for a checkpoint not called student.pt)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: eval.batch_size)")
    parser.add_argument("--arch", default=None, help="architecture of the checkpoint (default: student.arch)")
    parser.add_argument("--source-checkpoint", default=None,
                        help="black-box transfer: craft transfer_pgd20 / transfer_cw examples on this model")
    parser.add_argument("--source-arch", default=None,
                        help="architecture of --source-checkpoint (default: teachers.robust.arch)")
    parser.add_argument("--square-queries", type=int, default=DEFAULT_SQUARE_QUERIES,
                        help=f"query budget of the square attack (default: {DEFAULT_SQUARE_QUERIES})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    return evaluate(EvaluateRequest(
        config=args.config, checkpoint=args.checkpoint, attacks=args.attacks, n=args.n, split=args.split,
        out=args.out, batch_size=args.batch_size, arch=args.arch, source_checkpoint=args.source_checkpoint,
        source_arch=args.source_arch, square_queries=args.square_queries,
        progress=progress_wanted(args.no_progress), overrides=args.overrides))
