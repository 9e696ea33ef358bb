"""The world around a search (docs/search.md, "Before anything starts"): services are checked before
anything starts, files are written whole or not at all, paths and secrets stay where they belong."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from searchkit import child_env

from tune_mtard.errors import ConfigError
from tune_mtard.services import check_search_folder, check_tracking_uri, masked_uri, tracking_server_problem

REFUSING = "http://127.0.0.1:9"  # the discard port: nothing listens there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tune_mtard.{module}", *args], env=child_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def digits_flags(tmp_path: Path) -> list[str]:
    """The shipped digits space with its teachers cached in ``tmp_path/teachers`` (nothing there yet)."""
    return ["--set", f"teachers.cache_dir={tmp_path / 'teachers'}", "--set", "device=cpu"]


@pytest.mark.parametrize("flags", [["--tracking-uri", REFUSING], ["--set", f"mlflow.tracking_uri={REFUSING}"]])
def test_a_search_with_an_unreachable_tracking_server_is_exit_2_before_a_teacher_trains(tmp_path, flags):
    start = time.monotonic()
    result = command("search", "--space", "digits.yaml", "--storage", str(tmp_path / "results"), *flags,
                     *digits_flags(tmp_path), cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert line.startswith("error: ")
    assert ("--tracking-uri" if flags[0] == "--tracking-uri" else "mlflow.tracking_uri") in line
    assert "127.0.0.1:9" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "teachers").exists()
    assert "training" not in result.stdout
    print(f"refused in {elapsed:.1f} s")


def test_train_and_compare_check_the_tracking_server_before_they_start(tmp_path):
    for module, extra in (("train", ["--out", str(tmp_path / "run")]),
                          ("compare", ["--methods", "natural", "--out", str(tmp_path / "cmp")])):
        result = command(module, "--config", "digits.yaml", "--tracking-uri", REFUSING, *extra,
                         *digits_flags(tmp_path), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "--tracking-uri" in one_line(result)
        assert not (tmp_path / "teachers").exists() and not (tmp_path / "run").exists()
        assert not (tmp_path / "cmp").exists()


def test_a_storage_folder_that_cannot_be_written_is_exit_2_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    result = command("search", "--space", "digits.yaml", "--storage", str(blocker / "results"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *digits_flags(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert "--storage" in line and str(blocker) in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "teachers").exists()


def test_an_optuna_database_that_does_not_open_is_refused_naming_its_path(tmp_path):
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "optuna.db").write_bytes(b"this is not an SQLite database, it is a torn file" * 10)
    with pytest.raises(ConfigError) as info:
        check_search_folder(folder)
    assert info.value.key == str(folder / "optuna.db") and "SQLite" in info.value.message
    check_search_folder(tmp_path / "fresh" / "search")  # a folder that does not exist yet is fine
    assert not (tmp_path / "fresh").exists()


def test_a_local_store_in_an_unwritable_place_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for uri in (f"sqlite:///{blocker}/mlflow.db", f"file://{blocker}/mlruns", str(blocker / "mlruns")):
        with pytest.raises(ConfigError) as info:
            check_tracking_uri(uri, "mlflow.tracking_uri")
        assert info.value.key == "mlflow.tracking_uri" and str(blocker) in info.value.message
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", "mlflow.tracking_uri")


def test_a_server_that_is_not_mlflow_is_named_as_such(tmp_path):
    """A real HTTP server (serving files) that answers 404 to MLflow's REST API."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        problem = tracking_server_problem(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert problem is not None and "HTTP 404" in problem and "MLflow tracking server" in problem


def test_a_running_mlflow_server_passes_the_check(tmp_path):
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while tracking_server_problem(uri, timeout_s=2) is not None:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)
        check_tracking_uri(uri, "--tracking-uri")
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """The server and its workers (its own process group)."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_a_password_in_a_tracking_uri_is_masked():
    assert masked_uri("https://bob:s3cret@mlflow.example.org:8443/") == "https://bob:***@mlflow.example.org:8443/"
    assert masked_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert masked_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    problem = tracking_server_problem("http://bob:s3cret@127.0.0.1:9")
    assert problem is not None and "s3cret" not in problem and "bob:***@127.0.0.1:9" in problem
