"""The services a command depends on, checked before anything starts (docs/search.md, "Before anything starts").

An MLflow tracking server that is down, a store or search folder that cannot be written, an Optuna
database that cannot be opened: each is one line naming the setting and exit 2 within seconds, before a
teacher is trained, Ray starts or a file is written. Only the standard library is used here (urllib,
sqlite3), so a command that refuses its input never pays for importing MLflow or Optuna.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tune_mtard import files
from tune_mtard.errors import ConfigError

TIMEOUT_S = 5.0  # per request; a server that answers nothing in this long is not one to start a search on
_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


# scheme://user:password@ -- the password part, wherever such a URI appears in a text
_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@")


def masked_uri(uri: str) -> str:
    """``uri`` with any password (or token) in it replaced by ``***``: what is printed, logged or stored."""
    return mask_secrets(uri)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by ``***``."""
    return _CREDENTIALS.sub(r"\1***@", text)


def _request(uri: str) -> urllib.request.Request:
    """The probe request, with the credentials MLflow itself would send (from the URI or its environment)."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    url = urllib.parse.urlunsplit(parts._replace(netloc=host)).rstrip("/") + _PROBE
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    user = parts.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = parts.password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user is not None and password is not None:
        secret = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode())
        request.add_header("Authorization", "Basic " + secret.decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":  # as MLflow's own client
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tracking_server_problem(uri: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """Why the MLflow tracking server at the http(s) ``uri`` cannot take records (None: it answers)."""
    shown = masked_uri(uri)
    try:
        with urllib.request.urlopen(_request(uri), timeout=timeout_s, context=_tls_context()) as response:
            json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return (f"{shown} refused the request (HTTP {exc.code}): check the credentials "
                    "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)")
        return f"{shown} answered HTTP {exc.code} to an MLflow request: is it an MLflow tracking server?"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"no MLflow tracking server answers at {shown} ({reason})"
    except ValueError:
        return f"{shown} answered, but not in JSON: is it an MLflow tracking server?"
    return None


def unwritable_folder(folder: str | Path) -> str | None:
    """Why files cannot be created in ``folder`` or the folders it would be made in (None: they can).

    The nearest folder that exists must be a folder this user can create a file in (tried with an empty
    temporary file, removed at once: permissions alone miss read-only mounts and root).
    """
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
    except OSError as exc:
        return f"{existing} is not writable ({exc.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None


def check_tracking_uri(uri: str, key: str) -> None:
    """The MLflow store at ``uri`` can take records: a server that answers, or a local store in a writable folder."""
    if uri.startswith(("http://", "https://")):
        problem = tracking_server_problem(uri)
    elif uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        problem = _unusable_sqlite(database) or unwritable_folder(database.parent)
    elif uri.startswith("file://") or "://" not in uri:
        problem = unwritable_folder(urllib.parse.urlsplit(uri).path if uri.startswith("file://") else uri)
    else:
        problem = None  # databricks, postgresql, ...: MLflow's own client reports on those
    if problem is not None:
        raise ConfigError(key, problem)


def _unusable_sqlite(database: Path) -> str | None:
    """Why an existing SQLite file cannot be read as a database (None: absent, or it opens)."""
    if not database.exists():
        return None
    if not os.access(database, os.R_OK | os.W_OK):
        return f"{database} is not readable and writable by this user"
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=TIMEOUT_S)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        return f"{database} cannot be opened as an SQLite database ({exc})"
    return None


def check_search_folder(folder: Path, key: str = "search.storage") -> None:
    """The search folder can be written, and its Optuna database (if the search ran before) opens."""
    problem = unwritable_folder(folder)
    if problem is not None:
        raise ConfigError(key, problem)
    problem = _unusable_sqlite(folder / files.OPTUNA_DB)
    if problem is not None:
        raise ConfigError(str(folder / files.OPTUNA_DB), problem)


def check_private(folder: Path, key: str = "--resume") -> None:
    """A search folder ``--resume`` unpickles from (Ray's ``tuner.pkl`` and its state) must be this user's
    alone: one that another user can write could hold a planted pickle (docs/search.md, "Trust boundary")."""
    for path in (folder, folder / files.TUNER_STATE):
        if not path.exists():
            continue
        info = path.stat()
        if info.st_uid != os.getuid():
            raise ConfigError(key, f"{path} belongs to another user (uid {info.st_uid}); resume only your own search")
        if info.st_mode & 0o022:
            raise ConfigError(key, f"{path} can be written by other users (mode {info.st_mode & 0o777:o}); "
                                   f"make it private (chmod go-w) before resuming, since resuming unpickles it")
