"""Specification of the real commands `python -m tune_mtard.train` and `python -m tune_mtard.teachers` (docs/cli.md),
run as subprocesses on the tiny digits config whose teachers the session fixture has already trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tune_mtard.config import load_config
from tune_mtard.metrics import TRACE_HEADER
from tune_mtard.models import create_model, load_checkpoint

pytestmark = pytest.mark.slow

SPEC_TRACE_HEADER = "step,epoch,loss_adv,loss_nat,entropy_adv,entropy_nat,tau_adv,tau_nat,w_adv,w_nat"
EPOCHS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tune_mtard.{module}", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def train_args(config: Path, out: Path, tracking_uri: str, *extra: str) -> list[str]:
    return ["--config", str(config), "--out", str(out), "--tracking-uri", tracking_uri, "--no-progress",
            "--set", f"train.epochs={EPOCHS}", *extra]


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client, client.search_runs([found.experiment_id])


def student_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tiny_config_path, tiny_teachers, tmp_path_factory) -> dict:
    """One uninterrupted `train` of 3 epochs (a milestone falls inside), with its own MLflow store."""
    root = tmp_path_factory.mktemp("train-cli")
    out = root / "run"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = command("train", *train_args(tiny_config_path, out, uri), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "out": out, "uri": uri, "result": result}


# ---- a full run ----------------------------------------------------------------------------------


def test_train_writes_metrics_with_final_validation_and_test_accuracies(finished_run, tiny_config):
    metrics = json.loads((finished_run["out"] / "metrics.json").read_text())
    for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc", "test_clean_acc", "test_pgd20_acc",
                "test_w_robust_acc_pgd20"):
        assert 0.0 <= metrics[key] <= 1.0, key
    w = tiny_config.eval.clean_weight
    assert metrics["val_w_robust_acc"] == pytest.approx(
        w * metrics["val_clean_acc"] + (1 - w) * metrics["val_robust_acc"])
    assert metrics["test_w_robust_acc_pgd20"] == pytest.approx(
        w * metrics["test_clean_acc"] + (1 - w) * metrics["test_pgd20_acc"])


def test_train_writes_student_weights_that_load_into_the_student_arch(finished_run, tiny_config, tiny_digits):
    model = create_model(tiny_config.student.arch, tiny_digits.num_classes, tiny_digits.in_channels)
    load_checkpoint(model, finished_run["out"] / "student.pt")
    with torch.no_grad():
        logits = model.eval()(tiny_digits.test.floats()[:8])
    assert logits.shape == (8, tiny_digits.num_classes)


def test_train_writes_the_balance_trace_with_the_spec_header_and_one_row_per_step(finished_run, tiny_digits,
                                                                                   tiny_config):
    lines = (finished_run["out"] / "balance_trace.csv").read_text().splitlines()
    assert lines[0] == SPEC_TRACE_HEADER == ",".join(TRACE_HEADER)
    steps = EPOCHS * -(-len(tiny_digits.train) // tiny_config.data.batch_size)
    assert len(lines) == 1 + steps
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, steps + 1))
    assert json.loads((finished_run["out"] / "metrics.json").read_text())["steps"] == steps


def test_train_writes_the_resolved_config_it_ran(finished_run, tiny_config_path, monkeypatch):
    monkeypatch.chdir(finished_run["root"])  # where the command ran: relative paths resolve against it
    saved = load_config(finished_run["out"] / "config.yaml")
    ran = load_config(tiny_config_path, [f"train.epochs={EPOCHS}"]).run_config()
    ran.mlflow.tracking_uri = finished_run["uri"]
    assert saved == ran
    raw = yaml.safe_load((finished_run["out"] / "config.yaml").read_text())
    assert "search" not in raw and "space" not in raw


def test_train_logs_exactly_one_mlflow_run_with_dotted_params_per_epoch_metrics_and_artifacts(finished_run,
                                                                                             tiny_config):
    client, runs = mlflow_runs(finished_run["uri"], tiny_config.mlflow.experiment)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (finished_run["out"] / "mlflow_run_id").read_text().strip()
    params = run.data.params
    assert params["balance.beta"] == "1.0"
    assert params["train.epochs"] == str(EPOCHS)
    assert params["teachers.robust.arch"] == "digits_cnn"
    assert params["method"] == "b-mtard"
    for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc", "loss_adv", "loss_nat", "entropy_adv",
                "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "epoch_time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1)), key
    metrics = json.loads((finished_run["out"] / "metrics.json").read_text())
    assert run.data.metrics["test_pgd20_acc"] == pytest.approx(metrics["test_pgd20_acc"])
    assert run.data.metrics["val_w_robust_acc"] == pytest.approx(metrics["val_w_robust_acc"])

    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "balance_trace.csv" in artifacts
    assert any(path.endswith(".png") for path in artifacts)
    weights = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    assert weights == ["model/student.pt"]


# ---- resume after a crash --------------------------------------------------------------------------


def test_a_killed_run_resumed_with_resume_ends_exactly_like_an_uninterrupted_one(finished_run, tiny_config_path,
                                                                                 tiny_config, tmp_path):
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = train_args(tiny_config_path, out, uri)
    process = subprocess.Popen([sys.executable, "-m", "tune_mtard.train", *args], cwd=tmp_path, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (out / "checkpoint.pt").exists():  # written atomically at the end of each epoch
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    killed_at = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]
    assert 1 <= killed_at < EPOCHS and not (out / "metrics.json").exists()

    result = command("train", *args, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    expected, actual = student_weights(finished_run["out"] / "student.pt"), student_weights(out / "student.pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert (out / "balance_trace.csv").read_text() == (finished_run["out"] / "balance_trace.csv").read_text()
    before = json.loads((finished_run["out"] / "metrics.json").read_text())
    after = json.loads((out / "metrics.json").read_text())
    for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc", "test_clean_acc", "test_pgd20_acc"):
        assert after[key] == before[key], key

    client, runs = mlflow_runs(uri, tiny_config.mlflow.experiment)
    assert len(runs) == 1  # the resumed run reopened the killed one
    assert runs[0].info.run_id == (out / "mlflow_run_id").read_text().strip()
    assert runs[0].info.status == "FINISHED"
    for key in ("val_w_robust_acc", "tau_adv", "w_nat"):
        history = client.get_metric_history(runs[0].info.run_id, key)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), key


# ---- bad input: exit 2, one line naming the culprit, nothing written ---------------------------------

# id: (arguments after the command; {config} is a copy of the tiny config whose MLflow store would land in the
# working directory and whose data root is the finished run's, {tmp} a scratch folder, {finished} the out dir of a
# finished run), names the message must hold
BAD_INPUTS = {
    "unknown key": (["--config", "{config}", "--set", "train.epochz=3"], ["train.epochz"]),
    "negative epsilon": (["--config", "{config}", "--set", "attack.epsilon=-8/255"], ["attack.epsilon"]),
    "tau_min above tau_max": (["--config", "{config}", "--set", "balance.tau_min=12"], ["balance.tau_min"]),
    "clean_weight 1.5": (["--config", "{config}", "--set", "eval.clean_weight=1.5"], ["eval.clean_weight"]),
    "unknown dataset": (["--config", "{config}", "--set", "data.dataset=mnist"], ["data.dataset"]),
    "unknown arch": (["--config", "{config}", "--set", "student.arch=resnet1000"], ["student.arch"]),
    "missing teacher checkpoint": (["--config", "{config}", "--set", "teachers.robust.checkpoint=missing/robust.pt"],
                                   ["teachers.robust.checkpoint", "missing/robust.pt"]),
    "missing config file": (["--config", "nowhere.yaml"], ["nowhere.yaml"]),
    "bad --set syntax": (["--config", "{config}", "--set", "train.epochs"], ["--set", "train.epochs"]),
    "unknown flag": (["--config", "{config}", "--bogus"], ["--bogus"]),
    "a device the machine lacks": (["--config", "{config}", "--set", "device=cuda:99"], ["device", "cuda:99"]),
    "registered model name MLflow refuses": (["--config", "{config}", "--register", "digits/best"],
                                             ["--register", "digits/best"]),
    "resume with nothing to resume": (["--config", "{config}", "--out", "{tmp}/never-ran", "--resume"],
                                      ["--out", "never-ran"]),
    "existing out without resume": (["--config", "{config}", "--out", "{finished}", "--set", f"train.epochs={EPOCHS}"],
                                    ["--out"]),
    "resume with a changed config": (["--config", "{config}", "--out", "{finished}", "--resume",
                                      "--set", f"train.epochs={EPOCHS}", "--set", "balance.beta=2.0"],
                                     ["balance.beta"]),
}


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def rejected(finished_run, tiny_config_path, tmp_path_factory) -> dict:
    """Every bad input, each run from its own empty working directory (several at once: they only start up)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("bad-input")
    config = root / "tiny.yaml"
    config.write_text("\n".join(
        "mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: tiny-digits}" if line.startswith("mlflow:") else line
        for line in tiny_config_path.read_text().replace("root: ./data", f"root: {finished_run['root'] / 'data'}")
        .splitlines()))
    finished_before = files_under(finished_run["out"])
    places = {"config": config, "tmp": root, "finished": finished_run["out"]}
    cwds = {case: root / f"cwd-{i}" for i, case in enumerate(BAD_INPUTS)}

    def attempt(case: str) -> subprocess.CompletedProcess:
        cwds[case].mkdir()
        args = [arg.format(**places) for arg in BAD_INPUTS[case][0]]
        return command("train", *args, cwd=cwds[case])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(BAD_INPUTS, pool.map(attempt, BAD_INPUTS), strict=False))
    return {"results": results, "cwds": cwds, "root": root, "finished": finished_run["out"],
            "finished_before": finished_before, "finished_after": files_under(finished_run["out"])}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(case, rejected):
    result = rejected["results"][case]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    message = result.stderr.strip()
    assert message and "\n" not in message, result.stderr
    assert "Traceback" not in message
    for name in BAD_INPUTS[case][1]:
        assert name in message, (name, message)
    assert list(rejected["cwds"][case].iterdir()) == []  # no runs/, no mlflow.db, no mlruns/


def test_resume_with_nothing_to_resume_does_not_create_the_out_dir(rejected):
    assert rejected["results"]["resume with nothing to resume"].returncode == 2
    assert not (rejected["root"] / "never-ran").exists()


def test_an_out_dir_holding_a_run_is_left_untouched_without_resume_or_with_another_config(rejected):
    assert rejected["results"]["existing out without resume"].returncode == 2
    assert rejected["results"]["resume with a changed config"].returncode == 2
    assert rejected["finished_after"] == rejected["finished_before"]


# ---- the teachers command ----------------------------------------------------------------------------


def test_teachers_prints_clean_and_pgd_accuracy_for_each_teacher(tiny_config_path, tiny_teachers, tmp_path):
    result = command("teachers", "--config", str(tiny_config_path), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for role in ("clean", "robust"):
        line = next((line for line in lines if line.split()[:1] == [role]), None)
        assert line is not None, result.stdout
        assert "clean 0." in line or "clean 1." in line
        assert "PGD-2" in line
    assert list(tmp_path.iterdir()) == []  # the cached teachers were reused, nothing new was written here
