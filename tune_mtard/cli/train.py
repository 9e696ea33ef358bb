"""``train --config FILE``: one full training run (docs/cli.md, "train")."""

from __future__ import annotations

from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, add_set_flag, parser_for, progress_wanted


def build_parser() -> ArgumentParser:
    """The ``train`` command's flags (docs/cli.md, "train")."""
    parser = parser_for("train", "One full training run from a run config; writes metrics.json, student.pt, "
                                 "balance_trace.csv and config.yaml and logs one MLflow run.")
    parser.add_argument("--config", required=True,
                        help="run config (e.g. an exported best_config.yaml) or search space file")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
    add_set_flag(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: mlflow.tracking_uri)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="register the final student in the MLflow Model Registry as NAME (pt2 format)")
    parser.add_argument("--address", default=None,
                        help="with train.workers > 1: the Ray cluster its workers run on (default: a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
    from tune_mtard.workflows.train import TrainRequest, train

    train(TrainRequest(config=args.config, out=args.out, overrides=args.overrides, tracking_uri=args.tracking_uri,
                       resume=args.resume, progress=progress_wanted(args.no_progress), register=args.register,
                       address=args.address))
    return 0
