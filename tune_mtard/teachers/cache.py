"""The teacher cache's file handling: content hashes, one writer per file, atomic writes, quality records.

Two processes that need the same ``auto`` teacher (two searches, a search and a ``train``) take the same
lock: the first trains and writes it, the second waits and then loads it. Files are written under a
unique temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tune_mtard import atomic

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path.lock`` (created if needed) for the duration; waits for another holder."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file in the same folder."""
    atomic.write_bytes(path, data)


def quality_record_path(cache_dir: str | Path, sha256: str, settings: dict[str, Any]) -> Path:
    """Where a teacher file's measured quality is kept, keyed by its content and how it was measured."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / "quality" / f"{sha256[:16]}-{digest}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, record: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
