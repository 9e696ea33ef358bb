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


# ---- files written whole, configs read only when whole -------------------------------------------------


def test_an_atomic_write_that_fails_midway_leaves_the_old_file_and_no_partial_one(tmp_path):
    from tune_mtard import atomic

    target = tmp_path / "summary.json"
    atomic.write_text(target, '{"status": "finished"}')
    with pytest.raises(RuntimeError), atomic.open_atomic(target) as f:
        f.write('{"status": "interr')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"status": "finished"}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK


CUT_AFTER_TEACHERS = """\
name: cut
data: {dataset: digits}
student: {arch: digits_cnn}
teachers:
"""


@pytest.mark.parametrize("text, named", [
    ("", "the file is empty"),
    ("# a comment, and nothing else\n", "the file is empty"),
    (CUT_AFTER_TEACHERS, "'teachers' has nothing under it"),
    (CUT_AFTER_TEACHERS + "  clean:\n", "'teachers.clean' has nothing under it"),
    ("name: x\ntrain: {epochs: [\n", "invalid YAML"),
])
def test_an_empty_or_cut_config_is_refused_naming_the_file(tmp_path, text, named):
    from tune_mtard.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    assert info.value.key == str(path) and named in info.value.message


def test_a_section_written_as_an_empty_mapping_takes_its_defaults(tmp_path):
    from tune_mtard.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("name: x\ndata: {dataset: digits}\nbalance: {}\n")
    assert load_config(path, check_files=False).balance.beta == 1.0


def test_train_on_an_empty_config_is_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    result = command("train", "--config", "empty.yaml", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert "empty.yaml: the file is empty" in one_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_export_refuses_a_torn_summary_or_teacher_pins_file(tmp_path):
    from tune_mtard.search.export import _confirmed_trial, teacher_pins

    (tmp_path / "teachers.json").write_text('{"pins": {"teachers.clean.checkpoint": "/t/clean.pt", "teach')
    (tmp_path / "summary.json").write_text('{"status": "finished", "confirm": {"winn')
    for read, name in ((teacher_pins, "teachers.json"), (_confirmed_trial, "summary.json")):
        with pytest.raises(ConfigError) as info:
            read(tmp_path)
        assert info.value.key == str(tmp_path / name) and "torn" in info.value.message
    (tmp_path / "teachers.json").write_text('{"pins": {"teachers.clean.sha256": "ab"}, "quality": {}}')
    (tmp_path / "summary.json").write_text('{"status": "finished", "confirm": {"winner": "t1"}}')
    assert teacher_pins(tmp_path) == {"teachers.clean.sha256": "ab"} and _confirmed_trial(tmp_path) == "t1"
    (tmp_path / "summary.json").unlink()
    assert _confirmed_trial(tmp_path) is None  # a search that has not ended yet
    (tmp_path / "teachers.json").unlink()
    with pytest.raises(ConfigError, match="teachers.json"):
        teacher_pins(tmp_path)


# ---- paths and secrets ---------------------------------------------------------------------------------


def test_a_search_whose_experiment_name_is_an_absolute_path_is_exit_2_and_writes_nothing(tmp_path):
    result = command("search", "--space", "digits.yaml", "--storage", str(tmp_path / "results"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", "mlflow.experiment=/tmp/x",
                     *digits_flags(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "mlflow.experiment" in one_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("experiment", ["/Shared/x", "../../../tmp/x", "a/../../b", "a\\..\\b"])
def test_an_experiment_name_that_leaves_the_artifact_store_is_refused(experiment):
    from tune_mtard.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config("digits.yaml", [f"mlflow.experiment={experiment}"], check_files=False)
    assert info.value.key == "mlflow.experiment"
    assert load_config("digits.yaml", ["mlflow.experiment=Shared/x"], check_files=False).mlflow.experiment == "Shared/x"


def test_a_password_in_a_tracking_uri_never_reaches_mlflow_params_tags_or_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    from tune_mtard import tracking

    secret_uri = "https://bob:s3cret@mlflow.example.org"
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.experiment_id(client, "secrets")
    config = tmp_path / "config.yaml"
    config.write_text(f"mlflow: {{tracking_uri: '{secret_uri}', experiment: secrets}}\n")
    with tracking.open_run(client, experiment, "run", tags={"uri": secret_uri}) as run:
        run.log_params({"mlflow.tracking_uri": secret_uri})
        run.log_artifacts([config])
    stored = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.run_id)
    assert stored.data.params["mlflow.tracking_uri"] == "https://bob:***@mlflow.example.org"
    assert stored.data.tags["uri"] == "https://bob:***@mlflow.example.org"
    uploaded = Path(client.download_artifacts(run.run_id, "config.yaml", str(tmp_path / "down"))).read_text()
    assert "s3cret" not in uploaded and "bob:***@mlflow.example.org" in uploaded
    assert "s3cret" in config.read_text()  # the local file keeps it, for --resume
    assert "s3cret" not in tracking.ui_link(secret_uri, "1")


def test_cifar_batches_are_read_with_an_unpickler_that_builds_nothing_else(tmp_path):
    import pickle

    import numpy as np

    from tune_mtard.data.datasets import _read_cifar_pickles

    batch = tmp_path / "data_batch_1"
    images = np.arange(2 * 3 * 32 * 32, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch.write_bytes(pickle.dumps({b"batch_label": b"training batch 1 of 5", b"labels": [3, 7], b"data": images,
                                    b"filenames": [b"a.png", b"b.png"]}, protocol=2))
    split = _read_cifar_pickles([batch])
    assert split.labels.tolist() == [3, 7] and split.images.shape == (2, 3, 32, 32)
    assert split.images.flatten().tolist() == images.flatten().tolist()

    class Planted:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    evil = tmp_path / "data_batch_2"
    evil.write_bytes(pickle.dumps({"labels": [1], "data": Planted()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refused to build"):
        _read_cifar_pickles([evil])
    assert not (tmp_path / "pwned").exists()


def test_a_search_folder_is_private_and_resume_refuses_one_others_can_write(tmp_path):
    from tune_mtard.search.lock import SearchLock

    folder = tmp_path / "results" / "shared-search"
    with SearchLock(folder):
        pass
    assert folder.stat().st_mode & 0o777 == 0o700
    (folder / "tuner.pkl").write_bytes(b"a planted pickle")
    (folder / "search_space.yaml").write_text("name: shared-search\n")
    folder.chmod(0o777)
    result = command("search", "--space", "digits.yaml", "--storage", str(tmp_path / "results"), "--resume",
                     "--set", "name=shared-search", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     *digits_flags(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert "--resume" in line and "written by other users" in line and str(folder) in line
    folder.chmod(0o700)
    (folder / "tuner.pkl").chmod(0o666)
    result = command("search", "--space", "digits.yaml", "--storage", str(tmp_path / "results"), "--resume",
                     "--set", "name=shared-search", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     *digits_flags(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "tuner.pkl can be written by other users" in one_line(result)


# ---- --resume with a changed search --------------------------------------------------------------------


def started_search(tmp_path: Path) -> tuple[Path, list[str]]:
    """A search folder as a started search leaves it (its saved space, Ray's tuner.pkl), and the flags that
    name it."""
    from tune_mtard.config import load_config

    flags = ["--storage", str(tmp_path / "results"), "--set", "name=resumable", "--set", f"data.root={tmp_path}",
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *digits_flags(tmp_path)]
    cfg = load_config("digits.yaml", ["name=resumable", f"search.storage={tmp_path / 'results'}",
                                      f"data.root={tmp_path}",
                                      f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                      f"teachers.cache_dir={tmp_path / 'teachers'}", "device=cpu"], check_files=False)
    folder = tmp_path / "results" / "resumable"
    folder.mkdir(parents=True, mode=0o700)
    cfg.dump(folder / "search_space.yaml", with_search=True)
    (folder / "tuner.pkl").write_bytes(b"Ray's state")
    return folder, flags


@pytest.mark.parametrize("changed, named", [
    (["--set", "space.balance.beta.high=5"], "space.balance.beta.high"),
    (["--set", "search.max_concurrent=1"], "search.max_concurrent"),
    (["--set", "search.scheduler.type=fifo"], "search.scheduler.type"),
])
def test_resume_with_a_changed_search_is_exit_2_naming_the_key(tmp_path, changed, named):
    folder, flags = started_search(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    result = command("search", "--space", "digits.yaml", "--resume", *flags, *changed, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith(f"error: {named}: differs from the search being resumed")
    assert sorted(p.name for p in folder.iterdir()) == before and not (tmp_path / "teachers").exists()


def test_resume_with_fewer_samples_is_exit_2_naming_the_flag(tmp_path):
    folder, flags = started_search(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    result = command("search", "--space", "digits.yaml", "--resume", *flags, "--num-samples", "11", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == ("error: --num-samples: 11 is fewer than the 12 trials of the search being resumed; "
                                "a resumed search can run more trials, never fewer")
    assert sorted(p.name for p in folder.iterdir()) == before and not (tmp_path / "teachers").exists()


def test_resume_with_the_same_search_passes_the_check(tmp_path):
    from tune_mtard.search.driver import SearchRequest, check_experiment, search_config

    folder, flags = started_search(tmp_path)
    cfg = search_config(SearchRequest(space="digits.yaml", storage=str(tmp_path / "results"), resume=True,
                                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                      overrides=["name=resumable", f"data.root={tmp_path}", *flags[-3::2]]))
    check_experiment(cfg, resume=True)
    check_experiment(cfg.with_values({"search.max_failures": 9}), resume=True)  # applied: the retry rule's count
    check_experiment(cfg.with_values({"search.num_samples": 20}), resume=True)  # applied: more trials
    changed = cfg.with_values({"space.train.lr.low": 0.03})
    with pytest.raises(ConfigError, match="space.train.lr.low"):
        check_experiment(changed, resume=True)


# ---- GPU accounting (a faked device count, as the device checks do) -------------------------------------


def fake_cards(monkeypatch, count: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_trial_given_no_gpu_runs_on_the_cpu_whatever_auto_would_pick(monkeypatch):
    import torch

    from tune_mtard.perf import resolve_device, trial_device

    fake_cards(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert trial_device("auto", 0) == torch.device("cpu")
    assert trial_device("cpu", 0) == torch.device("cpu")
    assert trial_device("auto", 0.5) == torch.device("cuda")
    assert trial_device("cuda", 1) == torch.device("cuda")


@pytest.mark.parametrize("device, gpus, named", [
    ("cuda", 0, "device"), ("cuda:0", 0, "device"), ("cuda:1", 1, "device"), ("cpu", 0.5, "search.resources.gpu"),
])
def test_device_is_checked_against_the_gpus_a_trial_reserves(monkeypatch, device, gpus, named):
    from tune_mtard.perf import check_trial_device

    fake_cards(monkeypatch, 2)
    with pytest.raises(ConfigError) as info:
        check_trial_device(device, gpus)
    assert info.value.key == named
    for fine in (("auto", 0), ("auto", 0.5), ("cpu", 0), ("cuda", 0.5), ("cuda:0", 1)):
        check_trial_device(*fine)


def test_a_search_asking_for_cuda_without_reserving_a_gpu_is_exit_2_before_anything_starts(tmp_path):
    result = command("search", "--space", "digits.yaml", "--storage", str(tmp_path / "results"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--set", f"teachers.cache_dir={tmp_path / 'teachers'}", "--set", "device=cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result).startswith("error: device: 'cuda', but search.resources.gpu is 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_driver_gives_its_cached_cuda_memory_back(monkeypatch):
    import torch

    from tune_mtard.perf import release_cuda_memory

    emptied = []
    fake_cards(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    release_cuda_memory()
    assert emptied == [True]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    release_cuda_memory()  # a driver that never touched CUDA does not start it now
    assert emptied == [True]


# ---- failure kinds -------------------------------------------------------------------------------------


def test_a_failed_trial_is_told_apart_as_infra_trial_or_diverged():
    import errno

    import ray.exceptions
    import torch

    from tune_mtard.search.trials import failure_kind, failure_text

    infra = [ray.exceptions.ActorDiedError(), ray.exceptions.WorkerCrashedError(),
             torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
             OSError(errno.ENOSPC, "No space left on device")]
    for error in infra:
        assert failure_kind(failure_text(error, None)) == "infra", failure_text(error, None)
    for error in (ValueError("bad shape"), KeyError("balance.beta"), RuntimeError("mat1 and mat2 shapes")):
        assert failure_kind(failure_text(error, None)) == "trial"
    assert failure_kind("ActorDiedError: ...", {"diverged_step": 3, "diverged_epoch": 1}) == "diverged"
    assert failure_kind("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.") \
        == "infra"  # the last line of Ray's error.txt


# ---- Optuna writes that fail ---------------------------------------------------------------------------


def test_a_tell_that_fails_on_a_locked_study_stays_pending_and_is_told_once_the_database_is_free(tmp_path):
    import sqlite3

    import optuna

    from tune_mtard.config import Distribution
    from tune_mtard.config.search import SamplerConfig
    from tune_mtard.search import searcher as searching

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                         engine_kwargs={"connect_args": {"timeout": 1}})
    search = searching.PrunedAwareOptunaSearch(
        space=searching.optuna_distributions({"balance.beta": Distribution(type="float", low=0.5, high=3.0)}),
        metric="val_w_robust_acc", mode="max", sampler_config=SamplerConfig(type="random", seed=0),
        study_name="locked", storage=storage, full_epochs=2)
    assert search.suggest("t1") is not None
    search.on_trial_complete("t1", {"epoch": 2, "val_w_robust_acc": 0.7})

    def states() -> list:
        return [t.state for t in optuna.load_study(study_name="locked", storage=storage).get_trials()]

    lock = sqlite3.connect(tmp_path / "optuna.db", timeout=1, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        search.tell_pending()  # three attempts, each waiting out the lock
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "t1" in search._pending_tells and states() == [optuna.trial.TrialState.RUNNING]
    search.tell_pending()
    assert not search._pending_tells and states() == [optuna.trial.TrialState.COMPLETE]
    assert optuna.load_study(study_name="locked", storage=storage).trials[0].value == 0.7
    search.tell_pending()  # nothing left: told once
    assert states() == [optuna.trial.TrialState.COMPLETE]
