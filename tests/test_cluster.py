"""Specification of a search on the services a cluster without a shared folder runs (docs/cluster.md): the
Optuna study in a real PostgreSQL, the records on a real ``mlflow server`` with proxied artifacts. Both are
started here, on free loopback ports, and stopped after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from searchkit import EPOCHS, NUM_SAMPLES, SPEC_TRACE_HEADER, child_env, ray_reports, ray_trial_ids, search_args
from services import (
    free_port,
    mlflow_server,
    optuna_dashboard,
    postgres_bin,
    postgres_server,
    ray_cluster_with_blind_worker,
    ray_env,
)

from tune_mtard.cli import search
from tune_mtard.cli.common import run
from tune_mtard.search import driver as search_driver

needs_postgres = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL's initdb and pg_ctl are not "
                                    "installed (Debian: apt-get install postgresql)")


@pytest.fixture(scope="module")
def database():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)")
    with postgres_server() as url:
        yield url


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _told(url: str, name: str) -> dict[str, TrialState]:
    try:
        trials = _study(url, name).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return {}
    return {t.user_attrs["ray_trial_id"]: t.state for t in trials if "ray_trial_id" in t.user_attrs}


def _bad_input(space_file: Path, tmp_path: Path, capsys, monkeypatch, *extra: str) -> str:
    """The one line a search that must not start prints, after asserting exit 2 and that nothing was written."""
    monkeypatch.setattr(search_driver, "run_search", lambda *a, **k: pytest.fail("the search started"))
    with pytest.raises(SystemExit) as exit_info:
        run(search.main, search_args(space_file, tmp_path, "bad", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
    return err


# ---- the study in a database: bad input ------------------------------------------------------------------


def test_a_database_url_with_a_password_exits_2_naming_the_key(space_file, tmp_path, capsys, monkeypatch):
    err = _bad_input(space_file, tmp_path, capsys, monkeypatch,
                     "--set", "search.optuna_storage=postgresql://user:secret@127.0.0.1/db")
    assert "search.optuna_storage" in err and "PGPASSWORD" in err and "secret" not in err


def test_a_database_nobody_answers_on_exits_2_naming_the_key(space_file, tmp_path, capsys, monkeypatch):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    err = _bad_input(space_file, tmp_path, capsys, monkeypatch, "--set", f"search.optuna_storage={url}")
    assert "error: search.optuna_storage: cannot connect" in err


def test_a_missing_database_driver_exits_2_naming_the_extra_that_installs_it(space_file, tmp_path):
    """psycopg hidden from a fresh interpreter: the search stops before Ray starts, naming the extra."""
    hidden = tmp_path / "hide"
    (hidden / "psycopg").mkdir(parents=True)
    (hidden / "psycopg" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'psycopg'\", "
                                                    "name='psycopg')\n")
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = subprocess.run([sys.executable, "-m", "tune_mtard.search",
                             *search_args(space_file, tmp_path, "bad", "--set", f"search.optuna_storage={url}")],
                            cwd=tmp_path, env={**child_env(), "PYTHONPATH": str(hidden)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "search.optuna_storage" in err and "tune-mtard[postgres]" in err, err
    assert not (tmp_path / "results").exists()


# ---- a search on PostgreSQL and a tracking server, killed and resumed -------------------------------------


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(folder) as (uri, artifacts):
        yield uri, artifacts


@pytest.fixture(scope="module")
def served_search(space_file, ray_address, database, tracking_server, tmp_path_factory) -> dict:
    """A driver on PostgreSQL and the tracking server, SIGKILLed once a trial is told to the study, then the
    same command with ``--resume``."""
    root = tmp_path_factory.mktemp("served")
    name = "tiny-served"
    uri, _ = tracking_server
    cmd = [sys.executable, "-m", "tune_mtard.search",
           *search_args(space_file, root, name, "--tracking-uri", uri, "--set", f"search.optuna_storage={database}",
                        "--address", ray_address)]
    start = time.perf_counter()
    log = (root / "first.log").open("w")
    driver = subprocess.Popen(cmd, cwd=root, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    killed = False
    try:
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            states = _told(database, name)
            if any(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states.values()):
                driver.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.5)
    finally:
        if driver.poll() is None and not killed:
            driver.kill()
        driver.wait()
    time.sleep(5)  # the killed driver's trial actors end once Ray notices it is gone
    resumed = subprocess.run(cmd + ["--resume"], cwd=root, env=child_env(), capture_output=True, text=True,
                             timeout=500)
    folder = root / "results" / name
    return {"root": root, "name": name, "folder": folder, "killed": killed, "resumed": resumed, "url": database,
            "uri": uri, "wall": time.perf_counter() - start, "first_log": (root / "first.log").read_text()}


def _client(served) -> MlflowClient:
    return MlflowClient(tracking_uri=served["uri"])


def _runs(served):
    client = _client(served)
    experiment = client.get_experiment_by_name(served["name"])
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, experiment, [r for r in runs if "mlflow.parentRunId" not in r.data.tags], \
        [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@needs_postgres
def test_a_killed_search_on_postgresql_and_a_tracking_server_resumes_and_finishes(served_search):
    assert served_search["killed"], "the search ended before a trial was told:\n" + served_search["first_log"][-3000:]
    resumed = served_search["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    folder = served_search["folder"]
    assert (folder / "best_config.yaml").is_file() and (folder / "trials.csv").is_file()
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"
    assert not (folder / "optuna.db").exists(), "the study went to SQLite, not to the database"


@needs_postgres
def test_the_postgresql_study_holds_every_trial_once_told_by_its_metric_name(served_search):
    trial_ids = ray_trial_ids(served_search["folder"])
    assert len(trial_ids) == NUM_SAMPLES
    study = _study(served_search["url"], served_search["name"])
    assert study.metric_names == ["val_w_robust_acc"]
    trials = study.get_trials(deepcopy=False)
    told = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.user_attrs["ray_trial_id"] for t in told) == sorted(trial_ids)
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@needs_postgres
def test_the_tracking_server_holds_each_trial_once_with_proxied_trace_and_weights(served_search, tracking_server,
                                                                                  tmp_path):
    _, artifacts = tracking_server
    client, experiment, parents, children = _runs(served_search)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    reports = ray_reports(served_search["folder"])
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(ray_trial_ids(served_search["folder"]))
    for record in children:
        assert record.info.artifact_uri.startswith("mlflow-artifacts:"), record.info.artifact_uri
        epochs_run = reports[record.data.tags["trial_id"]][-1]["epoch"]
        steps = [m.step for m in client.get_metric_history(record.info.run_id, "val_w_robust_acc")]
        assert sorted(steps) == list(range(1, epochs_run + 1))
        paths = {a.path for a in client.list_artifacts(record.info.run_id)}
        assert {"balance_trace.csv", "balance_trace.png", "model"} <= paths
        trace = Path(client.download_artifacts(record.info.run_id, "balance_trace.csv", str(tmp_path))).read_text()
        assert trace.splitlines()[0] == SPEC_TRACE_HEADER
        assert int(trace.splitlines()[-1].split(",")[1]) == epochs_run
    # Proxied: the files are in the server's artifact folder, which the driver never wrote to by path.
    assert len(list(artifacts.rglob("balance_trace.csv"))) == len(children)
    assert len(list(artifacts.rglob("student.pt"))) >= len(children)


@needs_postgres
def test_the_best_student_is_registered_on_the_server_and_the_ui_link_is_the_servers(served_search, tmp_path):
    client, experiment, parents, _ = _runs(served_search)
    versions = client.search_model_versions(f"name = '{served_search['name']}'")
    assert len(versions) == 1
    best = yaml.safe_load((served_search["folder"] / "best_config.yaml").read_text())
    assert versions[0].tags["search"] == served_search["name"] and best["name"] == served_search["name"]
    assert parents[0].data.tags["registered_model"].startswith("models:/")
    link = f"{served_search['uri']}/#/experiments/{experiment.experiment_id}/runs"
    assert link in served_search["resumed"].stdout


@needs_postgres
def test_a_new_search_whose_study_name_the_database_holds_exits_2_before_anything_starts(
        served_search, space_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search_driver, "run_search", lambda *a, **k: pytest.fail("the search started"))
    with pytest.raises(SystemExit) as exit_info:
        run(search.main, search_args(space_file, tmp_path, served_search["name"],
                                     "--set", f"search.optuna_storage={served_search['url']}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: name:") and "--resume" in err, err
    assert not (tmp_path / "results").exists()
    assert len(_study(served_search["url"], served_search["name"]).trials) >= NUM_SAMPLES


# ---- metric names on the study -----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["val_w_robust_acc", ["val_clean_acc", "val_robust_acc"]])
def test_the_study_names_its_objectives_by_their_metrics(metric, tmp_path):
    from tune_mtard.config import Distribution
    from tune_mtard.config.search import SamplerConfig
    from tune_mtard.search.searcher import PrunedAwareOptunaSearch, optuna_distributions

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = optuna_distributions({"balance.beta": Distribution(type="float", low=0.5, high=3.0)})
    PrunedAwareOptunaSearch(space=space, metric=metric, mode="max" if isinstance(metric, str) else ["max", "max"],
                            study_name="named", storage=optuna.storages.RDBStorage(url),
                            sampler_config=SamplerConfig(type="random", seed=0), full_epochs=EPOCHS)
    names = [metric] if isinstance(metric, str) else metric
    assert optuna.load_study(study_name="named", storage=url).metric_names == names
    # What a user opens on the study: optuna-dashboard shows the objectives by these names, not "Objective 0".
    with optuna_dashboard(url, tmp_path) as dashboard:
        with urllib.request.urlopen(f"{dashboard}/api/studies", timeout=30) as answer:
            study_id = next(s["study_id"] for s in json.load(answer)["study_summaries"]
                            if s["study_name"] == "named")
        with urllib.request.urlopen(f"{dashboard}/api/studies/{study_id}", timeout=30) as answer:
            assert json.load(answer)["objective_names"] == names


# ---- every node checked before the first trial ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a worker in its own mount namespace needs root and unshare")
def test_a_worker_node_that_cannot_see_the_storage_folder_is_named_and_nothing_starts(space_file, tmp_path):
    storage = tmp_path / "results"
    storage.mkdir()
    with ray_cluster_with_blind_worker(storage) as address:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "tune_mtard.search",
                                 *search_args(space_file, tmp_path, "tiny-blind", "--address", address)],
                                cwd=tmp_path, env={**child_env(), **ray_env()},
                                capture_output=True, text=True, timeout=400)
        wall = time.perf_counter() - start
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: search.storage:") and "1 of 2 Ray nodes cannot read" in err, err
    named = err.split("(node ", 1)[1]
    assert "the head" not in named and "FileNotFoundError" in named, err
    assert list(storage.iterdir()) == [] and not (tmp_path / "mlflow.db").exists()
    print(f"two-node check: exit 2 in {wall:.1f} s: {err}")
