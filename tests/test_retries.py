"""Infra failures are retried from the checkpoint, a trial's own failures are final (docs/search.md,
"Outcomes"): a worker SIGKILLed twice still finishes as one trial everywhere; a diverging trial
starts once and shows one line, no traceback; a trial raising a code error is not started again; and
``--resume --retry-errored`` runs the infra-failed trials of a finished search again, and only those
("Retrying infra failures")."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sys
from pathlib import Path

import optuna
import pytest
import ray.cloudpickle
import torch
import yaml
from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError
from searchkit import EPOCHS, mlflow_runs, optuna_trials, ray_reports
from test_faults import (
    DIVERGING_LR,
    nothing_written,
    run_search,
    spawn_search,
    stopped_at_first_report,
    tune_states,
    wait_for,
)

from tune_mtard.errors import Diverged
from tune_mtard.search.retry import infra_failed
from tune_mtard.search.trials import TrialSummary, error_kind


@pytest.mark.parametrize("error, kind", [
    (ActorDiedError(), "infra"),
    (RayTaskError("train", "tb", ActorDiedError()), "infra"),
    (RayTaskError("train", "tb", OutOfMemoryError("the node ran low on memory")), "infra"),
    (RayTaskError("train", "tb", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")), "infra"),
    (RayTaskError("train", "tb", OSError(28, "No space left on device")), "infra"),
    (RayTaskError("train", "tb", ValueError("bad shape")), "trial"),
    (RayTaskError("train", "tb", Diverged(3, 1)), "trial"),
    (RayTaskError("train", "a traceback through ray/exceptions.py naming ActorDiedError", KeyError("x")), "trial"),
])
def test_an_error_is_infra_only_when_the_machinery_around_the_trial_failed(error, kind):
    assert error_kind(error) == kind


# The trainables below go to Ray's workers by value: they cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _starts(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def _dies_twice(config):
    """Kills its own worker process on its first two starts, then finishes."""
    marker = Path(config["marker"])
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\n")
    if _starts(marker) <= 2:
        os.kill(os.getpid(), signal.SIGKILL)
    from ray import tune

    tune.report({"score": 1.0})


def _raises(config):
    """A bug of the trial's own code."""
    with Path(config["marker"]).open("a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("a bug in the trial")


@pytest.mark.parametrize("trainable, retries, status, starts, failures", [
    (_dies_twice, 5, "TERMINATED", 3, 2),
    (_dies_twice, 1, "ERROR", 2, 2),  # this session's count, not the one the Tuner was built with (5)
    (_raises, 5, "ERROR", 1, 1),
])
def test_ray_retries_a_dead_worker_up_to_the_count_but_never_a_trial_error(ray_address, tmp_path, trainable, retries,
                                                                           status, starts, failures):
    from ray import tune

    from tune_mtard.search.failures import retry_infra_failures_only

    retry_infra_failures_only(retries)
    marker = tmp_path / "starts.txt"
    grid = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"marker": str(marker)},
                      run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="rule", verbose=0,
                                                failure_config=tune.FailureConfig(max_failures=5))).fit()
    assert [str(t.status) for t in tune.ExperimentAnalysis(str(tmp_path / "ray" / "rule")).trials] == [status]
    assert _starts(marker) == starts and len(set(marker.read_text().split())) == starts  # a new worker each
    error_file = Path(grid[0].path) / "error.txt"
    assert error_file.read_text().count("Failure # ") == failures


def trial_workers(actor: bytes = b"ImplicitFunc") -> set[int]:
    """The pids of the trial actors (or other ``actor`` processes) this test session's Ray runs (its own
    descendants only, never another session's workers on the same machine)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    workers = set()
    for pid in mine:
        with contextlib.suppress(OSError):
            if actor in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.add(pid)
    return workers


def test_a_trial_whose_worker_is_sigkilled_twice_resumes_from_its_checkpoint_and_finishes(space_file, ray_address,
                                                                                        tmp_path):
    name = "killed_twice"
    driver = spawn_search(space_file, tmp_path, name, ray_address, "--num-samples", "1", "--set",
                          "search.scheduler.type=fifo")
    folder = tmp_path / "results" / name
    killed: list[int] = []

    def second_worker() -> bool:
        assert driver.poll() is None, driver.communicate()
        fresh = sorted(trial_workers() - set(killed))
        for pid in fresh[:1]:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
        return bool(fresh)

    # First once it has reported an epoch (a checkpoint to resume from), then its next worker at once.
    with stopped_at_first_report(driver, folder) as rows:
        killed.append(rows[0]["pid"])
        os.kill(rows[0]["pid"], signal.SIGKILL)
    wait_for(second_worker, 300, "the trial's second worker", every=0.1)
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, out + err
    [trial_id] = tune_states(folder)
    assert tune_states(folder) == {trial_id: "TERMINATED"}
    rows = ray_reports(folder)[trial_id]
    last_worker = [row for row in rows if row["pid"] not in killed]
    assert rows[-1]["epoch"] == EPOCHS and last_worker and rows[-1] in last_worker
    assert all(row["resumed_from_epoch"] >= 1 for row in last_worker)  # it went on from its checkpoint
    [trial_folder] = folder.glob("train_bmtard_*")
    assert (trial_folder / "error.txt").read_text().count("Failure # ") == 2
    [study_trial] = optuna_trials(folder, name)
    assert study_trial.state == optuna.trial.TrialState.COMPLETE and "failure_kind" not in study_trial.user_attrs
    _, _, children = mlflow_runs(tmp_path, name)
    assert [(run.data.tags["trial_id"], run.info.status) for run in children] == [(trial_id, "FINISHED")]
    assert out.count(f"trial {trial_id}: infra failure") == 2 and "Traceback" not in out + err
    assert json.loads((folder / "summary.json").read_text())["n_failed"] == 0


def test_a_diverging_trial_starts_once_and_shows_one_line_without_a_traceback(space_file, ray_address, tmp_path):
    name = "diverges_once"
    driver = spawn_search(space_file, tmp_path, name, ray_address, "--num-samples", "1", "--set",
                          f"space.train.lr={{type: categorical, choices: [{DIVERGING_LR}]}}")
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 1, out + err  # its only trial diverged: no usable trial
    folder = tmp_path / "results" / name
    [trial_id] = tune_states(folder)
    [trial_folder] = folder.glob("train_bmtard_*")
    # A second start would fail again at once (diverged.json) and add a second failure to Ray's record.
    assert (trial_folder / "error.txt").read_text().count("Failure # ") == 1
    assert "Traceback" not in out + err
    assert len([line for line in out.splitlines() if line.startswith(f"trial {trial_id} failed (diverged)")]) == 1
    _, _, [child] = mlflow_runs(tmp_path, name)
    assert child.info.status == "FAILED" and child.data.tags["failure_kind"] == "diverged"
    client, _, _ = mlflow_runs(tmp_path, name)
    assert "error.txt" in {a.path for a in client.list_artifacts(child.info.run_id)}  # the traceback is kept


def test_resume_with_more_samples_runs_the_new_trials_and_refuses_fewer(space_file, ray_address, tmp_path):
    name = "grows"
    flags = ("--set", "search.scheduler.type=fifo", "--set", "search.sampler.type=random")
    first = spawn_search(space_file, tmp_path, name, ray_address, "--num-samples", "1", *flags)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    folder = tmp_path / "results" / name
    [kept] = tune_states(folder)
    fewer = spawn_search(space_file, tmp_path, name, ray_address, "--resume", "--num-samples", "1", *flags)
    assert fewer.communicate(timeout=600) and fewer.returncode == 0  # the same count: nothing to change
    assert set(tune_states(folder)) == {kept}
    more = spawn_search(space_file, tmp_path, name, ray_address, "--resume", "--num-samples", "2", *flags)
    out, err = more.communicate(timeout=600)
    assert more.returncode == 0, out + err
    states = tune_states(folder)
    assert kept in states and len(states) == 2 and set(states.values()) == {"TERMINATED"}
    study = optuna_trials(folder, name)
    assert sorted(t.user_attrs["ray_trial_id"] for t in study) == sorted(states)
    assert {t.state for t in study} == {optuna.trial.TrialState.COMPLETE}
    _, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and sorted(r.data.tags["trial_id"] for r in children) == sorted(states)
    fewer = spawn_search(space_file, tmp_path, name, ray_address, "--resume", "--num-samples", "1", *flags)
    out, err = fewer.communicate(timeout=600)
    assert fewer.returncode == 2 and err.strip().splitlines() == [
        "error: --num-samples: 1 is fewer than the 2 trials of the search being resumed; a resumed search can run "
        "more trials, never fewer"], err


def test_retry_errored_chooses_the_infra_failures_only():
    trials = [TrialSummary("lost", {}, failed=True, epochs=1, failure="ActorDiedError: the actor died", kind="infra"),
              TrialSummary("oom", {}, failed=True, epochs=1, failure="OutOfMemoryError: CUDA out of memory"),
              TrialSummary("bug", {}, failed=True, epochs=1, failure="ValueError: bad shape"),
              TrialSummary("nan", {}, failed=True, epochs=1, failure="diverged at step 3 (epoch 1)",
                           diverged={"diverged_step": 3, "diverged_epoch": 1}),
              TrialSummary("done", {}, failed=False, epochs=3)]
    assert infra_failed(trials) == ["lost", "oom"]


def _trials_csv(folder: Path) -> dict[str, dict[str, str]]:
    return {row["trial_id"]: row for row in csv.DictReader((folder / "trials.csv").open())}


def test_resume_retry_errored_runs_the_infra_failed_trial_again_and_leaves_the_diverged_ones_failed(
        space_file, ray_address, tmp_path):
    name = "retry_errored"
    flags = ("--num-samples", "3", "--set", "search.scheduler.type=fifo", "--set", "search.sampler.type=random",
             "--set", "search.sampler.seed=1", "--set", "search.max_failures=0", "--set",
             f"space.train.lr={{type: categorical, choices: [0.05, {DIVERGING_LR}]}}")
    driver = spawn_search(space_file, tmp_path, name, ray_address, *flags)
    folder = tmp_path / "results" / name

    # Killed once it has a checkpoint, with the driver stopped so that the trial cannot finish first; with no
    # retries left (max_failures=0) it ends ERROR, failure_kind infra.
    with stopped_at_first_report(driver, folder) as rows:
        first = rows[0]
        assert first["epoch"] < EPOCHS
        killed = first["trial_id"]
        os.kill(first["pid"], signal.SIGKILL)
    out, err = driver.communicate(timeout=600)
    # The first trial (the base config's lr, 0.05) is the one killed; the sampler's two others draw the diverging lr.
    assert driver.returncode == 1, out + err
    before = _trials_csv(folder)
    assert before[killed]["state"] == "FAIL" and before[killed]["failure_kind"] == "infra", before
    diverged = set(before) - {killed}
    assert tune_states(folder)[killed] == "ERROR"  # Ray's saved state too, though its worker died
    assert len(diverged) == 2 and all(before[tid]["failure_kind"] == "diverged" for tid in diverged), before
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "no_usable_trial" and summary["n_failed"] == 3 and summary["best_trial_id"] is None

    retry = spawn_search(space_file, tmp_path, name, ray_address, "--resume", "--retry-errored", *flags)
    out, err = retry.communicate(timeout=600)
    assert retry.returncode == 0, out + err
    assert f"infra-failed trial(s) run again from their last checkpoint: {killed}" in out
    # Ray Tune: the same trial, resumed from its checkpoint to the last epoch; the diverged ones still ERROR.
    states = tune_states(folder)
    assert states == {tid: "ERROR" if tid in diverged else "TERMINATED" for tid in before}
    rows = ray_reports(folder)[killed]
    assert rows[-1]["epoch"] == EPOCHS and rows[-1]["resumed_from_epoch"] >= 1
    before_kill = max(r["epoch"] for r in rows if r["pid"] == first["pid"])
    [resumed, *_] = [r for r in rows if r["pid"] != first["pid"]]  # on from its last checkpoint, not from epoch 0
    assert 1 <= resumed["resumed_from_epoch"] == resumed["epoch"] <= before_kill
    # Optuna: the FAIL trial stays; its retry is a new trial with the same params, told COMPLETE.
    study = optuna_trials(folder, name)
    by_ray = {}
    for t in study:
        by_ray.setdefault(t.user_attrs["ray_trial_id"], []).append(t)
    assert sorted(by_ray) == sorted(before)
    failed, retried = by_ray[killed]
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs["failure_kind"] == "infra"
    assert retried.state == optuna.trial.TrialState.COMPLETE and retried.user_attrs["retry_of"] == failed.number
    assert retried.params == failed.params and "failure_kind" not in retried.user_attrs
    assert sorted(retried.intermediate_values) == list(range(1, EPOCHS + 1))
    assert retried.value == rows[-1]["val_w_robust_acc"]
    assert all(len(by_ray[tid]) == 1 and by_ray[tid][0].state == optuna.trial.TrialState.FAIL for tid in diverged)
    # MLflow: the same child run, reopened and FINISHED, every epoch once, the failure's tags gone.
    client, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and sorted(r.data.tags["trial_id"] for r in children) == sorted(before)
    [child] = [r for r in children if r.data.tags["trial_id"] == killed]
    assert child.info.status == "FINISHED" and child.data.tags["trial_state"] == "COMPLETE"
    assert "failure_kind" not in child.data.tags and "failure" not in child.data.tags
    assert child.data.tags["retried_failure_kind"] == "infra"
    history = client.get_metric_history(child.info.run_id, "val_w_robust_acc")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert "model" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert all(r.info.status == "FAILED" and r.data.tags["failure_kind"] == "diverged"
               for r in children if r.data.tags["trial_id"] in diverged)
    # summary.json and trials.csv: the retried trial is a result, here the best; n_failed dropped by one.
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["n_failed"] == 2 and summary["best_trial_id"] == killed
    assert {f["trial_id"] for f in summary["failed_trials"]} == diverged
    assert summary["best_val_w_robust_acc"] == rows[-1]["val_w_robust_acc"]
    assert (folder / "best_config.yaml").is_file()
    after = _trials_csv(folder)
    assert after[killed]["state"] == "COMPLETE" and after[killed]["failure_kind"] == ""
    assert all(after[tid]["failure_kind"] == "diverged" for tid in diverged)

    again = spawn_search(space_file, tmp_path, name, ray_address, "--resume", "--retry-errored", *flags,
                         "--set", "search.max_failures=4")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, out + err
    assert "--retry-errored: no trial of this search failed as infra; resuming it as --resume does" in out
    assert tune_states(folder) == states and len(optuna_trials(folder, name)) == len(study)
    # The retry count a resume applied is the saved search's from then on (a --resume of search_space.yaml keeps it).
    assert yaml.safe_load((folder / "search_space.yaml").read_text())["search"]["max_failures"] == 4


def test_retry_errored_without_resume_is_refused_before_anything_is_written(space_file, tmp_path):
    code, out, err = run_search(space_file, tmp_path, "no_resume", "--retry-errored")
    assert code == 2 and err.strip().splitlines() == [
        "error: --retry-errored: retries the infra-failed trials of a search that ran: pass it with --resume"], err
    assert nothing_written(tmp_path)
