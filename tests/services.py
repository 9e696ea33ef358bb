"""Real services the tests start themselves on free loopback ports and stop after: a PostgreSQL server
(initdb + pg_ctl from Debian's packages, as a throwaway non-root user) and an ``mlflow server`` with
proxied artifacts, and optuna-dashboard on a study. Nothing here reaches the network."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

PG_USER = "tune_mtard_pg"  # initdb and pg_ctl refuse to run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of Debian's initdb and pg_ctl (the newest installed), or None where they are absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    return ["runuser", "-u", PG_USER, "--", *cmd]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder on a free loopback port; yields its SQLAlchemy URL (no
    password: trust authentication on loopback)."""
    bindir = postgres_bin()
    assert bindir is not None
    # Not under pytest's tmp_path: its root folder is private to root, and the server runs as PG_USER.
    top = Path(tempfile.mkdtemp(prefix="tune-mtard-pg-"))
    data, sockets = top / "data", top / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        _as_postgres_user([])  # creates the user
        user = pwd.getpwnam(PG_USER)
        for path in (top, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = free_port()
    log = top / "server.log"
    try:
        subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                          "--no-sync"]), check=True, capture_output=True, timeout=120)
        subprocess.run(_as_postgres_user([
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"]),
            check=True, capture_output=True, timeout=120)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                              "stop"]), capture_output=True, timeout=120)
        shutil.rmtree(top, ignore_errors=True)


def stop_group(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the process group the test started (by its PID), SIGKILL if it has not ended in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url} in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def optuna_dashboard(storage: str, folder: Path) -> Iterator[str]:
    """``optuna-dashboard STORAGE`` (the client users open on a study) on a free loopback port; yields its URL."""
    port = free_port()
    log = folder / "optuna-dashboard.log"
    cmd = [str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/api/studies", process, log)
        yield url
    finally:
        stop_group(process, timeout_s=30)


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` with a SQLite backend store and proxied artifacts in ``folder / "artifacts"`` (a
    folder the client never writes to itself); yields its http URI and that folder. Started again on the same
    ``folder`` and ``port``, it is the same server after an outage."""
    port = port or free_port()
    artifacts = folder / "artifacts"
    log = folder / f"mlflow-server-{time.time_ns()}.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(artifacts),
           "--workers", "1"]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", process, log)
        yield uri, artifacts
    finally:
        stop_group(process, timeout_s=30)


@contextlib.contextmanager
def ray_cluster_with_blind_worker(storage: Path) -> Iterator[str]:
    """A two-node Ray cluster of real raylets (``ray start``): the head, and a worker in its own mount namespace
    with an empty tmpfs over ``storage`` (it cannot see what the driver writes there). Needs root for
    ``unshare -m``. Yields the head's address; both nodes are stopped after (only these processes)."""
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rt"))  # short: Ray's socket paths must fit in 107 characters
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    processes: list[subprocess.Popen] = []
    env = ray_env()
    try:
        head_log = (temp / "head.log").open("w")
        processes.append(subprocess.Popen([ray, "start", "--head", "--port", str(port), "--include-dashboard",
                                           "false", "--temp-dir", str(temp), *common], stdout=head_log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_started(temp / "head.log", processes[-1])
        worker_log = (temp / "worker.log").open("w")
        blind = (f"mount -t tmpfs tmpfs {storage} && exec {ray} start --address 127.0.0.1:{port} "
                 f"--temp-dir {temp} {' '.join(common)}")
        processes.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", blind],
                                          stdout=worker_log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        _wait_started(temp / "worker.log", processes[-1])
        yield f"127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            stop_group(process, timeout_s=60)
        shutil.rmtree(temp, ignore_errors=True)


def ray_env() -> dict[str, str]:
    """The environment of a process of (or joining) a cluster that ``ray start`` made: Ray 2.60 clusters
    authenticate with the token in ``~/.ray/auth_token``; no address of another cluster."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}


def _wait_started(log: Path, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text():
            return
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not start in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[str]:
    """moto's S3-compatible server (``moto_server``) on a free loopback port, its state in memory; yields its
    endpoint URL. Any access key is accepted."""
    port = free_port()
    log = folder / "moto-server.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                    str(port)], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_http(f"{endpoint}/moto-api/", process, log)
        yield endpoint
    finally:
        stop_group(process, timeout_s=30)
