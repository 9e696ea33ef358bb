"""``search --space SPACE``: run a hyperparameter search (docs/search.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, add_set_flag, parser_for


def build_parser() -> ArgumentParser:
    """The ``search`` command's flags (docs/cli.md, "search")."""
    parser = parser_for("search", "Run a search: Optuna proposes configurations, Ray Tune trains them, ASHA stops "
                                  "weak ones early, MLflow records every trial, and the best config is exported.")
    parser.add_argument("--space", required=True, help="search space: a path, or a file name in ./search_spaces/ "
                                                       "or among the installed spaces (e.g. cifar10.yaml)")
    parser.add_argument("--num-samples", type=int, default=None, help="number of trials (search.num_samples)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="shrink train.epochs (the schedule scales with it)")
    parser.add_argument("--storage", default=None, help="folder, or s3://bucket/prefix, for results (search.storage)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (mlflow.tracking_uri)")
    parser.add_argument("--address", default=None, help="connect to an existing Ray cluster (e.g. auto, ray://host:10001)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    parser.add_argument("--retry-errored", action="store_true",
                        help="with --resume: run the trials that failed as infra again, from their last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="quiet: no Ray Tune status tables")
    parser.add_argument("--plan", action="store_true", help="forecast epochs, device-hours and wall time into "
                                                            "plan.json; no trial runs")
    parser.add_argument("--plan-device", default=None, help="with --plan: a device of this machine to time (cuda), "
                                                            "or NAME=STEPS_PER_S for one elsewhere (a100=14.5)")
    parser.add_argument("--plan-cluster", default=None, help="with --plan: the cluster's size, CPUS,GPUS (32,4)")
    add_set_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
    from tune_mtard.search.driver import SearchRequest, search

    return search(SearchRequest(space=args.space, num_samples=args.num_samples, max_epochs=args.max_epochs,
                                storage=args.storage, tracking_uri=args.tracking_uri, address=args.address,
                                resume=args.resume, retry_errored=args.retry_errored, quiet=args.no_progress,
                                overrides=args.overrides, plan=args.plan, plan_device=args.plan_device,
                                plan_cluster=args.plan_cluster))
