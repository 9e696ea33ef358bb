"""A search whose storage is an object store, ``search.storage: s3://bucket/prefix`` (docs/cluster.md,
"Object storage").

Ray Tune keeps the experiment there itself (``RunConfig(storage_path=..., storage_filesystem=...)``): its
state, every trial's results and checkpoints. The driver's own files of the search folder (``summary.json``,
``best_config.yaml``, ``trials.csv``, ``search_space.yaml``, ``budget.json``, the MLflow journal, ...) are the
bucket's too: the driver works on a copy of them in a folder of its machine (:func:`driver_folder`), which
:meth:`Mirror.pull` fills from the bucket under the driver's lock before anything reads it, and
:meth:`Mirror.push` sends back, while the search runs (every :data:`PUSH_EVERY_S`), before the trials start
and when the driver ends. What stays on the driver's machine (:data:`LOCAL_ONLY`): the lock and the Optuna
SQLite file of a search without ``search.optuna_storage``.

With a folder for ``search.storage`` the driver folder is that folder itself and a mirror does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tune_mtard import files
from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.search.lock import LOCK_FILE
from tune_mtard.search.storage_fs import Storage, check_options, is_uri, open_storage

# Never copied either way: the lock holds on the driver's machine only, and SQLite cannot live in a bucket.
LOCAL_ONLY = (LOCK_FILE, ".driver.lease", files.OPTUNA_DB, f"{files.OPTUNA_DB}-journal", f"{files.OPTUNA_DB}-wal",
              f"{files.OPTUNA_DB}-shm")
# Folders of the search folder that hold the driver's files (the rest are Ray's trial folders: results and
# checkpoints the driver reads through the filesystem, never copies).
DRIVER_FOLDERS = (files.RECORDS_ARTIFACTS,)
PUSH_EVERY_S = 15.0


def is_remote(cfg: Config) -> bool:
    assert cfg.search is not None
    return is_uri(cfg.search.storage)


def storage_of(cfg: Config) -> Storage:
    """``search.storage`` itself (the folder the search folders are in)."""
    assert cfg.search is not None
    return open_storage(cfg.search.storage, cfg.search.storage_options)


def experiment_storage(cfg: Config) -> Storage:
    """The search folder ``<storage>/<name>`` as a :class:`Storage`, wherever it is."""
    return storage_of(cfg).child(cfg.name)


def mirror_root() -> Path:
    """Where this machine keeps its copies of object-store search folders (``$XDG_CACHE_HOME`` or ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tune_mtard" / "storage"


def mirror_folder(uri: str) -> Path:
    """This machine's folder for the object-store folder ``uri`` (``s3://b/p/name`` -> ``<root>/s3/b/p/name``):
    one per search, so every driver of a search on this machine takes the same lock."""
    scheme, _, rest = uri.partition("://")
    parts = [part for part in rest.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise ConfigError("search.storage", f"{uri}: names no bucket")
    return mirror_root().joinpath(scheme, *parts)


def driver_folder(cfg: Config) -> Path:
    """The folder of the search's files on the driver's machine: the search folder itself, or its copy."""
    assert cfg.search is not None
    if not is_remote(cfg):
        return Path(cfg.search.storage) / cfg.name
    return mirror_folder(f"{cfg.search.storage.rstrip('/')}/{cfg.name}")


def ray_storage(cfg: Config) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Tune's ``RunConfig`` (the filesystem None for a folder)."""
    if not is_remote(cfg):
        return str(driver_folder(cfg).parent), None
    storage = storage_of(cfg)
    return storage.root, storage.fs


def ray_experiment(cfg: Config) -> tuple[str, Any]:
    """The search's Ray experiment as ``(path, filesystem)`` for ``Tuner.restore`` and ``ExperimentAnalysis``."""
    if not is_remote(cfg):
        return str(driver_folder(cfg)), None
    storage = experiment_storage(cfg)
    return storage.root, storage.fs


def check_storage_options(cfg: Config) -> None:
    """``search.storage_options``: pyarrow S3FileSystem's options by name and type, for ``s3://`` storage only,
    and no ``secret_key`` (the config is kept in ``search_space.yaml`` and on the MLflow parent run)."""
    assert cfg.search is not None
    options = cfg.search.storage_options
    check_options(cfg.search.storage, options)
    if "secret_key" in options:
        raise ConfigError("search.storage_options", "holds secret_key, which search_space.yaml and the MLflow "
                                                    "parent run would keep: give it in AWS_SECRET_ACCESS_KEY instead")


def check_store_reachable(cfg: Config, key: str = "search.storage") -> None:
    """Write and remove a probe object in the storage: a wrong endpoint, missing bucket or missing credential is
    one line (exit 2) before anything starts."""
    if not is_remote(cfg):
        return
    import secrets

    storage = storage_of(cfg)
    probe = f".tune_mtard-probe-{secrets.token_hex(4)}"
    try:
        storage.write_text(probe, "probe")
        storage.delete(probe)
    except OSError as exc:
        raise ConfigError(key, f"{storage.uri}: cannot write there ({str(exc).splitlines()[0]})") from None


def _driver_file(relative: str) -> bool:
    """Whether a path of the search folder is the driver's (copied) rather than Ray's trial data or local."""
    parts = relative.split("/")
    if parts[-1] in LOCAL_ONLY or parts[-1].endswith(".tmp"):
        return False
    if len(parts) == 1:
        return True
    # the seed confirmation's experiment: its state files, as the search folder's own
    return parts[0] in DRIVER_FOLDERS or (parts[0] == files.CONFIRM_FOLDER and len(parts) == 2)


class Mirror:
    """The driver's copy of a search folder in an object store; for a folder, every method does nothing."""

    def __init__(self, storage: Storage, folder: Path):
        self.storage = storage
        self.folder = folder
        self.active = not storage.is_local
        self._sent: dict[str, tuple[int, int]] = {}  # what the bucket holds as of the last pull or push
        self._lock = threading.Lock()  # the driver's thread and the pushing thread

    @classmethod
    def of(cls, cfg: Config) -> Mirror:
        return cls(experiment_storage(cfg), driver_folder(cfg))

    def _remote_files(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        if not self.storage.exists():
            return []
        root = self.storage.root.rstrip("/") + "/"
        infos = self.storage.fs.get_file_info(FileSelector(self.storage.root, recursive=True, allow_not_found=True))
        return [info.path[len(root):] for info in infos if info.type == FileType.File and info.path.startswith(root)]

    def _local_files(self) -> dict[str, tuple[int, int]]:
        found = {}
        for path in self.folder.rglob("*"):
            relative = path.relative_to(self.folder).as_posix()
            if path.is_file() and _driver_file(relative):
                info = path.stat()
                found[relative] = (info.st_size, info.st_mtime_ns)
        return found

    def pull(self) -> None:
        """Make the local copy the bucket's: its files replaced, local files it lacks removed (but the
        :data:`LOCAL_ONLY` ones)."""
        if not self.active:
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for relative in self._local_files():
            (self.folder / relative).unlink()
        for relative in self._remote_files():
            if _driver_file(relative):
                target = self.folder / relative
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                target.write_bytes(self.storage.read_bytes(relative))
        self._sent = self._local_files()

    def push(self) -> None:
        """Send what changed in the local copy since the last pull or push: new and changed files, removals."""
        if not self.active:
            return
        with self._lock:
            self._push()

    def _push(self) -> None:
        now = self._local_files()
        for relative, stamp in now.items():
            if self._sent.get(relative) != stamp:
                self.storage.write_bytes(relative, (self.folder / relative).read_bytes())
        for relative in set(self._sent) - set(now):
            self.storage.delete(relative)
        self._sent = now

    def forget(self, names: tuple[str, ...]) -> None:
        """Remove files a failed setup left, from the bucket too (a rerun of the name starts clean)."""
        if not self.active:
            return
        for name in names:
            self.storage.delete(name)
            self._sent.pop(name, None)
        shutil.rmtree(self.folder / files.RECORDS_ARTIFACTS, ignore_errors=True)


_ACTIVE: dict[str, Mirror] = {}  # the mirror of each search this driver process runs, by its folder


@contextlib.contextmanager
def registered(mirror: Mirror) -> Iterator[Mirror]:
    """The block's search has ``mirror`` (found by :func:`mirror_of`): a thread pushes it every
    :data:`PUSH_EVERY_S` while the block runs, and it is pushed once more when the block ends, however it ends."""
    key = str(mirror.folder)
    _ACTIVE[key] = mirror
    done = threading.Event()

    def keep_pushing() -> None:
        while not done.wait(PUSH_EVERY_S):
            try:
                mirror.push()
            except OSError:  # the store is briefly away: the next push sends it
                pass

    thread = threading.Thread(target=keep_pushing, name="tune_mtard-push", daemon=True)
    if mirror.active:
        thread.start()
    try:
        yield mirror
    finally:
        done.set()
        if thread.is_alive():
            thread.join(timeout=60)
        try:
            mirror.push()
        finally:
            _ACTIVE.pop(key, None)


def mirror_of(folder: str | Path) -> Mirror:
    """The registered mirror of the search in ``folder``; one that does nothing where none is."""
    found = _ACTIVE.get(str(folder))
    if found is not None:
        return found
    import pyarrow.fs as pafs

    return Mirror(Storage(pafs.LocalFileSystem(), str(folder), str(folder)), Path(folder))


LEASE = ".driver.lease"  # the object-store side of the one-driver lock (docs/cluster.md, "Object storage")
LEASE_S = 30.0  # a lease not renewed for this long is a lost driver's
RENEW_S = 10.0
SETTLE_S = 2.0  # how long a new holder waits before reading its lease back (two drivers starting at once)


def _lease_holder(storage: Storage) -> dict[str, Any] | None:
    """The live lease in the search folder (None: none, or a lost driver's)."""
    import json
    import socket

    try:
        lease = json.loads(storage.read_text(LEASE))
    except (FileNotFoundError, ValueError):
        return None
    if time.time() - float(lease.get("renewed", 0)) > LEASE_S:
        return None
    if lease.get("host") == socket.gethostname():  # a driver of this machine: alive only while its process is
        try:
            os.kill(int(lease.get("pid", 0)), 0)
        except (ProcessLookupError, ValueError):
            return None
        except PermissionError:
            pass
    return lease


def refuse_if_leased(cfg: Config, flag: str) -> None:
    """ConfigError naming ``flag`` while a driver, on any machine, holds the search's lease in the bucket."""
    if not is_remote(cfg):
        return
    lease = _lease_holder(experiment_storage(cfg))
    if lease is not None:
        raise ConfigError(flag, f"the search {cfg.name!r} is being run by process {lease.get('pid')} on "
                                f"{lease.get('host')} (its lease in {cfg.search.storage} was renewed "
                                f"{time.time() - float(lease['renewed']):.0f} s ago); wait for it to end (or stop it) "
                                "first")


@contextlib.contextmanager
def bucket_lease(cfg: Config, flag: str) -> Iterator[None]:
    """Hold the search's lease in the bucket for the block: written, read back after :data:`SETTLE_S` (the
    last of two drivers writing at once keeps it, the other is refused), renewed every :data:`RENEW_S` by a
    thread, removed at the end. A driver that dies leaves it to expire after :data:`LEASE_S` (at once for
    a driver of this machine whose process is gone). Nothing for a folder: its ``flock`` is enough."""
    if not is_remote(cfg):
        yield
        return
    import json
    import secrets
    import socket

    storage = experiment_storage(cfg)
    refuse_if_leased(cfg, flag)
    token = secrets.token_hex(8)

    def write() -> None:
        storage.write_text(LEASE, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                                              "renewed": time.time()}))

    def ours() -> bool:
        try:
            return json.loads(storage.read_text(LEASE)).get("token") == token
        except (FileNotFoundError, ValueError):
            return False

    write()
    time.sleep(SETTLE_S)
    if not ours():
        refuse_if_leased(cfg, flag)
        raise ConfigError(flag, f"the search {cfg.name!r} was started by another driver at the same time")
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_S):
            try:
                write()
            except OSError:  # the store is briefly away: the next renewal tries again
                pass

    thread = threading.Thread(target=renew, name="tune_mtard-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=RENEW_S)
        if ours():
            storage.delete(LEASE)
