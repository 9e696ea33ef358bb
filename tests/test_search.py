"""Specification of `python -m tune_mtard.search` and `python -m tune_mtard.export` (docs/cli.md, docs/search.md).

Tiny digits searches (5 trials of 3 epochs, ASHA with grace period 1) on the session's Ray, each with its
own storage folder and MLflow store; the teachers are the session's, trained once into a shared cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from searchkit import (  # noqa: E402
    EPOCH_METRICS,
    EPOCHS,
    NUM_SAMPLES,
    SPACE_KEYS,
    SPEC_TRACE_HEADER,
    base_run_config,
    child_env,
    expected_best,
    flat,
    mlflow_runs,
    optuna_trials,
    ray_reports,
    ray_trial_ids,
    search_args,
    tracking_uri,
)

from tune_mtard.cli import export, search, train
from tune_mtard.cli.common import run
from tune_mtard.search import driver as search_driver
from tune_mtard.teachers import teacher_path
from tune_mtard.teachers.cache import file_sha256

# ---- one finished search ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_search(space_file, ray_address, tmp_path_factory) -> dict:
    """`tune_mtard.search.main` in-process on the session's Ray: 5 trials, 3 epochs, ASHA grace 1, rf 2."""
    root = tmp_path_factory.mktemp("search")
    name = "tiny-search"
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = search.main(search_args(space_file, root, name))
    folder = root / "results" / name
    return {"root": root, "name": name, "folder": folder, "code": code, "stdout": stdout.getvalue(),
            "wall": time.perf_counter() - start, "reports": ray_reports(folder)}


def test_search_exits_0_and_prints_where_the_best_config_is(finished_search):
    assert finished_search["code"] == 0, finished_search["stdout"][-3000:]
    assert str(finished_search["folder"] / "best_config.yaml") in finished_search["stdout"]
    assert "mlflow ui --backend-store-uri" in finished_search["stdout"]


def test_search_runs_num_samples_trials_and_asha_stops_some_early(finished_search):
    reports = finished_search["reports"]
    assert len(reports) == NUM_SAMPLES
    epochs_run = [rows[-1]["epoch"] for rows in reports.values()]
    assert all(1 <= e <= EPOCHS for e in epochs_run)
    assert EPOCHS in epochs_run, "no trial ran the full budget"
    assert min(epochs_run) < EPOCHS, f"ASHA stopped no trial early: {epochs_run}"


def test_mlflow_has_one_experiment_with_one_parent_run_and_one_child_run_per_trial(finished_search):
    client, parents, children = mlflow_runs(finished_search["root"], finished_search["name"])
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == [finished_search["name"]]
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children)
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(finished_search["reports"])
    assert all(r.info.status == "FINISHED" for r in parents + children)


def test_child_runs_are_named_by_trial_id_and_hold_its_sampled_values_as_dotted_params(finished_search):
    _, _, children = mlflow_runs(finished_search["root"], finished_search["name"])
    reports = finished_search["reports"]
    for record in children:
        trial_id = record.data.tags["trial_id"]
        assert record.info.run_name == trial_id
        sampled = reports[trial_id][0]["config"]
        assert set(sampled) == set(SPACE_KEYS)
        assert record.data.params == {k: str(v) for k, v in sampled.items()}


def test_child_runs_log_every_spec_metric_once_per_validation_epoch_with_step_epoch(finished_search):
    client, _, children = mlflow_runs(finished_search["root"], finished_search["name"])
    reports = finished_search["reports"]
    for record in children:
        rows = reports[record.data.tags["trial_id"]]
        for metric in EPOCH_METRICS:
            history = client.get_metric_history(record.info.run_id, metric)
            assert sorted(m.step for m in history) == [r["epoch"] for r in rows], metric
            assert {m.step: m.value for m in history} == pytest.approx({r["epoch"]: r[metric] for r in rows})
        last_state = "COMPLETE" if rows[-1]["epoch"] == EPOCHS else "PRUNED"
        assert record.data.tags["trial_state"] == last_state
        assert record.data.tags["node_id"] == rows[-1]["node_id"]


def test_child_runs_hold_the_balance_trace_its_plot_and_the_student_weights(finished_search, tmp_path):
    client, _, children = mlflow_runs(finished_search["root"], finished_search["name"])
    reports = finished_search["reports"]
    for record in children:
        paths = {a.path for a in client.list_artifacts(record.info.run_id)}
        assert {"balance_trace.csv", "balance_trace.png", "model"} <= paths
        assert [a.path for a in client.list_artifacts(record.info.run_id, "model")] == ["model/student.pt"]
        local = Path(client.download_artifacts(record.info.run_id, "balance_trace.csv", str(tmp_path)))
        lines = local.read_text().splitlines()
        assert lines[0] == SPEC_TRACE_HEADER
        steps = [int(line.split(",")[0]) for line in lines[1:]]
        epochs = [int(line.split(",")[1]) for line in lines[1:]]
        assert steps == list(range(1, len(steps) + 1))
        assert max(epochs) == reports[record.data.tags["trial_id"]][-1]["epoch"]


def test_parent_run_holds_space_best_config_trials_csv_scatter_plot_and_summary(finished_search, tmp_path):
    client, parents, _ = mlflow_runs(finished_search["root"], finished_search["name"])
    parent = parents[0]
    paths = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.yaml", "best_config.yaml", "trials.csv", "summary.json"} <= paths
    assert any(p.endswith(".png") for p in paths)
    space_file = client.download_artifacts(parent.info.run_id, "search_space.yaml", str(tmp_path))
    space = yaml.safe_load(Path(space_file).read_text())
    assert set(space["space"]) == set(SPACE_KEYS)
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))).read_text())
    reports = finished_search["reports"]
    epochs_run = [rows[-1]["epoch"] for rows in reports.values()]
    assert summary["n_trials"] == NUM_SAMPLES
    assert summary["n_pruned"] == sum(e < EPOCHS for e in epochs_run)
    assert summary["n_complete"] == sum(e == EPOCHS for e in epochs_run)
    assert summary["epochs_spent"] == sum(epochs_run)
    assert summary["epochs_full_budget"] == NUM_SAMPLES * EPOCHS
    csv_file = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    csv_lines = Path(csv_file).read_text().splitlines()
    assert len(csv_lines) == 1 + NUM_SAMPLES
    assert all(key in csv_lines[0] for key in SPACE_KEYS)


def test_a_finished_search_writes_and_logs_its_sensitivity_analysis(finished_search):
    folder = finished_search["folder"]
    assert (folder / "sensitivity.md").is_file()
    assert {f"slice_{key}.png" for key in SPACE_KEYS} <= {p.name for p in folder.glob("slice_*.png")}
    client, parents, _ = mlflow_runs(finished_search["root"], finished_search["name"])
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "sensitivity")}
    assert "sensitivity/sensitivity.md" in logged
    assert summary_of(folder)["status"] == "finished"


def test_each_trial_reports_its_balance_diagnostics_and_the_search_counts_the_flags(finished_search):
    client, parents, children = mlflow_runs(finished_search["root"], finished_search["name"])
    for record in children:
        gaps = client.get_metric_history(record.info.run_id, "entropy_gap")
        assert len(gaps) == int(record.data.tags["epochs_run"]) and all(g.value >= 0 for g in gaps)
    header = (finished_search["folder"] / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"entropy_gap", "entropy_gap_persists", "loss_dominates"} <= set(header)
    summary = summary_of(finished_search["folder"])
    assert {"n_entropy_gap_persists", "n_loss_dominates"} <= set(summary)
    metrics = parents[0].data.metrics
    for role in ("clean", "robust"):  # the teachers' quality, measured on the validation split
        assert 0 <= metrics[f"teacher_{role}_val_pgd_acc"] <= metrics[f"teacher_{role}_val_clean_acc"] <= 1
    assert parents[0].data.params["teachers.robust.sha256"] == file_sha256(parents[0].data.params[
        "teachers.robust.checkpoint"])


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_optuna_study_records_asha_stopped_trials_as_pruned_and_full_budget_ones_as_complete(finished_search):
    trials = optuna_trials(finished_search["folder"], finished_search["name"])
    reports = finished_search["reports"]
    assert len(trials) == NUM_SAMPLES
    states = {}
    for t in trials:
        rows = reports[t.user_attrs["ray_trial_id"]]
        epochs = rows[-1]["epoch"]
        states[t.state] = states.get(t.state, 0) + 1
        assert t.state == (TrialState.COMPLETE if epochs == EPOCHS else TrialState.PRUNED), (t.number, epochs)
        assert t.intermediate_values == pytest.approx({r["epoch"]: r["val_w_robust_acc"] for r in rows})
        assert t.params == pytest.approx(rows[0]["config"])
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(rows[-1]["val_w_robust_acc"])
    assert states.get(TrialState.COMPLETE, 0) >= 1 and states.get(TrialState.PRUNED, 0) >= 1, states


def test_first_trial_evaluated_is_the_base_configs_values_of_the_searched_keys(finished_search, tiny_config):
    defaults = {key: tiny_config.get(key) for key in SPACE_KEYS}
    first_optuna = min(optuna_trials(finished_search["folder"], finished_search["name"]), key=lambda t: t.number)
    assert first_optuna.params == defaults
    # Trial folders are train_bmtard_<trial id>_<number, from 1>_<values>_<date>.
    first_ray = next(p for p in finished_search["folder"].glob("train_bmtard_*") if p.name.split("_")[3] == "1")
    assert json.loads((first_ray / "params.json").read_text()) == defaults


def teacher_pins(base) -> dict[str, str]:
    """The keys that pin the session's cached teachers: their files and sha256."""
    pins = {}
    for role in ("clean", "robust"):
        path = teacher_path(base, role)
        pins[f"teachers.{role}.checkpoint"] = str(path.resolve())
        pins[f"teachers.{role}.sha256"] = file_sha256(path)
    return pins


def test_best_config_is_the_base_run_config_with_the_best_full_epoch_trials_values(finished_search, space_file):
    best_ids, _ = expected_best(finished_search["reports"])
    best_config = yaml.safe_load((finished_search["folder"] / "best_config.yaml").read_text())
    assert "search" not in best_config and "space" not in best_config
    _, parents, _ = mlflow_runs(finished_search["root"], finished_search["name"])
    best_id = parents[0].data.tags["best_trial_id"]
    assert best_id in best_ids
    sampled = finished_search["reports"][best_id][0]["config"]
    base = base_run_config(space_file, finished_search["root"], finished_search["name"])
    # plus the thread count the trial ran with, so that train repeats it exactly on a CPU, and the exact
    # teacher files the search used, pinned by their sha256
    pins = teacher_pins(base)
    assert best_config == base.with_values({**sampled, "perf.threads": 1, **pins}).to_dict()
    changed = {k for k, v in flat(best_config).items() if flat(base.to_dict())[k] != v}
    assert changed <= set(SPACE_KEYS) | {"perf.threads"} | set(pins)


def test_train_on_the_best_config_reproduces_the_best_trials_final_validation_metrics(finished_search, tmp_path):
    _, parents, _ = mlflow_runs(finished_search["root"], finished_search["name"])
    last = finished_search["reports"][parents[0].data.tags["best_trial_id"]][-1]
    out = tmp_path / "run"
    code = train.main(["--config", str(finished_search["folder"] / "best_config.yaml"), "--out", str(out),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == last["epoch"] == EPOCHS
    for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc"):
        assert metrics[key] == last[key], key


# ---- export ----------------------------------------------------------------------------------------------


def test_export_writes_the_same_best_config_as_the_search(finished_search, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    assert export.main(["--experiment", str(finished_search["folder"]), "--out", str(out)]) == 0
    best_config = finished_search["folder"] / "best_config.yaml"
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(best_config.read_text())
    assert "WARNING" not in capsys.readouterr().err


def test_export_of_a_named_trial_writes_that_trials_config(finished_search, space_file, tmp_path):
    trial_id, rows = next((tid, rows) for tid, rows in finished_search["reports"].items() if rows[-1]["epoch"] < EPOCHS)
    out = tmp_path / "trial.yaml"
    assert export.main(["--experiment", str(finished_search["folder"]), "--trial", trial_id, "--out", str(out)]) == 0
    base = base_run_config(space_file, finished_search["root"], finished_search["name"])
    expected = base.with_values({**rows[0]["config"], "perf.threads": 1, **teacher_pins(base)})
    assert yaml.safe_load(out.read_text()) == expected.to_dict()


@pytest.mark.parametrize("case", ["unknown trial", "not a search folder"])
def test_export_rejects_an_unknown_trial_or_folder_with_exit_2_and_one_line(finished_search, tmp_path, capsys, case):
    argv = (["--experiment", str(finished_search["folder"]), "--trial", "nosuchtrial"] if case == "unknown trial"
            else ["--experiment", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run(export.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--trial" in err if case == "unknown trial" else "--experiment" in err)


# ---- bad input -------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "space key not in the config": (["--set", "space.balance.gamma={type: float, low: 0.1, high: 1.0}"],
                                    "space.balance.gamma"),
    "low >= high": (["--set", "space.balance.beta.low=3.0"], "space.balance.beta"),
    "tau_min can exceed tau_max": (["--set", "space.balance.tau_min={type: float, low: 1.0, high: 5.0}"],
                                   "tau_min"),
    "max_concurrent 0": (["--set", "search.max_concurrent=0"], "search.max_concurrent"),
    "unknown key in --set": (["--set", "search.nonsense=1"], "search.nonsense"),
    "resume with nothing to resume": (["--resume"], "--resume"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_search_input_exits_2_with_one_line_before_ray_starts_or_anything_is_written(
        case, space_file, tmp_path, capsys, monkeypatch):
    extra, named = BAD_INPUTS[case]
    monkeypatch.setattr(search_driver, "run_search", lambda *a, **k: pytest.fail("the search started"))
    with pytest.raises(SystemExit) as exit_info:
        run(search.main, search_args(space_file, tmp_path, "bad", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_unknown_space_file_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search_driver, "run_search", lambda *a, **k: pytest.fail("the search started"))
    with pytest.raises(SystemExit) as exit_info:
        run(search.main, ["--space", "no_such_space.yaml", "--storage", str(tmp_path / "results")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_space.yaml" in err
    assert not (tmp_path / "results").exists()


def test_a_second_search_with_the_same_name_without_resume_exits_2(finished_search, space_file, capsys, monkeypatch):
    monkeypatch.setattr(search_driver, "run_search", lambda *a, **k: pytest.fail("the search started"))
    before = sorted(p.name for p in finished_search["folder"].iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run(search.main, search_args(space_file, finished_search["root"], finished_search["name"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err
    assert sorted(p.name for p in finished_search["folder"].iterdir()) == before


# ---- the pieces a resume relies on, one at a time --------------------------------------------------------


def _searcher(folder: Path, name: str = "unit"):
    from tune_mtard.config import Distribution
    from tune_mtard.config.search import SamplerConfig
    from tune_mtard.search.searcher import PrunedAwareOptunaSearch, optuna_distributions

    space = optuna_distributions({"balance.beta": Distribution(type="float", low=0.5, high=3.0)})
    return PrunedAwareOptunaSearch(space=space, metric="val_w_robust_acc", mode="max", study_name=name,
                                   storage=optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}"),
                                   sampler_config=SamplerConfig(type="random", seed=0), full_epochs=EPOCHS)


def _result(epoch: int, value: float) -> dict:
    return {"epoch": epoch, "val_w_robust_acc": value}


def test_searcher_tells_optuna_at_the_next_snapshot_stopped_trials_as_pruned_with_their_intermediate_values(tmp_path):
    searcher = _searcher(tmp_path)
    searcher.suggest("stopped")
    searcher.suggest("full")
    searcher.on_trial_result("stopped", _result(1, 0.2))
    searcher.on_trial_complete("stopped", _result(2, 0.3))  # ASHA's stop: the last result comes with it
    for epoch in range(1, EPOCHS + 1):
        searcher.on_trial_result("full", _result(epoch, 0.1 * epoch))
    searcher.on_trial_complete("full", _result(EPOCHS, 0.1 * EPOCHS))
    assert {t.state for t in optuna_trials(tmp_path, "unit")} == {TrialState.RUNNING}

    searcher.save(str(tmp_path / "searcher.pkl"))
    stopped, full = sorted(optuna_trials(tmp_path, "unit"), key=lambda t: t.number)
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {1: 0.2, 2: 0.3}
    assert stopped.user_attrs["ray_trial_id"] == "stopped"
    assert full.state == TrialState.COMPLETE and full.value == pytest.approx(0.3)
    assert full.intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})


def test_restored_searcher_leaves_trials_the_study_already_holds_as_finished_alone(tmp_path):
    searcher = _searcher(tmp_path)
    searcher.suggest("done")
    searcher.suggest("running")
    searcher.on_trial_result("done", _result(1, 0.5))
    searcher.save(str(tmp_path / "old.pkl"))  # the snapshot a killed driver left: "done" still running
    searcher.on_trial_complete("done", _result(1, 0.5))
    searcher.save(str(tmp_path / "new.pkl"))  # ... but the study heard of its end

    restored = _searcher(tmp_path)
    restored.restore(str(tmp_path / "old.pkl"))
    restored.on_trial_result("done", _result(2, 0.9))  # a restarted trial reporting again: no error
    restored.on_trial_complete("done", _result(2, 0.9))
    restored.on_trial_result("running", _result(1, 0.4))
    restored.on_trial_complete("running", _result(EPOCHS, 0.6))
    restored.save(str(tmp_path / "resumed.pkl"))
    done, running = sorted(optuna_trials(tmp_path, "unit"), key=lambda t: t.number)
    assert done.state == TrialState.PRUNED and done.intermediate_values == {1: 0.5}
    assert running.state == TrialState.COMPLETE


def test_orphaned_running_optuna_trials_are_closed_as_fail_and_known_ones_left(tmp_path):
    from tune_mtard.search.searcher import close_orphaned_optuna_trials

    searcher = _searcher(tmp_path)
    searcher.suggest("known")
    searcher.suggest("lost")
    assert close_orphaned_optuna_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "unit", {"known"}) == 1
    states = {t.user_attrs["ray_trial_id"]: t.state for t in optuna_trials(tmp_path, "unit")}
    assert states == {"known": TrialState.RUNNING, "lost": TrialState.FAIL}


class _Trial:
    def __init__(self, trial_id: str, epochs: int):
        self.trial_id, self.config, self.checkpoint = trial_id, {"balance.beta": 1.5}, None
        self.last_result = {"epoch": epochs}


def test_mlflow_recorder_after_a_resume_finds_the_trials_run_and_logs_each_epoch_once(tmp_path):
    from tune_mtard import tracking
    from tune_mtard.search.recorder import MlflowTrialRecorder

    client = tracking.client_for(tracking_uri(tmp_path))
    experiment_id = tracking.experiment_id(client, "unit")
    parent = client.create_run(experiment_id, run_name="search").info.run_id

    def record(epochs: list[int], complete: bool) -> None:
        recorder = MlflowTrialRecorder(tracking_uri(tmp_path), experiment_id, parent, EPOCHS, "unit",
                                       folder=tmp_path / "search")
        trial = _Trial("abc123", epochs[-1])
        recorder.on_trial_start(0, [], trial)
        for epoch in epochs:
            recorder.on_trial_result(0, [], trial, {"epoch": epoch, "val_clean_acc": 0.1 * epoch, "node_id": "n"})
        if complete:
            recorder.on_trial_complete(0, [], trial)
        assert recorder.flush(timeout_s=60)

    record([1, 2], complete=False)  # the killed driver
    record([2, 3], complete=True)  # the resumed one repeats epoch 2 (a checkpoint older than the last report)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in runs] == ["abc123"]
    history = client.get_metric_history(runs[0].info.run_id, "val_clean_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert runs[0].data.params == {"balance.beta": "1.5"} and runs[0].info.status == "FINISHED"


def test_ray_deleting_a_checkpoint_that_is_already_gone_does_not_fail_the_trial(tmp_path):
    import pyarrow.fs
    from ray.train._internal import checkpoint_manager

    from tune_mtard.search.compat import tolerate_deleted_checkpoints

    tolerate_deleted_checkpoints()
    checkpoint_manager._delete_fs_path(fs=pyarrow.fs.LocalFileSystem(), fs_path=str(tmp_path / "checkpoint_000000"))
    (tmp_path / "checkpoint_000001").mkdir()
    checkpoint_manager._delete_fs_path(fs=pyarrow.fs.LocalFileSystem(), fs_path=str(tmp_path / "checkpoint_000001"))
    assert not (tmp_path / "checkpoint_000001").exists()


def test_a_restarted_trial_finds_its_furthest_checkpoint_in_any_of_its_folders(tmp_path):
    import pyarrow.fs
    from ray import tune
    from tune_mtard.trainables.bmtard import find_checkpoints

    def checkpoint(trial_dir: str, name: str, epoch: int | None) -> str:
        path = tmp_path / trial_dir / name
        path.mkdir(parents=True)
        if epoch is not None:
            tune.Checkpoint.from_directory(str(path)).set_metadata({"epoch": epoch})
        return str(path)

    old = "train_bmtard_ab12cd34_3_beta=1.5_2026-11-25_10-00-00"  # the folder before the kill
    new = "train_bmtard_ab12cd34_3_beta=1.5_2026-11-25_10-05-00"  # named anew by the resumed Ray
    e2, e3 = checkpoint(old, "checkpoint_000001", 2), checkpoint(old, "checkpoint_000002", 3)
    torn = checkpoint(old, "checkpoint_000003", None)  # cut short by the kill: no metadata
    e1_new = checkpoint(new, "checkpoint_000000", 1)  # numbering restarted: a higher name is not a later epoch
    e3_new = checkpoint(new, "checkpoint_000001", 3)
    checkpoint("train_bmtard_ab12cd99_4_beta=2.0_2026-11-25_10-00-00", "checkpoint_000009", 9)  # another trial
    found = find_checkpoints(pyarrow.fs.LocalFileSystem(), str(tmp_path), new, "train_bmtard_ab12cd34")
    assert [c.path for c in found] == [e3_new, e3, e2, e1_new, torn]
    # Within one driver session (not a resumed search) only the trial's own folder is listed.
    own = find_checkpoints(pyarrow.fs.LocalFileSystem(), str(tmp_path), new, "train_bmtard_ab12cd34",
                           everywhere=False)
    assert [c.path for c in own] == [e3_new, e1_new]


# ---- kill and resume -------------------------------------------------------------------------------------


def _optuna_states(folder: Path) -> dict[str, str]:
    """Ray trial id -> Optuna state, read while the driver writes (plain read-only sqlite)."""
    db = folder / "optuna.db"
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("select t.state, a.value_json from trials t join trial_user_attributes a "
                               "on a.trial_id = t.trial_id and a.key = 'ray_trial_id'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    return {json.loads(ray_id): state for state, ray_id in rows}


def _reported_epochs(folder: Path) -> dict[str, int]:
    return {tid: len(rows) for tid, rows in ray_reports(folder).items()}


def _in_tune_snapshot(folder: Path, trial_id: str) -> bool:
    """Whether Tune's last experiment snapshot holds the trial (a resumed search only knows those)."""
    return any(trial_id in p.read_text() for p in folder.glob("experiment_state-*.json"))


def test_killed_search_resumes_to_the_same_counts_without_rerunning_or_duplicating(space_file, ray_address, tmp_path):
    name = "tiny-resume"
    folder = tmp_path / "results" / name
    cmd = [sys.executable, "-m", "tune_mtard.search", *search_args(space_file, tmp_path, name),
           "--address", ray_address]
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    finished, midway = {}, {}
    try:
        deadline = time.monotonic() + 240
        while driver.poll() is None and time.monotonic() < deadline:
            states, epochs = _optuna_states(folder), _reported_epochs(folder)
            done = {tid: epochs.get(tid, 0) for tid, s in states.items() if s in ("COMPLETE", "PRUNED")}
            running = {tid: epochs.get(tid, 0) for tid, s in states.items()
                       if s == "RUNNING" and 1 <= epochs.get(tid, 0) < EPOCHS and _in_tune_snapshot(folder, tid)}
            if done and running:
                driver.send_signal(signal.SIGKILL)
                finished, midway = done, running
                break
            time.sleep(0.2)
    finally:
        if driver.poll() is None and not finished:
            driver.kill()
        driver.wait()
    # The killed driver's trial actors live on until Ray notices the driver is gone: one can still finish an
    # epoch and report it. Wait until nothing more is written, so the counts below are what a resume finds.
    epochs_at_kill, stable_since = _reported_epochs(folder), time.monotonic()
    while time.monotonic() - stable_since < 5 and time.monotonic() < deadline + 60:
        time.sleep(0.5)
        now = _reported_epochs(folder)
        if now != epochs_at_kill:
            epochs_at_kill, stable_since = now, time.monotonic()
    checkpoints_at_kill = {r.name: sorted(c.name for c in r.glob("checkpoint_*"))
                           for r in folder.glob("train_bmtard_*")}
    assert finished and midway, "the search ended before one trial finished while another was mid-way:\n" + \
        (tmp_path / "first.log").read_text()[-3000:]

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]

    # The same counts as a search never killed: Ray trials, MLflow child runs and told Optuna trials.
    trial_ids = ray_trial_ids(folder)
    assert len(trial_ids) == NUM_SAMPLES
    client, parents, children = mlflow_runs(tmp_path, name)
    assert len(parents) == 1
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(trial_ids)
    trials = optuna_trials(folder, name)
    told = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.user_attrs["ray_trial_id"] for t in told) == sorted(trial_ids)
    assert not [t for t in trials if t.state == TrialState.RUNNING], "an Optuna trial was left RUNNING"

    reports = ray_reports(folder)
    for record in children:
        trial_id = record.data.tags["trial_id"]
        epochs_run = reports[trial_id][-1]["epoch"]
        # Each epoch logged once, whatever was repeated around the kill.
        steps = [m.step for m in client.get_metric_history(record.info.run_id, "val_w_robust_acc")]
        assert sorted(steps) == list(range(1, epochs_run + 1)), (trial_id, steps)
        trace = Path(client.download_artifacts(record.info.run_id, "balance_trace.csv", str(tmp_path))).read_text()
        trace_steps = [int(line.split(",")[0]) for line in trace.splitlines()[1:]]
        assert trace_steps == list(range(1, len(trace_steps) + 1))
        assert int(trace.splitlines()[-1].split(",")[1]) == epochs_run
    for trial_id in finished:
        # Finished before the kill: no epoch trained again (at most its last one reported again).
        rows = reports[trial_id]
        assert rows[-1]["epoch"] == epochs_at_kill[trial_id]
        assert all(r["resumed_from_epoch"] in (0, epochs_at_kill[trial_id]) for r in rows), rows
    continued = 0
    for trial_id in set(midway) & trial_ids:
        # Mid-way at the kill: continued from its last checkpoint, not from scratch.
        rows = reports[trial_id]
        after = rows[epochs_at_kill[trial_id]:]
        assert all(r["resumed_from_epoch"] >= epochs_at_kill[trial_id] for r in after), \
            (trial_id, epochs_at_kill[trial_id], [(r["epoch"], r["resumed_from_epoch"]) for r in rows],
             {k: v for k, v in checkpoints_at_kill.items() if trial_id in k})
        continued += bool(after)
    assert continued, "no trial that was mid-way at the kill was continued"


# ---- clusters --------------------------------------------------------------------------------------------

CLUSTER_DRIVER = """\
import sys

import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "object_store_memory": 100 * 1024**2})
cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
cluster.wait_for_nodes()
from tune_mtard.cli.search import main

try:
    code = main(sys.argv[1:] + ["--address", cluster.address])
finally:
    ray.shutdown()
    cluster.shutdown()
sys.exit(code)
"""


@pytest.mark.slow
def test_search_on_a_two_node_cluster_runs_trials_on_both_nodes(space_file, tmp_path):
    script = tmp_path / "cluster_driver.py"
    script.write_text(CLUSTER_DRIVER)
    name = "tiny-cluster"
    args = search_args(space_file, tmp_path, name, "--num-samples", "2", "--max-epochs", "1")
    result = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    _, _, children = mlflow_runs(tmp_path, name)
    assert len(children) == 2
    nodes = {r.data.tags["node_id"] for r in children}
    assert len(nodes) >= 2, nodes


def test_resume_from_another_working_folder_takes_its_own_relative_data_root(space_file, ray_address, tmp_path,
                                                                           monkeypatch, capsys):
    """`data.root: ./data` is made absolute against each driver's working folder: a driver resuming from another
    folder (a new machine) uses its own, rather than refusing the config as different."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    args = search_args(space_file, tmp_path, "tiny-moved", "--num-samples", "1", "--max-epochs", "1",
                       "--set", "data.root=./data")
    monkeypatch.chdir(first)
    assert search.main(args) == 0
    saved = yaml.safe_load((tmp_path / "results" / "tiny-moved" / "search_space.yaml").read_text())
    assert saved["data"]["root"] == str(first / "data")
    monkeypatch.chdir(second)
    assert search.main(args + ["--resume"]) == 0, capsys.readouterr().err
    _, parents, children = mlflow_runs(tmp_path, "tiny-moved")
    assert len(parents) == 1 and len(children) == 1
    with pytest.raises(SystemExit) as exit_info:  # what the data is, unlike where it is, must still match
        run(search.main, args + ["--resume", "--set", "data.val_fraction=0.3"])
    assert exit_info.value.code == 2 and "'data'" in capsys.readouterr().err
