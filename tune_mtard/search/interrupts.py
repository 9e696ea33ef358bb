"""SIGINT and SIGTERM during a search: stop the trials, keep the search resumable, and say it was interrupted.

Ray Tune catches SIGINT inside ``Tuner.fit`` and returns as if the search had finished (every trial
TERMINATED, no error), and ``ray.init`` turns SIGTERM into ``SystemExit``. So while ``fit`` runs, our own
handler takes both: it notes the signal and asks Tune for its graceful stop (trials stopped, the
experiment saved with them unfinished, so ``--resume`` continues them); after ``fit`` the driver sees the
note and ends the search as ``interrupted`` (docs/search.md, "Outcomes"). A second signal stops at once.
This lives in an importable module: Ray pickles what the driver's callbacks reference.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from tune_mtard.errors import Interrupted
from tune_mtard.search import compat

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []


def received() -> str | None:
    """The signal that interrupted the last watched ``fit`` ("SIGINT" or "SIGTERM"), or None."""
    return NAMES[_received[0]] if _received else None


def _on_signal(signum: int, frame) -> None:
    if _received:  # a second Ctrl+C or SIGTERM: stop now
        raise KeyboardInterrupt
    _received.append(signum)
    compat.request_tune_stop()


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """Our handler for SIGINT and SIGTERM for the duration (install it after ``ray.init``, which sets its own)."""
    _received.clear()
    previous = {s: signal.getsignal(s) for s in NAMES}
    previous_env = os.environ.get(compat.TUNE_SIGINT_ENV)
    os.environ[compat.TUNE_SIGINT_ENV] = "1"  # Tune keeps our SIGINT handler instead of installing its own
    for s in NAMES:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if previous_env is None:
            os.environ.pop(compat.TUNE_SIGINT_ENV, None)
        else:
            os.environ[compat.TUNE_SIGINT_ENV] = previous_env


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Before ``fit``: SIGTERM raises :class:`~tune_mtard.errors.Interrupted`, so records are closed as KILLED."""
    def raise_interrupted(signum: int, frame) -> None:
        raise Interrupted("SIGTERM")

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
