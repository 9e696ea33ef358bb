"""``compare --config FILE --methods LIST [--tune N]``: methods side by side, over seeds, each at the same
hand-set hyperparameters or, with ``--tune``, at its own searched best (docs/methods.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, add_set_flag, parser_for
from tune_mtard.methods import variants
from tune_mtard.workflows.compare import CompareRequest, compare
from tune_mtard.workflows.tuned_compare import compare_tuned


def build_parser() -> ArgumentParser:
    """The ``compare`` command's flags (docs/cli.md, "compare")."""
    parser = parser_for("compare", "Run B-MTARD, its ablations and the baseline methods with the same loop, data and "
                                   "evaluation over seeds, and print a markdown table.")
    parser.add_argument("--config", required=True, help="run config or search space file (the base config)")
    parser.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(variants())}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--attacks", default=None,
                        help="test attacks, comma-separated from clean,fgsm,pgd20,cw,aa,square "
                             "(default: eval.final_attacks)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<name>-compare)")
    add_set_flag(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: mlflow.tracking_uri)")
    parser.add_argument("--tune", type=int, default=None, metavar="N",
                        help="first search each method's own space with N trials (equal budget per method), then "
                             "train each method's best config on the seeds (default output: runs/<name>-compare-tuned)")
    parser.add_argument("--tune-epochs", type=int, default=None, metavar="E",
                        help="epochs of each search's trials, ASHA's max_t (default: train.epochs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted tuned comparison in --out, without redoing finished searches")
    parser.add_argument("--plan", action="store_true",
                        help="with --tune: forecast each search's and the seed runs' cost into plan.json; nothing runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    run = compare if args.tune is None else compare_tuned
    return run(CompareRequest(config=args.config, methods=args.methods, seeds=args.seeds, attacks=args.attacks,
                                  out=args.out, overrides=args.overrides, tracking_uri=args.tracking_uri,
                                  tune=args.tune, tune_epochs=args.tune_epochs, resume=args.resume,
                                  plan=args.plan))
