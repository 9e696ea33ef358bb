"""A failure is never reported as a result (docs/search.md, "Outcomes"): every way a search or a run can go
wrong ends honestly, in all three records (Ray Tune's folder, the Optuna study, MLflow) and the files.

One test per failure of issue 12: diverging trials, a searched range without the default, --max-epochs below
ASHA's grace period, SIGINT and SIGTERM, two drivers, --resume while running, the teacher cache race, keys a
trial cannot vary, a stale Ray address file, and the exported config reproducing its trial bit for bit.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from searchkit import EPOCHS, child_env, mlflow_runs, optuna_trials, ray_reports, search_args, tracking_uri

from tune_mtard.cli import search, train
from tune_mtard.cli.common import run
from tune_mtard.search.lock import holder

DIVERGING_LR = 1000000.0


def run_search(space: Path, root: Path, name: str, *extra: str) -> tuple[int, str, str]:
    """The search command in-process on the session's Ray: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run(search.main, search_args(space, root, name, *extra))
    return exit_info.value.code, out.getvalue(), err.getvalue()


def spawn_search(space: Path, root: Path, name: str, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tune_mtard.search", *search_args(space, root, name, *extra),
                             "--address", address], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def stopped_at_first_report(driver: subprocess.Popen, folder: Path):
    """Wait for a trial's first report, then hold the driver (SIGSTOP) until the block ends, and yield every
    report so far. A function trainable's report waits until the driver takes it, so with the driver stopped no
    trial can finish before the block kills one, however loaded the machine (a trial's epochs are seconds; a
    poll can come too late for them)."""
    def first_report() -> bool:
        assert driver.poll() is None, driver.communicate()
        return any(ray_reports(folder).values())

    wait_for(first_report, 300, "a trial's first report", every=0.1)
    driver.send_signal(signal.SIGSTOP)
    try:
        rows = [row for rows in ray_reports(folder).values() for row in rows]
        assert max(row["epoch"] for row in rows) < EPOCHS, rows  # the driver has not yet taken a last epoch
        yield rows
    finally:
        driver.send_signal(signal.SIGCONT)


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def tune_states(folder: Path) -> dict[str, str]:
    """Trial id -> status in Ray Tune's own saved experiment state (what a resume starts from)."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: str(t.status) for t in ExperimentAnalysis(str(folder)).trials}


def nothing_written(root: Path) -> bool:
    return not (root / "results").exists() and not (root / "mlflow.db").exists()


# ---- diverging trials ------------------------------------------------------------------------------------


def test_diverged_trials_fail_in_tune_optuna_and_mlflow_and_are_never_the_best(space_file, ray_address, tmp_path):
    """A categorical learning rate where 1e6 diverges: those trials are Tune ERROR, Optuna FAIL, MLflow FAILED with
    where they diverged; the search still finishes (exit 0) on the trial that trained."""
    name = "diverging"
    code, out, _ = run_search(space_file, tmp_path, name, "--num-samples", "3", "--set", "search.sampler.type=random",
                              "--set", "search.sampler.seed=1", "--set",
                              f"space.train.lr={{type: categorical, choices: [0.05, {DIVERGING_LR}]}}")
    folder = tmp_path / "results" / name
    assert code == 0, out
    client, parents, children = mlflow_runs(tmp_path, name)
    lr = {run.data.tags["trial_id"]: float(run.data.params["train.lr"]) for run in children}
    diverging = {tid for tid, value in lr.items() if value == DIVERGING_LR}
    assert diverging and diverging != set(lr)
    states = tune_states(folder)
    optuna_states = {t.user_attrs["ray_trial_id"]: t.state for t in optuna_trials(folder, name)}
    kinds = {t.user_attrs["ray_trial_id"]: t.user_attrs.get("failure_kind") for t in optuna_trials(folder, name)}
    csv_kinds = {row["trial_id"]: row["failure_kind"] for row in csv.DictReader((folder / "trials.csv").open())}
    for record in children:
        tid = record.data.tags["trial_id"]
        if tid in diverging:
            assert states[tid] == "ERROR" and optuna_states[tid] == optuna.trial.TrialState.FAIL
            assert record.info.status == "FAILED" and record.data.tags["failure"] == "diverged"
            assert record.data.tags["failure_kind"] == "diverged" and kinds[tid] == "diverged"
            assert csv_kinds[tid] == "diverged"
            step, epoch = int(record.data.tags["diverged_step"]), int(record.data.tags["diverged_epoch"])
            assert step >= 1 and epoch == 1
            trace = Path(client.download_artifacts(record.info.run_id, "balance_trace.csv", str(tmp_path / tid)))
            assert len(trace.read_text().splitlines()) == 1 + step  # the trace up to the step that diverged
        else:
            assert states[tid] == "TERMINATED" and optuna_states[tid] == optuna.trial.TrialState.COMPLETE
            assert record.info.status == "FINISHED" and "failure_kind" not in record.data.tags
            assert csv_kinds[tid] == "" and kinds[tid] is None
    s = summary(folder)
    assert s["status"] == "finished" and s["n_diverged"] == len(diverging) and s["n_failed"] == len(diverging)
    assert {f["trial_id"] for f in s["failed_trials"]} == diverging
    assert {f["failure_kind"] for f in s["failed_trials"]} == {"diverged"}
    assert parents[0].data.tags["best_trial_id"] not in diverging and parents[0].info.status == "FINISHED"
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best["train"]["lr"] == 0.05
    assert "diverged at step" in out


def test_a_range_without_the_default_is_clipped_and_a_search_where_every_trial_diverges_has_no_result(
        space_file, ray_address, tmp_path):
    """train.lr searched in [1e5, 1e6], which leaves the base config's 0.05 out: the first trial takes the
    range's nearest end instead of crashing; every trial diverges, so the search ends `no_usable_trial`: exit 1,
    no best_config.yaml, the parent run FAILED."""
    name = "all-diverge"
    code, out, err = run_search(space_file, tmp_path, name, "--num-samples", "2", "--set",
                                "space.train.lr={type: float, low: 1.0e5, high: 1.0e6, log: true}")
    folder = tmp_path / "results" / name
    assert code == 1
    assert "the first trial uses train.lr = 100000.0" in out
    assert "no usable trial" in err
    assert not (folder / "best_config.yaml").exists()
    s = summary(folder)
    assert s["status"] == "no_usable_trial" and s["n_trials"] == s["n_diverged"] == 2 and s["best_trial_id"] is None
    _, parents, children = mlflow_runs(tmp_path, name)
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["search_status"] == "no_usable_trial"
    assert sorted(float(r.data.params["train.lr"]) for r in children)[0] == 1.0e5
    assert {r.info.status for r in children} == {"FAILED"}
    assert {t.state for t in optuna_trials(folder, name)} == {optuna.trial.TrialState.FAIL}
    assert set(tune_states(folder).values()) == {"ERROR"}


def test_train_that_diverges_exits_1_naming_the_step_and_records_a_failed_run(tiny_config_path, tiny_teachers,
                                                                               tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tune_mtard.train", "--config", str(tiny_config_path), "--out",
                             str(out), "--set", f"train.lr={DIVERGING_LR}", "--tracking-uri", tracking_uri(tmp_path),
                             "--no-progress"], env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: diverged: ")
    assert "Traceback" not in result.stderr
    step = int(result.stderr.split("at step ")[1].split()[0])
    assert len((out / "balance_trace.csv").read_text().splitlines()) == 1 + step
    assert not (out / "metrics.json").exists() and not (out / "student.pt").exists()
    _, runs, _ = mlflow_runs(tmp_path, "tiny-digits")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["diverged_step"] == str(step)


@pytest.mark.parametrize("change, message", [
    (f"teachers.robust.lr={DIVERGING_LR}", "diverged"),
    ("teachers.robust.lr=1.0e-12", "chance accuracy"),
])
def test_a_teacher_that_diverges_or_ends_at_chance_is_not_cached(tiny_config_path, tmp_path, change, message):
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "tune_mtard.teachers", "--config", str(tiny_config_path),
                             "--roles", "robust", "--set", f"teachers.cache_dir={cache}", "--set", change,
                             "--set", "teachers.robust.epochs=1", "--no-progress"],
                            env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert list(cache.glob("*.pt")) == []


# ---- bad input, before anything is written -----------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["space.data.val_fraction={type: float, low: 0.1, high: 0.3}"], "space.data.val_fraction"),
    (["space.seed={type: int, low: 0, high: 3}"], "space.seed"),
    (["space.teachers.robust.epochs={type: int, low: 2, high: 4}"], "space.teachers.robust.epochs"),
    (["space.mlflow.experiment={type: categorical, choices: [a, b]}"], "space.mlflow.experiment"),
    (["space.eval.n_examples={type: int, low: 16, high: 64}"], "space.eval.n_examples"),
    (["search.metric=val_accuracy"], "search.metric"),
    (["search.resources.cpu=64"], "search.resources"),
    (["search.scheduler.grace_period=5"], "search.scheduler.grace_period"),
])
def test_a_search_that_could_not_run_as_asked_exits_2_in_one_line_before_anything_is_written(
        space_file, ray_address, tmp_path, overrides, key):
    extra = [item for override in overrides for item in ("--set", override)]
    code, out, err = run_search(space_file, tmp_path, "bad", *extra)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and key in err and "Traceback" not in err
    assert nothing_written(tmp_path)


def test_max_epochs_below_the_grace_period_lowers_it_and_says_so(space_file, ray_address, tmp_path):
    name = "short"
    code, out, _ = run_search(space_file, tmp_path, name, "--num-samples", "2", "--max-epochs", "2",
                              "--set", "search.scheduler.grace_period=3")
    assert code == 0, out
    assert "--max-epochs 2: ASHA's grace_period 3 lowered to 2" in out
    saved = yaml.safe_load((tmp_path / "results" / name / "search_space.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["search"]["scheduler"]["grace_period"] == 2
    assert summary(tmp_path / "results" / name)["status"] == "finished"


def test_an_unreachable_address_exits_2_within_seconds(space_file, tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tune_mtard.search", *search_args(space_file, tmp_path, "far"),
                             "--address", "127.0.0.1:1"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and time.monotonic() - start < 60
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--address" in result.stderr
    assert nothing_written(tmp_path)


def test_a_stale_ray_address_file_is_ignored_without_address(space_file, tmp_path):
    """A `ray start` cluster that died left its address file: a search without --address starts its own Ray."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    env = {**child_env(), "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    name = "stale"
    try:
        result = subprocess.run([sys.executable, "-m", "tune_mtard.search", *search_args(space_file, tmp_path, name),
                                 "--num-samples", "1", "--set", "train.epochs=1",
                                 "--set", "search.scheduler.grace_period=1"],
                                env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(tmp_path / "results" / name)["status"] == "finished"


# ---- interrupts -------------------------------------------------------------------------------------------


def interrupt(space_file: Path, root: Path, name: str, address: str, signum: int) -> subprocess.Popen:
    """A search of 3 trials x 6 epochs, signalled once its first trial has reported."""
    folder = root / "results" / name
    process = spawn_search(space_file, root, name, address, "--num-samples", "3", "--set", "train.epochs=6",
                           "--set", "search.scheduler.type=fifo")
    wait_for(lambda: any(ray_reports(folder).values()) if folder.exists() else False, 300, "a first report")
    process.send_signal(signum)
    process.communicate(timeout=300)
    return process


def test_sigint_stops_the_search_honestly_and_resume_finishes_it(space_file, ray_address, tmp_path):
    name = "ctrl-c"
    folder = tmp_path / "results" / name
    process = interrupt(space_file, tmp_path, name, ray_address, signal.SIGINT)
    assert process.returncode == 130
    assert not (folder / "best_config.yaml").exists()
    s = summary(folder)
    assert s["status"] == "interrupted" and s["n_unfinished"] >= 1
    _, parents, children = mlflow_runs(tmp_path, name)
    assert parents[0].info.status == "KILLED"
    assert children and "RUNNING" not in {r.info.status for r in children}
    assert "KILLED" in {r.info.status for r in children}
    unfinished = {tid for tid, state in tune_states(folder).items() if state in ("RUNNING", "PENDING")}
    assert unfinished  # saved as unfinished: a resume continues them
    optuna_states = {t.user_attrs.get("ray_trial_id"): t.state for t in optuna_trials(folder, name)}
    assert all(optuna_states[tid] == optuna.trial.TrialState.RUNNING for tid in unfinished if tid in optuna_states)

    code, out, _ = run_search(space_file, tmp_path, name, "--resume", "--num-samples", "3", "--set", "train.epochs=6",
                              "--set", "search.scheduler.type=fifo")
    assert code == 0, out
    assert summary(folder)["status"] == "finished" and (folder / "best_config.yaml").exists()
    _, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
    assert {t.state for t in optuna_trials(folder, name)} == {optuna.trial.TrialState.COMPLETE}


def test_sigterm_stops_the_search_with_exit_143_and_killed_records(space_file, ray_address, tmp_path):
    name = "term"
    folder = tmp_path / "results" / name
    process = interrupt(space_file, tmp_path, name, ray_address, signal.SIGTERM)
    assert process.returncode == 143
    assert summary(folder)["status"] == "interrupted" and not (folder / "best_config.yaml").exists()
    _, parents, children = mlflow_runs(tmp_path, name)
    assert parents[0].info.status == "KILLED" and "RUNNING" not in {r.info.status for r in children}


# ---- one driver per search ---------------------------------------------------------------------------------


def test_a_second_driver_or_a_resume_of_a_running_search_exits_2_naming_the_running_process(
        space_file, ray_address, tmp_path):
    name = "busy"
    folder = tmp_path / "results" / name
    flags = ("--num-samples", "2", "--set", "train.epochs=4", "--set", "search.scheduler.type=fifo")
    first = spawn_search(space_file, tmp_path, name, ray_address, *flags)
    wait_for(lambda: holder(folder) is not None, 300, "the first driver's lock")
    for extra in ((), ("--resume",)):
        code, _, err = run_search(space_file, tmp_path, name, *flags, *extra)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and f"process {first.pid}" in err
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    _, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert len(optuna_trials(folder, name)) == 2


def test_a_driver_that_fails_in_its_own_setup_leaves_its_parent_run_failed_and_its_name_reusable(
        space_file, ray_address, tmp_path, monkeypatch):
    from tune_mtard.search import driver

    name = "setup-fails"

    def broken_tuner(*args, **kwargs):
        raise RuntimeError("the tuner could not be built")

    monkeypatch.setattr(driver, "new_tuner", broken_tuner)
    with pytest.raises(RuntimeError, match="could not be built"):
        search.main(search_args(space_file, tmp_path, name, "--num-samples", "1"))
    _, parents, _ = mlflow_runs(tmp_path, name)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert not (tmp_path / "results" / name).exists()

    monkeypatch.undo()
    code, out, _ = run_search(space_file, tmp_path, name, "--num-samples", "1")
    assert code == 0, out
    _, parents, _ = mlflow_runs(tmp_path, name)
    assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]


def test_two_processes_needing_the_same_teacher_both_succeed_and_train_it_once(tiny_config_path, tmp_path):
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "tune_mtard.teachers", "--config", str(tiny_config_path), "--roles", "robust",
               "--set", f"teachers.cache_dir={cache}", "--set", "teachers.robust.epochs=2", "--no-progress"]
    processes = [subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    statuses = sorted(next(line for line in out.splitlines() if line.startswith("robust ")).split()[2]
                      for out, _ in outputs)
    assert statuses == ["exists", "trained"]
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.partial")) and not list(cache.glob(".*.*"))


# ---- restarts ----------------------------------------------------------------------------------------------


def test_a_restarted_trial_skips_a_torn_checkpoint_but_fails_on_one_that_does_not_load(tmp_path, monkeypatch,
                                                                                       tiny_config, tiny_digits):
    from tune_mtard.engine import Trainer
    from tune_mtard.search import trial as bmtard

    trial_dir = "train_bmtard_aa11bb22_1_x_2026-11-29"
    good, torn, foreign = (tmp_path / trial_dir / f"checkpoint_00000{i}" for i in range(3))
    trainer = Trainer(tiny_config.with_values({"method": "natural", "train.epochs": 1}), tiny_digits)
    for folder, epoch in ((good, 1), (torn, 2), (foreign, 3)):
        folder.mkdir(parents=True)
        (folder / ".metadata.json").write_text(json.dumps({"epoch": epoch}))
    trainer.epoch = 1
    trainer.save(good / "state.pt")
    (torn / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setattr(bmtard.compat, "trial_storage", lambda: (__import__("pyarrow.fs").fs.LocalFileSystem(),
                                                                 str(tmp_path), trial_dir))

    class Context:
        def get_trial_name(self):
            return "train_bmtard_aa11bb22"

        def get_trial_id(self):
            return "aa11bb22"

    monkeypatch.setattr(bmtard.tune, "get_context", lambda: Context())
    monkeypatch.setattr(bmtard.tune, "get_checkpoint", lambda: None)
    fresh = Trainer(tiny_config.with_values({"method": "natural", "train.epochs": 1}), tiny_digits)

    torch.save({"not": "a trainer state"}, foreign / "state.pt")
    with pytest.raises(bmtard.CheckpointError, match="cannot be loaded into trial aa11bb22"):
        bmtard._resume(fresh.load_state_dict, resumed_search=True)

    (foreign / "state.pt").unlink()  # now torn too: both skipped, the good one loaded
    assert bmtard._resume(fresh.load_state_dict, resumed_search=True) is not None and fresh.epoch == 1
    # A trial's first start in a new search (Ray gives it no checkpoint) looks for none.
    first = Trainer(tiny_config.with_values({"method": "natural", "train.epochs": 1}), tiny_digits)
    assert bmtard._resume(first.load_state_dict, resumed_search=False) is None and first.epoch == 0


# ---- the exported config reproduces its trial --------------------------------------------------------------


def test_the_best_config_pins_the_teachers_and_train_reproduces_the_trial_bit_for_bit(space_file, ray_address,
                                                                                      tmp_path):
    name = "repro"
    code, out, _ = run_search(space_file, tmp_path, name, "--num-samples", "2", "--set", "search.scheduler.type=fifo",
                              "--set", "train.epochs=2")
    assert code == 0, out
    folder = tmp_path / "results" / name
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    for role in ("clean", "robust"):
        assert Path(best["teachers"][role]["checkpoint"]).is_file() and len(best["teachers"][role]["sha256"]) == 64

    client, parents, children = mlflow_runs(tmp_path, name)
    best_id = parents[0].data.tags["best_trial_id"]
    best_run = next(r for r in children if r.data.tags["trial_id"] == best_id)
    trial_trace = Path(client.download_artifacts(best_run.info.run_id, "balance_trace.csv", str(tmp_path / "dl")))
    last = ray_reports(folder)[best_id][-1]

    empty_cache = tmp_path / "no-teachers-here"
    out_dir = tmp_path / "retrained"
    (tmp_path / "train").mkdir()
    code = train.main(["--config", str(folder / "best_config.yaml"), "--out", str(out_dir), "--no-progress",
                       "--tracking-uri", tracking_uri(tmp_path / "train"),
                       "--set", f"teachers.cache_dir={empty_cache}"])
    assert code == 0
    assert not list(empty_cache.glob("*.pt"))  # the pinned teachers were loaded, never retrained
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc"):
        assert metrics[key] == last[key], key
    assert (out_dir / "balance_trace.csv").read_text() == trial_trace.read_text()


def test_train_refuses_a_pinned_teacher_whose_file_changed(space_file, ray_address, tmp_path, tiny_config_path):
    config = yaml.safe_load(tiny_config_path.read_text())
    from tune_mtard.config import load_config
    from tune_mtard.teachers import teacher_path

    path = teacher_path(load_config(tiny_config_path, check_files=False), "clean")
    config["teachers"]["clean"].update(checkpoint=str(path), sha256="0" * 64)
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "tune_mtard.train", "--config", str(pinned), "--out",
                             str(tmp_path / "run"), "--tracking-uri", tracking_uri(tmp_path)],
                            env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "teachers.clean.sha256" in result.stderr and "is not the pinned teacher" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
