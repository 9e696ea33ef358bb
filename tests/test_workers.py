"""Data-parallel workers train as one process would (tune_mtard/distributed.py; docs/scale.md, "Workers").

Two real ``gloo`` processes, each training its shard of every batch, against one process on the whole batch:
the same balance trace and the same student within float tolerance, with synchronised BatchNorm; without it,
measurably not (so the comparison can fail). Then the commands on Ray Train's workers (``train.workers: 2``):
``train`` against one process, a search's records, and a SIGKILLed worker retried as an infra failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from searchkit import EPOCHS, child_env, mlflow_runs, optuna_trials, ray_reports
from test_faults import DIVERGING_LR, run_search, spawn_search, stopped_at_first_report, tune_states
from test_retries import trial_workers

from tune_mtard import files
from tune_mtard.config import load_config
from tune_mtard.distributed import Shard, shard_of
from tune_mtard.errors import ConfigError

WORKER = textwrap.dedent("""
    import sys

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from tune_mtard.config import load_config
    from tune_mtard.data import load_data
    from tune_mtard.distributed import Workers
    from tune_mtard.engine import Trainer
    from tune_mtard.models import create_model

    config, rank, size, init, out, sync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], \\
        sys.argv[6] == "sync"
    cfg = load_config(config, check_files=False).with_values({"train.epochs": 1, "method": sys.argv[7]})
    data = load_data(cfg)
    torch.manual_seed(123)  # the same random teachers in every process
    teachers = {"clean": create_model("digits_cnn_large", 10, 1), "robust": create_model("digits_cnn", 10, 1)}
    workers = None
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
        workers = Workers()
    trainer = Trainer(cfg, data, teachers, torch.device("cpu"), workers=workers, sync_batch_norm=sync)
    trainer.train_epoch()
    if rank == 0:
        torch.save({"trace": trainer.trace, "student": trainer.student.state_dict(),
                    "val": trainer.history[-1]["val_clean_acc"]}, out)
    if size > 1:
        dist.destroy_process_group()
""")


def run_workers(tmp_path, config, size: int, sync: bool, method: str, name: str) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, init = tmp_path / f"{name}.pt", tmp_path / f"{name}.init"
    procs = [subprocess.Popen([sys.executable, str(script), str(config), str(rank), str(size), str(init), str(out),
                               "sync" if sync else "local", method], stderr=subprocess.PIPE, text=True)
             for rank in range(size)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return torch.load(out, weights_only=True)


def largest_gap(a: dict, b: dict) -> tuple[float, float]:
    """The largest difference of the two runs' trace values and of their students' parameters and buffers."""
    trace = float((a["trace"] - b["trace"]).abs().nan_to_num(0.0).max())
    student = max(float((a["student"][k].double() - b["student"][k].double()).abs().max()) for k in a["student"])
    return trace, student


def test_shards_cut_a_batch_into_contiguous_parts_differing_by_at_most_one():
    assert [shard_of(119, r, 2) for r in range(2)] == [Shard(0, 60, 119), Shard(60, 119, 119)]
    assert [(s.start, s.stop) for s in (shard_of(10, r, 3) for r in range(3))] == [(0, 4), (4, 7), (7, 10)]
    assert sum(shard_of(10, r, 3).weight for r in range(3)) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["b-mtard", "mtard"])
def test_two_workers_train_as_one_process_does(tmp_path, tiny_config_path, method):
    # digits: 1,222 training images in batches of 128, so 9 steps of 64 + 64 rows and a last one of 35 + 35.
    one = run_workers(tmp_path, tiny_config_path, 1, True, method, "one")
    two = run_workers(tmp_path, tiny_config_path, 2, True, method, "two")
    assert one["trace"].shape == two["trace"].shape == (10, one["trace"].shape[1])
    trace_gap, student_gap = largest_gap(one, two)
    print(f"{method}: synced gap trace {trace_gap:.2e} student {student_gap:.2e}")
    # Measured: 6e-8 on the trace and 9e-8 on the student (b-mtard; mtard 4e-8, 6e-8): float32 sums in another
    # order. Without synchronised BatchNorm: 4e-5 and 4e-3.
    assert trace_gap < 1e-5 and student_gap < 1e-5, (trace_gap, student_gap)
    assert abs(one["val"] - two["val"]) <= 1 / 64  # the same validation, up to one of the 64 examples

    unsynced = run_workers(tmp_path, tiny_config_path, 2, False, method, "unsynced")
    trace_gap_unsynced, student_gap_unsynced = largest_gap(one, unsynced)
    print(f"{method}: unsynced gap trace {trace_gap_unsynced:.2e} student {student_gap_unsynced:.2e}")
    # Each worker's BatchNorm normalises by its half-batch's statistics: another model, visibly.
    assert max(trace_gap_unsynced, student_gap_unsynced) > 100 * max(trace_gap, student_gap, 1e-7)


# ---- the commands on Ray Train workers ------------------------------------------------------------------------

def _train(config, out, address, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune_mtard.train", "--config", str(config), "--out", str(out),
                           "--no-progress", "--address", address, "--set", "train.epochs=5", *extra],
                          env=child_env(), capture_output=True, text=True, timeout=900)


def test_train_on_two_ray_train_workers_is_the_one_process_run(tmp_path, tiny_config_path, tiny_teachers, ray_address):
    # digits: 10 steps an epoch (9 of 64 + 64 rows, a last one of 35 + 35), 5 epochs: the first 50 steps.
    one = _train(tiny_config_path, tmp_path / "one", ray_address, "--set", "mlflow.experiment=one-worker")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tiny_config_path, tmp_path / "two", ray_address, "--set", "train.workers=2",
                 "--set", "mlflow.experiment=two-workers")
    assert two.returncode == 0, two.stderr[-3000:]
    trace_one = np.loadtxt(tmp_path / "one" / "balance_trace.csv", delimiter=",", skiprows=1)
    trace_two = np.loadtxt(tmp_path / "two" / "balance_trace.csv", delimiter=",", skiprows=1)
    assert trace_one.shape == trace_two.shape == (50, 10)
    gap = np.abs(trace_one - trace_two) / np.maximum(np.abs(trace_one), 1e-6)
    print(f"largest relative gap of the balance traces over 50 steps: {np.nanmax(gap):.2e}")
    # Measured: 2e-7 (float32 sums over the shards in another order, as in the two-process test above); the
    # issue's bound is 1e-4, and without synchronised BatchNorm the gap is ~1e-3 (that test's unsynced case).
    assert np.nanmax(gap) < 1e-4
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("val_clean_acc", "val_robust_acc"):  # eval.n_examples 64: one image is 1/64
        assert abs(metrics_one[key] - metrics_two[key]) <= 1 / 64, key
    assert set(metrics_one) == set(metrics_two)
    assert not (tmp_path / "two" / ".workers").exists()  # Ray Train's own folder goes at the end

    client = MlflowClient(tracking_uri=load_config(tiny_config_path, check_files=False).mlflow.tracking_uri)
    for experiment in ("one-worker", "two-workers"):
        [record] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert record.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(record.info.run_id, "val_w_robust_acc")] == [1, 2, 3, 4, 5]
        assert "test_clean_acc" in record.data.metrics
        assert {"balance_trace.csv", "metrics.json", "model"} <= {a.path for a in client.list_artifacts(
            record.info.run_id)}
    assert record.data.params["train.workers"] == "2"


def test_a_search_with_two_workers_per_trial_keeps_complete_records(space_file, tmp_path, ray_address):
    # Each trial: 2 workers of 0.5 CPU (the session's Ray has 2 CPUs) and the trial itself, holding 0.01 CPU.
    name = "two-workers"
    code, out, err = run_search(space_file, tmp_path, name, "--num-samples", "2", "--set", "train.workers=2",
                                "--set", "search.resources.cpu=0.5", "--set", "search.max_concurrent=1",
                                "--set", "search.scheduler.type=fifo")
    assert code == 0, (out + err)[-4000:]
    folder = tmp_path / "results" / name
    reports = ray_reports(folder)
    assert len(reports) == 2 and all([r["epoch"] for r in rows] == [1, 2, 3] for rows in reports.values())
    assert all(0 <= r["val_w_robust_acc"] <= 1 and "entropy_gap" in r for rows in reports.values() for r in rows)
    for trial in folder.glob("train_bmtard_*"):  # checkpoints in the trial's folder, as a one-process trial's
        assert len(list(trial.glob(f"checkpoint_*/{files.TRIAL_STATE}"))) >= 1
        assert not list(trial.glob("workers-*"))
    assert [t.state for t in optuna_trials(folder, name)] == [TrialState.COMPLETE] * 2
    client, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and sorted(r.data.tags["trial_id"] for r in children) == sorted(reports)  # one per trial
    for record in children:
        rows = reports[record.data.tags["trial_id"]]
        history = client.get_metric_history(record.info.run_id, "val_w_robust_acc")
        assert {m.step: m.value for m in history} == pytest.approx({r["epoch"]: r["val_w_robust_acc"] for r in rows})
        assert record.info.status == "FINISHED"
        assert {"balance_trace.csv", "model"} <= {a.path for a in client.list_artifacts(record.info.run_id)}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["records"] == "complete" and summary["n_complete"] == 2


def test_a_sigkilled_worker_is_an_infra_failure_and_its_trial_resumes_from_its_checkpoint(space_file, tmp_path,
                                                                                          ray_address):
    name = "worker-killed"
    driver = spawn_search(space_file, tmp_path, name, ray_address, "--num-samples", "1", "--set", "train.workers=2",
                          "--set", "search.resources.cpu=0.5", "--set", "search.scheduler.type=fifo")
    folder = tmp_path / "results" / name

    # Once the trial has reported an epoch (a checkpoint to resume from).
    with stopped_at_first_report(driver, folder):
        workers = sorted(trial_workers(b"RayTrainWorker"))
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, out + err
    [trial_id] = tune_states(folder)
    assert tune_states(folder) == {trial_id: "TERMINATED"}
    rows = ray_reports(folder)[trial_id]
    assert rows[-1]["epoch"] == EPOCHS and rows[-1]["resumed_from_epoch"] >= 1  # it went on from its checkpoint
    [trial_folder] = folder.glob("train_bmtard_*")
    errors = (trial_folder / "error.txt").read_text()
    assert errors.count("Failure # ") == 1 and "WorkerLostError" in errors
    assert out.count(f"trial {trial_id}: infra failure") == 1 and "Traceback" not in out + err
    [study_trial] = optuna_trials(folder, name)
    assert study_trial.state == TrialState.COMPLETE and "failure_kind" not in study_trial.user_attrs
    _, _, children = mlflow_runs(tmp_path, name)
    assert [(run.data.tags["trial_id"], run.info.status) for run in children] == [(trial_id, "FINISHED")]


def test_train_resumed_on_two_workers_continues_as_one_process_run_never_stopped(tmp_path, tiny_config_path,
                                                                                 tiny_teachers, ray_address):
    # No milestones: the learning rate is the same whatever train.epochs, which the resume raises from 2 to 4.
    steady = ("--set", "train.lr_milestones=[]", "--set", "mlflow.experiment=resumed-workers")
    first = _train(tiny_config_path, tmp_path / "two", ray_address, "--set", "train.workers=2", *steady,
                   "--set", "train.epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(tiny_config_path, tmp_path / "two", ray_address, "--set", "train.workers=2", *steady,
                     "--set", "train.epochs=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _train(tiny_config_path, tmp_path / "one", ray_address, *steady[:2], "--set", "train.epochs=4",
                   "--set", "mlflow.experiment=whole-one-worker")
    assert whole.returncode == 0, whole.stderr[-3000:]
    trace_two = np.loadtxt(tmp_path / "two" / "balance_trace.csv", delimiter=",", skiprows=1)
    trace_one = np.loadtxt(tmp_path / "one" / "balance_trace.csv", delimiter=",", skiprows=1)
    assert trace_two.shape == trace_one.shape == (40, 10)
    gap = np.abs(trace_one - trace_two) / np.maximum(np.abs(trace_one), 1e-6)
    print(f"resumed on two workers: largest relative trace gap {np.nanmax(gap):.2e}")
    assert np.nanmax(gap) < 1e-4
    client = MlflowClient(tracking_uri=load_config(tiny_config_path, check_files=False).mlflow.tracking_uri)
    [record] = client.search_runs([client.get_experiment_by_name("resumed-workers").experiment_id])
    assert record.info.status == "FINISHED"  # one run, reopened by the resume
    assert [m.step for m in client.get_metric_history(record.info.run_id, "val_w_robust_acc")] == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides, key, words", [
    (["train.workers=0"], "train.workers", "must be >= 1"),
    (["train.workers=1.5"], "train.workers", "expected an integer"),
    (["train.workers=3"], "data.batch_size", "must divide into train.workers = 3"),  # 128 is the global batch
    (["train.workers=2", "data.batch_size=65"], "data.batch_size", "must divide"),
])
def test_train_workers_is_an_integer_that_divides_the_global_batch(tiny_config_path, overrides, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(tiny_config_path, overrides, check_files=False)
    assert error.value.key == key and words in str(error.value)
    assert load_config(tiny_config_path, ["train.workers=4"], check_files=False).train.workers == 4


def test_a_trial_holds_its_workers_resources_and_a_search_refuses_one_that_cannot_fit(space_file):
    from tune_mtard.search.resources import check_workers_fit, trial_resources

    cfg = load_config(space_file, ["train.workers=2", "search.resources.cpu=1"], check_files=False)
    assert trial_resources(cfg) == {"cpu": 0.01}  # the trial only waits; each worker holds search.resources
    assert trial_resources(load_config(space_file, check_files=False)) == {"cpu": 1, "gpu": 0}
    check_workers_fit(cfg, 3, 0, "this machine")
    with pytest.raises(ConfigError) as error:
        check_workers_fit(cfg, 2, 0, "this machine")  # 2 x 1 CPU and the trial's 0.01
    assert error.value.key == "train.workers" and "need 2.01 CPU" in str(error.value)


def test_a_trial_diverging_on_two_workers_is_recorded_as_diverged_once(space_file, tmp_path, ray_address):
    name = "workers-diverge"
    code, out, err = run_search(space_file, tmp_path, name, "--num-samples", "1", "--set", "train.workers=2",
                                "--set", "search.resources.cpu=0.5",
                                "--set", f"space.train.lr={{type: categorical, choices: [{DIVERGING_LR}]}}")
    assert code == 1, (out + err)[-3000:]  # its only trial diverged: no usable trial
    folder = tmp_path / "results" / name
    [trial_folder] = folder.glob("train_bmtard_*")
    assert (trial_folder / "error.txt").read_text().count("Failure # ") == 1  # not retried
    assert (trial_folder / "balance_trace.csv").is_file()  # the steps up to the divergence, as one process leaves
    _, _, [child] = mlflow_runs(tmp_path, name)
    assert child.info.status == "FAILED" and child.data.tags["failure_kind"] == "diverged"
