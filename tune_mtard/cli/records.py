"""``records sync --search DIR``: send a search's pending MLflow records once the tracking server is back
(docs/search.md, "Records")."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tune_mtard.cli.common import ArgumentParser, parser_for


def build_parser() -> ArgumentParser:
    """The ``records`` command's flags (docs/cli.md, "records")."""
    parser = parser_for("records", "Send the MLflow records a search journaled but could not send (the tracking "
                                   "server was down) and mark its summary.json records: complete.")
    parser.add_argument("action", choices=["sync"], help="sync: send the pending records")
    parser.add_argument("--search", required=True, help="the search's folder, <storage>/<name>")
    parser.add_argument("--tracking-uri", default=None,
                        help="the MLflow store of the search's runs (default: the one the search recorded to)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    # the library (mlflow) loads only after the flags parse: --help and bad flags answer at once
    from tune_mtard.search.journal import EXIT_RECORDS_PENDING, sync_search

    uri, left = sync_search(args.search, args.tracking_uri)
    if left:
        print(f"{left} records still pending: {uri} did not take them; run this again when it answers")
        return EXIT_RECORDS_PENDING
    print(f"records complete: every journaled record of {args.search} is in {uri}")
    return 0
