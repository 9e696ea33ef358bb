"""Files written whole or not at all (docs/search.md, "Files"): the one way the product writes a file it reads later.

Each file goes to a temporary name in its own folder, is flushed and fsynced, then renamed over the
target (a rename within a folder is atomic on POSIX), and the folder is fsynced so the rename survives a
power loss. A reader sees the old file or the new one, never a torn one; a writer killed midway leaves
at most a hidden ``.<name>.*.partial`` file, never a half-written target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(_UMASK)


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """``with open_atomic(path) as f:`` writes ``f`` to ``path`` when the block ends normally, and
    leaves ``path`` untouched when it raises. ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(partial, 0o666 & ~_UMASK)  # mkstemp makes it 0600; the target gets a usual file's mode
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_text(path: str | Path, text: str) -> None:
    with open_atomic(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is done all the same
        pass
    finally:
        os.close(fd)
