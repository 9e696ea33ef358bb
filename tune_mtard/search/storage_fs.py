"""The search's storage as one filesystem (docs/cluster.md, "Every node is checked first"): a folder, or any
URI pyarrow's filesystems understand (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).

Ray Tune already moves its checkpoints through ``pyarrow.fs``; the files tune_mtard itself reads and writes
in the storage go through the same kind of filesystem here, never through a local ``Path`` of a remote
location. An S3-compatible server is reached through the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or through ``options``: keyword arguments of
``pyarrow.fs.S3FileSystem`` (:data:`S3_OPTIONS`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_mtard.errors import ConfigError

# The options of an S3-compatible server, with their types (pyarrow.fs.S3FileSystem's keyword arguments).
S3_OPTIONS: dict[str, type] = {
    "endpoint_override": str, "region": str, "scheme": str, "access_key": str, "secret_key": str,
    "force_virtual_addressing": bool, "connect_timeout": float, "request_timeout": float,
}


def is_uri(storage: str) -> bool:
    """Whether ``storage`` names a filesystem by URI (``s3://...``) rather than a folder."""
    return "://" in storage


def check_options(storage: str, options: Mapping[str, Any], key: str = "search.storage_options") -> None:
    """ConfigError naming ``key`` for an option pyarrow's S3 filesystem does not take, or of the wrong type."""
    if options and not storage.startswith("s3://"):
        raise ConfigError(key, f"applies to s3:// storage only, not {storage}")
    for name, value in options.items():
        if name not in S3_OPTIONS:
            raise ConfigError(key, f"unknown option {name!r}; known: {', '.join(S3_OPTIONS)}")
        wanted = S3_OPTIONS[name]
        numbers = (int, float) if wanted is float else wanted  # a YAML 30 is a float's 30.0
        if isinstance(value, bool) is not (wanted is bool) or not isinstance(value, numbers):
            raise ConfigError(key, f"{name} must be a {wanted.__name__}, not {value!r}")


@dataclass(frozen=True)
class Storage:
    """A folder on a ``pyarrow.fs`` filesystem; paths below it are relative, with ``/`` between parts."""

    fs: Any  # pyarrow.fs.FileSystem
    root: str  # the folder's path on ``fs``
    uri: str  # what the user named it by (for messages)

    def path(self, relative: str = "") -> str:
        return f"{self.root.rstrip('/')}/{relative}" if relative else self.root

    def child(self, relative: str) -> Storage:
        return Storage(self.fs, self.path(relative), f"{self.uri.rstrip('/')}/{relative}")

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    def exists(self, relative: str = "") -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.path(relative)).type != FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode()

    @contextlib.contextmanager
    def local_file(self, relative: str) -> Iterator[Path]:
        """The file as a local path, for a reader that takes one: itself in a folder, else a temporary copy
        (removed after)."""
        if self.is_local:
            yield Path(self.path(relative))
            return
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / relative.rsplit("/", 1)[-1]
            copy.write_bytes(self.read_bytes(relative))
            yield copy

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Whole or not at all: an object store's upload appears only once it is complete; in a folder, a
        temporary file is renamed over the target."""
        from pyarrow.fs import FileType

        target = self.path(relative)
        parent = target.rsplit("/", 1)[0]
        if not self.is_local:
            with self.fs.open_output_stream(target) as stream:
                stream.write(data)
            return
        self.fs.create_dir(parent, recursive=True)
        temporary = f"{parent}/.{target.rsplit('/', 1)[1]}.{secrets.token_hex(4)}.tmp"
        try:
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, target)
        finally:
            if self.fs.get_file_info(temporary).type != FileType.NotFound:  # the write failed
                self.fs.delete_file(temporary)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def list(self, relative: str = "") -> list[str]:
        """The names directly in a folder, sorted; [] where it does not exist."""
        from pyarrow.fs import FileSelector

        infos = self.fs.get_file_info(FileSelector(self.path(relative), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def delete(self, relative: str) -> None:
        """Remove a file; nothing to do where it is already gone."""
        if self.exists(relative):
            self.fs.delete_file(self.path(relative))

    def delete_dir(self, relative: str = "") -> None:
        if self.exists(relative):
            self.fs.delete_dir(self.path(relative))


def folder_on(fs: Any, path: str) -> Storage:
    """A folder Ray Tune names by its filesystem and path there (``trial.storage.storage_filesystem`` and
    ``trial.path``, ``Result.filesystem`` and ``Result.path``)."""
    return Storage(fs, path.rstrip("/"), path)


def open_storage(storage: str, options: Mapping[str, Any] | None = None, key: str = "search.storage") -> Storage:
    """The filesystem and folder ``storage`` names; ConfigError naming ``key`` when pyarrow knows no filesystem
    for it (a folder is made absolute against the working folder)."""
    import pyarrow.fs as pafs  # the search stack: only a search loads it

    options = dict(options or {})
    check_options(storage, options)
    if not is_uri(storage):
        return Storage(pafs.LocalFileSystem(), os.path.abspath(storage), storage)
    try:
        if options:
            fs, root = pafs.S3FileSystem(**options), storage.removeprefix("s3://")
        else:
            fs, root = pafs.FileSystem.from_uri(storage)
    except (ValueError, OSError, TypeError) as exc:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise ConfigError(key, f"{storage}: no filesystem for it ({str(exc).splitlines()[0]})") from None
    return Storage(fs, root.rstrip("/"), storage)
