"""Beyond one number (docs/search.md): the clean-robust Pareto front of a multi-objective search, seed-confirmed
winners, the best student as a registered MLflow Model, and the MLflow UI link the commands print.

One tiny two-objective digits search (5 trials of 2 epochs, every trial to the end) with a seed confirmation
of its 2 best trials on 2 more seeds, on the session's Ray; its records are read back independently.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from searchkit import child_env, mlflow_runs, optuna_trials, search_args, tracking_uri

from tune_mtard.cli import export, search, train
from tune_mtard.models import create_model, load_checkpoint

NAME = "pareto"
SAMPLES, EPOCHS, TOP_K, SEEDS = 5, 2, 2, 2


@pytest.fixture(scope="module")
def pareto_search(space_file, ray_address, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pareto")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = search.main(search_args(space_file, root, NAME, "--num-samples", str(SAMPLES),
                                       "--set", f"train.epochs={EPOCHS}", "--set", "search.scheduler.type=fifo",
                                       "--set", "search.objectives=[val_clean_acc, val_robust_acc]",
                                       "--set", "search.sampler.type=nsga2",
                                       "--set", f"search.confirm={{top_k: {TOP_K}, seeds: {SEEDS}}}"))
    folder = root / "results" / NAME
    return {"code": code, "root": root, "folder": folder, "stdout": out.getvalue(),
            "summary": json.loads((folder / "summary.json").read_text())}


def search_trials(pareto_search) -> list:
    """The search's own child runs (not the confirmation reruns), with their final validation metrics."""
    _, _, children = mlflow_runs(pareto_search["root"], NAME)
    return [r for r in children if r.data.tags.get("confirm") != "true"]


def test_a_two_objective_study_has_two_directions_and_its_trials_are_told_both_values(pareto_search):
    assert pareto_search["code"] == 0, pareto_search["stdout"][-3000:]
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{pareto_search['folder'] / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    trials = optuna_trials(pareto_search["folder"], NAME)
    assert len(trials) == SAMPLES and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(len(t.values) == 2 for t in trials)


def test_the_front_is_non_empty_and_no_full_budget_trial_dominates_a_point_on_it(pareto_search):
    runs = search_trials(pareto_search)
    point = {r.data.tags["trial_id"]: (r.data.metrics["val_clean_acc"], r.data.metrics["val_robust_acc"]) for r in runs}
    with (pareto_search["folder"] / "pareto.csv").open() as f:
        front = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert front
    for tid in front:
        c, r = point[tid]
        assert not any(oc >= c and orr >= r and (oc > c or orr > r) for oc, orr in point.values())
    off_front = set(point) - set(front)
    for tid in off_front:  # and everything off the front is dominated by a point on it
        c, r = point[tid]
        assert any(point[f][0] >= c and point[f][1] >= r for f in front)
    tagged = {r.data.tags["trial_id"] for r in runs if r.data.tags.get("pareto") == "true"}
    assert tagged == set(front)
    client, parents, _ = mlflow_runs(pareto_search["root"], NAME)
    paths = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto.csv", "pareto.png"} <= paths


def test_export_picks_the_front_point_for_a_clean_weight_and_prints_the_front(pareto_search, tmp_path, capsys):
    folder = pareto_search["folder"]
    front = [line.split(",") for line in (folder / "pareto.csv").read_text().splitlines()[1:]]
    clean = {row[0]: float(row[1]) for row in front}
    robust = {row[0]: float(row[2]) for row in front}
    sampled = {r.data.tags["trial_id"]: r.data.params for r in search_trials(pareto_search)}
    for weight, expected in (("1.0", max(clean, key=clean.get)), ("0.0", max(robust, key=robust.get))):
        out = tmp_path / f"w{weight}.yaml"
        assert export.main(["--experiment", str(folder), "--clean-weight", weight, "--out", str(out)]) == 0
        config = yaml.safe_load(out.read_text())
        assert config["balance"]["beta"] == pytest.approx(float(sampled[expected]["balance.beta"]))
        assert len(config["teachers"]["clean"]["sha256"]) == 64
    capsys.readouterr()
    assert export.main(["--experiment", str(folder), "--pareto"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| trial | val_clean_acc | val_robust_acc") and all(t in table for t in clean)


def test_confirmation_reruns_the_top_k_on_more_seeds_and_picks_the_best_mean(pareto_search):
    _, parents, children = mlflow_runs(pareto_search["root"], NAME)
    reruns = [r for r in children if r.data.tags.get("confirm") == "true"]
    assert len(reruns) == TOP_K * SEEDS  # exactly K x S extra trials
    assert sorted(int(r.data.params["seed"]) for r in reruns) == sorted([1, 2] * TOP_K)
    assert {r.info.status for r in reruns} == {"FINISHED"}
    confirm = pareto_search["summary"]["confirm"]
    assert len(confirm["candidates"]) == TOP_K
    for candidate in confirm["candidates"]:
        values = list(candidate["per_seed"].values())
        assert sorted(candidate["per_seed"]) == ["0", "1", "2"]
        assert candidate["mean"] == pytest.approx(sum(values) / len(values))
    winner = max(confirm["candidates"], key=lambda c: c["mean"])["trial_id"]
    assert confirm["winner"] == winner == pareto_search["summary"]["best_trial_id"]
    assert parents[0].data.tags["confirmed_trial_id"] == winner
    assert f"confirm/{winner}/val_w_robust_acc_mean" in parents[0].data.metrics
    sampled = next(r.data.params for r in search_trials(pareto_search) if r.data.tags["trial_id"] == winner)
    best = yaml.safe_load((pareto_search["folder"] / "best_config.yaml").read_text())
    assert best["balance"]["beta"] == pytest.approx(float(sampled["balance.beta"])) and best["seed"] == 0


def test_the_best_student_is_a_registered_pt2_model_equal_to_its_weights(pareto_search, tiny_digits):
    import mlflow

    client, parents, _ = mlflow_runs(pareto_search["root"], NAME)
    uri = parents[0].data.tags["registered_model"]
    assert uri == f"models:/{NAME}/1"
    mlflow.set_tracking_uri(tracking_uri(pareto_search["root"]))
    loaded = mlflow.pytorch.load_model(uri)
    winner = pareto_search["summary"]["best_trial_id"]
    version = client.get_model_version(NAME, "1")
    assert version.tags["trial_id"] == winner and "val_w_robust_acc" in version.tags and "config" in version.tags
    checkpoint = sorted(pareto_search["folder"].glob(f"train_bmtard_{winner}_*/checkpoint_*/student.pt"))[-1]
    student = load_checkpoint(create_model("digits_cnn", 10, 1), checkpoint).eval()
    x = tiny_digits.test.floats()
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))


def test_mlflow_models_predict_serves_the_registered_model_on_a_sample_batch(pareto_search, tiny_digits, tmp_path):
    """The registered model through MLflow's own CLI (pyfunc, the local environment): the student's logits."""
    x = tiny_digits.test.floats()[:4]
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"inputs": x.tolist()}))
    env = {**child_env(), "MLFLOW_TRACKING_URI": tracking_uri(pareto_search["root"])}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    result = subprocess.run([str(mlflow_cli), "models", "predict", "-m", f"models:/{NAME}/1", "-i", str(batch),
                             "-t", "json", "--env-manager", "local"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])["predictions"])
    winner = pareto_search["summary"]["best_trial_id"]
    checkpoint = sorted(pareto_search["folder"].glob(f"train_bmtard_{winner}_*/checkpoint_*/student.pt"))[-1]
    student = load_checkpoint(create_model("digits_cnn", 10, 1), checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(predictions, student(x), rtol=1e-5, atol=1e-5)


def test_train_registers_its_final_student_when_asked(tiny_config_path, tiny_teachers, tiny_digits, tmp_path):
    import mlflow

    out = tmp_path / "run"
    assert train.main(["--config", str(tiny_config_path), "--out", str(out), "--tracking-uri", tracking_uri(tmp_path),
                       "--register", "tiny-student", "--set", "train.epochs=1", "--no-progress"]) == 0
    mlflow.set_tracking_uri(tracking_uri(tmp_path))
    loaded = mlflow.pytorch.load_model("models:/tiny-student/1")
    student = load_checkpoint(create_model("digits_cnn", 10, 1), out / "student.pt").eval()
    x = tiny_digits.val.floats()
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))


def test_the_search_marks_its_experiment_for_the_runs_table_and_prints_the_direct_link(pareto_search):
    client, parents, _ = mlflow_runs(pareto_search["root"], NAME)
    experiment = client.get_experiment(parents[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert link in pareto_search["stdout"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_printed_link_opens_the_runs_table_with_the_search_in_a_real_browser(pareto_search, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                               tracking_uri(pareto_search["root"]), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the MLflow UI did not start"
            time.sleep(0.5)
        client, parents, children = mlflow_runs(pareto_search["root"], NAME)
        link = next(line.split("then open ")[1].strip() for line in pareto_search["stdout"].splitlines()
                    if "then open " in line).replace(":5000/", f":{port}/")
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
                              "--virtual-time-budget=20000", "--dump-dom", link],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert NAME in dom  # the parent run, by its name
    assert f"<strong>{1 + len(children)}</strong> matching runs" in dom
