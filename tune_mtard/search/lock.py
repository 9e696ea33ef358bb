"""One driver per search: an exclusive lock in the search's folder, held for the driver's whole life.

A second driver on the same name, or a ``--resume`` of a search that is still running, finds the lock
held and stops with exit code 2 naming the process that holds it. The lock is released when the process
ends, however it ends (the operating system drops ``flock`` locks of a dead process); the lock file
``.driver.lock`` itself stays in the folder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from tune_mtard.errors import ConfigError

LOCK_FILE = ".driver.lock"


def holder(folder: Path) -> str | None:
    """Who holds the search's lock right now (None if nobody does); looks without taking it or writing anything."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def refuse_if_running(folder: Path, flag: str) -> None:
    running = holder(folder)
    if running is not None:
        raise ConfigError(flag, f"the search {folder.name!r} is being run by {running}; wait for it to end "
                                "(or stop it) first")


class SearchLock:
    """``with SearchLock(folder, flag):`` holds the lock; ConfigError (exit 2, naming ``flag``) when it is taken."""

    def __init__(self, folder: Path, flag: str = "name"):
        self.folder = folder
        self.flag = flag
        self.path = folder / LOCK_FILE
        self.created_folder = False
        self._handle = None

    def __enter__(self) -> SearchLock:
        self.created_folder = not self.folder.exists()
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        # Private to its user: --resume unpickles Ray's state from here (docs/search.md, "Trust boundary").
        self.folder.mkdir(mode=0o700, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            refuse_if_running(self.folder, self.flag)
            raise ConfigError(self.flag, f"the search {self.folder.name!r} is being run by another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:  # the file stays: removing it would let a waiting opener lock a stale inode
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
