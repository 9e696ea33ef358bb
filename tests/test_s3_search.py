"""Specification of a search whose storage is an object store (docs/cluster.md, "Object storage"): ``--storage
s3://bucket/prefix`` against moto's real S3 server, started here on a free loopback port. Every driver is a
separate process with its own local Ray, as a user runs it: the trials' workers get the endpoint and the
credentials from its environment."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from searchkit import child_env, mlflow_runs, search_args, tracking_uri
from services import s3_server

from tune_mtard.errors import ConfigError
from tune_mtard.search.driver import SearchRequest, search_config

BUCKET = "tune-mtard-search"
KEYS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}
SMALL = ("--num-samples", "2", "--set", "search.scheduler.type=fifo", "--set", "train.epochs=2")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("moto")) as url:
        pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True, **KEYS).create_dir(BUCKET)
        yield url


def s3_env(endpoint: str, cache: Path) -> dict[str, str]:
    """The standard AWS variables naming the test server, and a cache folder of this test for the driver's copy."""
    return {**child_env(), "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEYS["access_key"],
            "AWS_SECRET_ACCESS_KEY": KEYS["secret_key"], "AWS_DEFAULT_REGION": KEYS["region"],
            "XDG_CACHE_HOME": str(cache)}


def bucket(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, **KEYS)


def objects(endpoint: str, prefix: str) -> list[str]:
    """Every object under ``prefix`` of the bucket, relative to it, listed by pyarrow (not the code under test)."""
    infos = bucket(endpoint).get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True,
                                                             allow_not_found=True))
    return sorted(i.path[len(f"{BUCKET}/{prefix}/"):] for i in infos if i.type == pafs.FileType.File)


def command(module: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def s3_search_args(space_file: Path, root: Path, name: str, storage: str, *extra: str) -> list[str]:
    return [*search_args(space_file, root, name, *SMALL, *extra), "--storage", storage]


def test_a_digits_search_on_s3_keeps_its_files_and_checkpoints_in_the_bucket_and_exports_from_there(
        space_file, endpoint, tmp_path):
    name, prefix = "on-s3", "searches"
    env = s3_env(endpoint, tmp_path / "cache")
    start = time.perf_counter()
    done = command("tune_mtard.search", s3_search_args(space_file, tmp_path, name, f"s3://{BUCKET}/{prefix}"),
                   env, tmp_path / "work")
    s3_wall = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stored = objects(endpoint, f"{prefix}/{name}")
    for file in ("best_config.yaml", "trials.csv", "summary.json", "search_space.yaml", "teachers.json",
                 "tuner.pkl", "mlflow_parent_run_id", "sensitivity.md"):
        assert file in stored, (file, stored)
    assert "optuna.db" not in stored and ".driver.lock" not in stored  # they stay on the driver's machine
    trial_dirs = {path.split("/")[0] for path in stored if "/checkpoint_" in path}
    assert len(trial_dirs) == 2, stored  # both trials checkpointed into the bucket, with the loop state
    assert all(any(p.startswith(f"{t}/checkpoint_") and p.endswith("/state.pt") for p in stored) for t in trial_dirs)
    summary = json.loads(bucket(endpoint).open_input_stream(f"{BUCKET}/{prefix}/{name}/summary.json").read())
    assert summary["status"] == "finished" and summary["records"] == "complete"

    _, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}

    # export reads the search from the bucket, and writes the same config the search chose
    exported = command("tune_mtard.export", ["--experiment", f"s3://{BUCKET}/{prefix}/{name}", "--out",
                                             str(tmp_path / "exported.yaml")], env, tmp_path / "elsewhere")
    assert exported.returncode == 0, exported.stderr
    best = bucket(endpoint).open_input_stream(f"{BUCKET}/{prefix}/{name}/best_config.yaml").read().decode()
    assert yaml.safe_load((tmp_path / "exported.yaml").read_text()) == yaml.safe_load(best)
    # ... which trains the best trial again, to its very metrics (its teachers pinned, its values exported)
    trained = command("tune_mtard.train", ["--config", str(tmp_path / "exported.yaml"), "--out", str(tmp_path / "run"),
                                           "--no-progress", "--tracking-uri", tracking_uri(tmp_path / "train")],
                      env, tmp_path / "train")
    assert trained.returncode == 0, trained.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc"):
        assert metrics[key] == summary[f"best_{key}"], key
    # analyze reads the study and trials of the search and writes its analysis back to the bucket
    bucket(endpoint).delete_file(f"{BUCKET}/{prefix}/{name}/sensitivity.md")
    analyzed = command("tune_mtard.analyze", ["--experiment", f"s3://{BUCKET}/{prefix}/{name}"], env,
                       tmp_path / "elsewhere")
    assert analyzed.returncode == 0, analyzed.stderr
    assert "sensitivity.md" in objects(endpoint, f"{prefix}/{name}")

    # the same search with a folder, one after the other (both wall times: docs/cluster.md, "Object storage")
    start = time.perf_counter()
    local = command("tune_mtard.search", [*search_args(space_file, tmp_path / "local", name, *SMALL)], env,
                    tmp_path / "local")
    folder_wall = time.perf_counter() - start
    assert local.returncode == 0, local.stderr[-3000:]
    print(f"\nwall time of the search: s3 {s3_wall:.1f} s, folder {folder_wall:.1f} s")


def _one_line_exit_2(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("where", ["wrong-endpoint", "missing-bucket"])
def test_an_unreachable_store_or_missing_bucket_exits_2_in_one_line_before_anything_starts(space_file, endpoint,
                                                                                           tmp_path, where):
    env = s3_env(endpoint, tmp_path / "cache")
    storage = f"s3://{BUCKET}/x"
    if where == "wrong-endpoint":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    else:
        storage = "s3://no-such-bucket/x"
    started = time.perf_counter()
    result = command("tune_mtard.search", s3_search_args(space_file, tmp_path, "nowhere", storage), env,
                     tmp_path / "work", timeout=300)
    _one_line_exit_2(result, "--storage", storage)
    assert time.perf_counter() - started < 120
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()
    assert not list((tmp_path / "work").iterdir())


def test_a_plan_of_an_s3_search_goes_to_the_bucket(space_file, endpoint, tmp_path):
    env = s3_env(endpoint, tmp_path / "cache")
    planned = command("tune_mtard.search", [*s3_search_args(space_file, tmp_path, "planned", f"s3://{BUCKET}/plans"),
                                            "--plan"], env, tmp_path / "work", timeout=600)
    assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr[-2000:]
    assert objects(endpoint, "plans/planned") == ["plan.json"]
    assert f"s3://{BUCKET}/plans/planned/plan.json" in planned.stdout
    assert not list((tmp_path / "work").iterdir())  # no local folder named after the URI


def test_storage_options_are_validated_by_name(space_file):
    def config(*overrides: str):
        return search_config(SearchRequest(space=str(space_file), overrides=list(overrides)))

    with pytest.raises(ConfigError) as error:
        config("search.storage=s3://b/p", "search.storage_options={endpoint: x}")
    assert error.value.key == "search.storage_options" and "endpoint" in error.value.message
    with pytest.raises(ConfigError) as error:
        config("search.storage=s3://b/p", "search.storage_options={secret_key: x}")
    assert error.value.key == "search.storage_options" and "AWS_SECRET_ACCESS_KEY" in error.value.message
    with pytest.raises(ConfigError) as error:
        config("search.storage_options={region: us-east-1}")
    assert "s3:// storage only" in error.value.message
    with pytest.raises(ConfigError) as error:
        config("search.storage=s3://b/p", "search.storage_options={connect_timeout: soon}")
    assert error.value.key == "search.storage_options" and "connect_timeout" in error.value.message
    cfg = config("search.storage=s3://b/p", "search.storage_options={endpoint_override: 127.0.0.1:9000, scheme: http}")
    assert cfg.search.storage == "s3://b/p" and cfg.search.storage_options["scheme"] == "http"


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_s3_search_resumes_from_a_fresh_working_folder(space_file, endpoint, tmp_path, how):
    """SIGINT ends the search as interrupted (exit 130); SIGKILL of the driver and of its local Ray is a lost
    driver machine. The same command with --resume from another working folder finishes, without duplicates."""
    name, prefix = "resumed", f"interrupted-{how}"
    env = s3_env(endpoint, tmp_path / "cache")
    args = s3_search_args(space_file, tmp_path, name, f"s3://{BUCKET}/{prefix}", "--set", "train.epochs=6")
    (tmp_path / "first").mkdir()
    log = tmp_path / "first.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "tune_mtard.search", *args], env=env, cwd=tmp_path / "first",
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not {"/checkpoint_", "experiment_state"} <= {w for p in objects(endpoint, f"{prefix}/{name}")
                                                           for w in ("/checkpoint_", "experiment_state") if w in p}:
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        if how == "SIGINT":  # meanwhile a driver of another machine (its own copy folder) is refused
            other = command("tune_mtard.search", [*args, "--resume"], {**env, "XDG_CACHE_HOME": str(tmp_path / "b")},
                            tmp_path / "machine-b", timeout=300)
            _one_line_exit_2(other, "--resume", f"process {driver.pid} on", "lease")
        driver.send_signal(getattr(signal, how))
        driver.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the rest of the lost machine: its own local Ray
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == (130 if how == "SIGINT" else -signal.SIGKILL), log.read_text()[-3000:]

    resumed = command("tune_mtard.search", [*args, "--resume"], env, tmp_path / "second")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(bucket(endpoint).open_input_stream(f"{BUCKET}/{prefix}/{name}/summary.json").read())
    assert summary["status"] == "finished"
    _, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and len(children) == 2  # no duplicates: each trial's run found again
    assert {r.info.status for r in children} == {"FINISHED"}
    assert os.listdir(tmp_path / "second") == []  # the working folder holds nothing of the search
