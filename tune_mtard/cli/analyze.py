"""``analyze --experiment DIR``: the sensitivity analysis of a finished or interrupted search, rewritten
(docs/sensitivity.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, parser_for
from tune_mtard.files import SENSITIVITY_MD


def build_parser() -> ArgumentParser:
    """The ``analyze`` command's flags (docs/cli.md, "analyze")."""
    parser = parser_for("analyze", "Rewrite the sensitivity analysis of a finished or interrupted search (parameter "
                                   f"importances, slice and contour plots, {SENSITIVITY_MD}) and log it to the "
                                   "search's MLflow parent run.")
    parser.add_argument("--experiment", required=True, help="the search's folder, <storage>/<name>")
    parser.add_argument("--tracking-uri", default=None,
                        help="the MLflow store holding the search's runs (default: the one the search recorded to)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # An unreachable tracking server is reported in a line, not retried for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
    from tune_mtard.search.analyze import AnalyzeRequest, analyze_experiment

    done = analyze_experiment(AnalyzeRequest(experiment=args.experiment, tracking_uri=args.tracking_uri))
    report = done.report
    print(f"search {report.search}: {report.selection()}")
    if report.importances:
        for i, (key, share) in enumerate(report.importances.items(), 1):
            print(f"  {i}. {key:<24s} {share:.3f}   best region: {report.regions[key]}")
    else:
        print(report.note)
    print(f"wrote {done.folder / SENSITIVITY_MD} and {len(report.files) - 1} plots")
    if done.run_id is not None:
        print(f"logged to the MLflow parent run {done.run_id}")
    else:
        print(f"not logged to MLflow ({done.not_logged}); the files are in the folder")
    return 0
