"""Ray for the duration of a command: the one this process already runs, else one started here and shut down
at the end (docs/search.md, "Running on a GPU and on a Ray cluster")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ray_session(address: str | None = None, *, log_to_driver: bool = False, needed: bool = True) -> Iterator[bool]:
    """Ray while the block runs; yields whether it was started here (then it is shut down after the block).

    ``address`` None starts a local Ray of our own, whatever address file a past ``ray start`` left behind;
    ``needed`` False starts nothing (e.g. every search of a resumed comparison ended before).
    """
    import ray  # the search stack: only a command that runs trials loads it

    started = needed and not ray.is_initialized()
    if started:
        ray.init(address=address or "local", include_dashboard=False, logging_level="warning",
                 log_to_driver=log_to_driver, configure_logging=True)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
