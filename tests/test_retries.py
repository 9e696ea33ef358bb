"""Infra failures are retried from the checkpoint, a trial's own failures are final (docs/search.md,
"Outcomes"): a worker SIGKILLed twice still finishes as one trial everywhere; a diverging trial
starts once and shows one line, no traceback; a trial raising a code error is not started again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import optuna
import pytest
import ray.cloudpickle
import torch
from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError
from searchkit import EPOCHS, mlflow_runs, optuna_trials, ray_reports
from test_faults import DIVERGING_LR, spawn_search, tune_states, wait_for

from tune_mtard.errors import Diverged
from tune_mtard.search.trials import error_kind


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

    def first_report() -> bool:
        assert driver.poll() is None, driver.communicate()
        return any(ray_reports(folder).values())

    def second_worker() -> bool:
        assert driver.poll() is None, driver.communicate()
        fresh = sorted(trial_workers() - set(killed))
        for pid in fresh[:1]:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
        return bool(fresh)

    # First once it has reported an epoch (a checkpoint to resume from), then its next worker at once. A worker's
    # report waits until the driver takes it, so with the driver stopped the trial cannot finish before the kill,
    # however loaded the machine (the trial's epochs are seconds; a poll can come too late for them).
    wait_for(first_report, 300, "the trial's first report", every=0.1)
    driver.send_signal(signal.SIGSTOP)
    try:
        rows = [row for rows in ray_reports(folder).values() for row in rows]
        assert max(row["epoch"] for row in rows) < EPOCHS, rows  # the driver has not yet taken its last epoch
        killed.append(rows[0]["pid"])
        os.kill(rows[0]["pid"], signal.SIGKILL)
    finally:
        driver.send_signal(signal.SIGCONT)
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
