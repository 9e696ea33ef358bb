"""The commands (docs/cli.md): each module turns its flags into a typed request and makes one library call.

``tune-mtard <command> ...`` (the console script), ``python -m tune_mtard <command> ...`` and
``python -m tune_mtard.<command> ...`` all land in :func:`main`. No command imports another, and the
library never imports a command.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from tune_mtard.cli.common import run

COMMANDS = {
    "search": "run a hyperparameter search",
    "train": "one full training run from a run config",
    "teachers": "train the teachers a config names that do not exist yet",
    "export": "write the run config of a search's best (or a named) trial",
    "analyze": "rewrite a search's sensitivity analysis (importances, slice and contour plots)",
    "evaluate": "evaluate a saved model under attacks",
    "compare": "methods side by side, over seeds",
    "bench": "performance figures",
    "records": "send a search's pending MLflow records (records sync --search DIR)",
}


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``tune-mtard <command> [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: tune-mtard {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
            f"  {name:10s} {text}" for name, text in COMMANDS.items())
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"tune-mtard: error: {problem} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    command = importlib.import_module(f"tune_mtard.cli.{argv[0]}")
    run(command.main, argv[1:])


def run_command(name: str) -> NoReturn:
    """The ``python -m tune_mtard.<name>`` entry: the command with this process's flags."""
    main([name, *sys.argv[1:]])
