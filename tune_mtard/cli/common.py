"""What every command shares: argument parsing that fails in one line, and the exit-code contract.

Exit codes (docs/cli.md): 0 success; 2 bad input (config, flags, paths), one line on stderr, no
traceback, nothing started; 1 a failure while running; 130 (SIGINT) or 143 (SIGTERM) when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from tune_mtard.errors import ConfigError, Interrupted, RunFailed


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser_for(command: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=f"python -m tune_mtard.{command}", description=description)


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, value parsed as YAML); repeatable")


def progress_wanted(no_progress: bool) -> bool:
    """Progress bars only on a terminal, unless turned off."""
    return not no_progress and sys.stderr.isatty()


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a command's ``main`` and turn its errors into the exit-code contract."""
    try:
        code = main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except RunFailed as exc:  # a failure while running (divergence, ...), not a crash: one line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code)
