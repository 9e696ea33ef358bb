"""Sensitivity of a search (docs/sensitivity.md): on a study with a planted objective the driving key ranks
first; trials are compared after one epoch, the deepest enough of them reached; the files are written and
logged; too few trials are reported as such; ``analyze`` works on a search folder and rejects anything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from tune_mtard import files, tracking
from tune_mtard.config import load_config
from tune_mtard.search.searcher import RAY_TRIAL_ATTR, optuna_distributions
from tune_mtard.search.sensitivity import analyze_search, log_sensitivity, min_trials
from tune_mtard.search.study_storage import optuna_storage_url
from tune_mtard.search.trials import TrialSummary

FULL_EPOCHS = 9
ASHA_RUNGS = (1, 3, 9)  # grace period 1, reduction factor 3
SPACE_YAML = """\
name: planted
device: cpu
data: {{dataset: digits}}
student: {{arch: digits_cnn}}
teachers:
  clean:  {{arch: digits_cnn_large, checkpoint: auto}}
  robust: {{arch: digits_cnn, checkpoint: auto}}
train: {{epochs: {epochs}}}
mlflow: {{tracking_uri: "{tracking_uri}", experiment: planted}}
search: {{num_samples: 36, metric: val_w_robust_acc, mode: max, storage: "{storage}"}}
space:
  balance.beta:    {{type: float, low: 0.5, high: 3.0}}
  balance.tau_max: {{type: float, low: 2.0, high: 20.0}}
  train.lr:        {{type: float, low: 0.01, high: 0.2, log: true}}
  method:          {{type: categorical, choices: [b-mtard, mtard]}}
"""
KEYS = ["balance.beta", "balance.tau_max", "train.lr", "method"]


def planted(params: dict, epoch: int, rng: np.random.Generator) -> float:
    """The metric: beta drives it, training adds a little per epoch, every other key is noise."""
    return 0.2 + 0.2 * (params["balance.beta"] - 0.5) + 0.01 * epoch + 0.002 * rng.standard_normal()


def make_search(tmp: Path, n_trials: int = 36, metric=planted, tracking_uri: str = "sqlite:///unused.db",
                asha: bool = True):
    """A search folder as a search leaves it: search_space.yaml and optuna.db, its trials stopped by a
    simulated ASHA (the top third of each rung goes on); plus one failed trial that reported great values."""
    storage = tmp / "results"
    space = tmp / "space.yaml"
    space.write_text(SPACE_YAML.format(epochs=FULL_EPOCHS, tracking_uri=tracking_uri, storage=storage))
    cfg = load_config(space, check_files=False)
    folder = storage / cfg.name
    folder.mkdir(parents=True)
    cfg.dump(folder / files.SPACE, with_search=True)
    study = optuna.create_study(study_name=cfg.name, storage=optuna_storage_url(cfg, folder), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    rng = np.random.default_rng(0)
    trials = [study.ask(optuna_distributions(cfg.space)) for _ in range(n_trials)]
    reported: dict[int, dict[int, float]] = {t.number: {} for t in trials}
    running = list(trials)
    for lower, rung in zip((0,) + ASHA_RUNGS, ASHA_RUNGS, strict=False):
        for trial in running:
            for epoch in range(lower + 1, rung + 1):
                reported[trial.number][epoch] = metric(trial.params, epoch, rng)
                trial.report(reported[trial.number][epoch], epoch)
        if asha and rung < FULL_EPOCHS:
            running.sort(key=lambda t: -reported[t.number][rung])
            running = running[:max(1, len(running) // 3)]
    for trial in trials:
        trial.set_user_attr(RAY_TRIAL_ATTR, f"t{trial.number:03d}")
        values = reported[trial.number]
        if max(values) == FULL_EPOCHS:
            study.tell(trial, values[FULL_EPOCHS])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    failed = study.ask(optuna_distributions(cfg.space))
    failed.set_user_attr(RAY_TRIAL_ATTR, "failed")
    for epoch in range(1, 4):
        failed.report(0.99, epoch)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return folder, cfg


def test_the_key_that_drives_the_metric_ranks_first(tmp_path):
    folder, cfg = make_search(tmp_path)
    report = analyze_search(folder, cfg)
    assert list(report.importances)[0] == "balance.beta"
    assert report.importances["balance.beta"] > 0.5
    assert sum(report.importances.values()) == pytest.approx(1.0)
    assert set(report.importances) == set(KEYS)  # the categorical key too


def test_trials_are_compared_after_the_deepest_epoch_enough_of_them_reached(tmp_path):
    # 36 trials: ASHA keeps 12 after epoch 3 and 4 to the end; 4 < min_trials(4 keys) = 5, so epoch 3.
    folder, cfg = make_search(tmp_path)
    report = analyze_search(folder, cfg)
    assert min_trials(len(KEYS)) == 5
    assert report.reached == {1: 24, 3: 8, 9: 4}
    assert report.epoch == 3 and len(report.compared) == 12
    assert "failed" not in report.compared
    assert "after epoch 3 of 9" in report.selection()


def test_complete_trials_are_compared_when_enough_ran_the_full_budget(tmp_path):
    folder, cfg = make_search(tmp_path, n_trials=8, asha=False)
    report = analyze_search(folder, cfg)
    assert report.epoch == FULL_EPOCHS and len(report.compared) == 8
    assert "the complete trials, at their final value" in report.selection()


def test_trials_the_search_saw_fail_are_left_out(tmp_path):
    folder, cfg = make_search(tmp_path, n_trials=8, asha=False)
    summaries = [TrialSummary(trial_id="t000", sampled={}, failed=True, epochs=9),
                 TrialSummary(trial_id="t001", sampled={}, failed=False, epochs=9)]
    report = analyze_search(folder, cfg, summaries)
    assert "t000" not in report.compared and "t001" in report.compared and len(report.compared) == 7


def test_the_plots_and_sensitivity_md_are_written_and_matplotlib_is_left_as_it_was(tmp_path):
    import matplotlib

    folder, cfg = make_search(tmp_path)
    (folder / files.SLICE_PNG.format("a.key.searched.before")).write_bytes(b"stale")
    style = dict(matplotlib.rcParams)
    report = analyze_search(folder, cfg)
    assert dict(matplotlib.rcParams) == style  # Optuna's plots switch to the ggplot style
    expected = {files.SENSITIVITY_MD, files.IMPORTANCES_PNG, files.CONTOUR_PNG} | {
        files.SLICE_PNG.format(k) for k in KEYS}
    assert {p.name for p in report.files} == expected
    assert {p.name for p in folder.iterdir() if p.suffix in (".png", ".md")} == expected
    for path in report.files:
        assert path.stat().st_size > 1000
    md = (folder / files.SENSITIVITY_MD).read_text()
    assert "`balance.beta` matters most" in md
    assert "after epoch 3 of 9" in md and "12 of 36 trials" in md
    for key in KEYS:
        assert f"- `{key}`: " in md  # its best region
    beta_region = report.regions["balance.beta"]
    assert "high third of 0.5 to 3" in beta_region and "high edge" in beta_region
    assert "b-mtard" in report.regions["method"] or "mtard" in report.regions["method"]


def test_too_few_trials_are_reported_instead_of_importances(tmp_path):
    folder, cfg = make_search(tmp_path, n_trials=4, asha=False)
    (folder / files.IMPORTANCES_PNG).write_bytes(b"from an earlier analysis")
    report = analyze_search(folder, cfg)
    assert report.epoch is None and report.importances == {} and report.compared == []
    assert {p.name for p in report.files} == {files.SENSITIVITY_MD} | {files.SLICE_PNG.format(k) for k in KEYS}
    assert not (folder / files.IMPORTANCES_PNG).exists() and not (folder / files.CONTOUR_PNG).exists()
    md = (folder / files.SENSITIVITY_MD).read_text()
    assert "Importances need 5 trials" in md and "at most 4 of the 4 trials" in md
    assert "matters most" not in md


def test_a_search_whose_trials_reported_nothing_yet_says_so(tmp_path):
    folder, cfg = make_search(tmp_path, n_trials=0)  # the failed trial only
    report = analyze_search(folder, cfg)
    assert report.files == [folder / files.SENSITIVITY_MD]
    assert "No trial has reported val_w_robust_acc yet" in report.files[0].read_text()


def test_trials_without_any_spread_in_the_metric_give_no_importances(tmp_path):
    folder, cfg = make_search(tmp_path, n_trials=8, asha=False, metric=lambda params, epoch, rng: 0.1)
    report = analyze_search(folder, cfg)
    assert report.epoch == FULL_EPOCHS and report.importances == {}
    assert "the same val_w_robust_acc" in report.note
    assert not (folder / files.IMPORTANCES_PNG).exists()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A sqlite MLflow store with a parent run for the search: (tracking URI, client, run id)."""
    from tune_mtard import tracking

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.experiment_id(client, "planted"), run_name="planted").info.run_id
    return uri, client, run_id


def artifact_names(client, run_id: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, files.SENSITIVITY_ARTIFACTS)}


def test_logging_puts_the_files_importances_and_compared_epoch_on_the_run(tmp_path, mlflow_store):
    _, client, run_id = mlflow_store
    folder, cfg = make_search(tmp_path)
    report = analyze_search(folder, cfg)
    log_sensitivity(tracking.RunHandle(client, run_id), report)
    assert artifact_names(client, run_id) == {p.name for p in report.files}
    run = client.get_run(run_id)
    assert run.data.metrics["importance.balance.beta"] == pytest.approx(report.importances["balance.beta"])
    assert run.data.tags["sensitivity.epoch"] == "3" and run.data.tags["sensitivity.trials_compared"] == "12"


def analyze(capsys, *argv: str) -> tuple[int, str, str]:
    from tune_mtard.cli import main

    with pytest.raises(SystemExit) as done:
        main(["analyze", *argv])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_analyze_rewrites_the_files_of_a_search_folder_and_logs_them_to_its_parent_run(tmp_path, mlflow_store,
                                                                                      capsys):
    uri, client, _ = mlflow_store
    folder, cfg = make_search(tmp_path, tracking_uri=uri)
    parent = client.create_run(client.get_experiment_by_name("planted").experiment_id, run_name="p").info.run_id
    client.set_terminated(parent, "KILLED")  # an interrupted search's parent run
    (folder / files.PARENT_RUN_ID).write_text(parent)
    code, out, err = analyze(capsys, "--experiment", str(folder))
    assert code == 0, err
    assert "1. balance.beta" in out and f"logged to the MLflow parent run {parent}" in out
    assert artifact_names(client, parent) >= {files.SENSITIVITY_MD, files.IMPORTANCES_PNG, files.CONTOUR_PNG}
    assert (folder / files.SENSITIVITY_MD).is_file()


def test_analyze_writes_the_files_when_the_mlflow_store_is_unreachable(tmp_path, capsys):
    folder, _ = make_search(tmp_path, n_trials=3, asha=False, tracking_uri=f"sqlite:///{tmp_path / 'gone.db'}")
    (folder / files.PARENT_RUN_ID).write_text("0" * 32)
    code, out, _ = analyze(capsys, "--experiment", str(folder))
    assert code == 0
    assert "Importances need 5 trials" in out and "not logged to MLflow" in out and "no such store" in out
    assert (folder / files.SENSITIVITY_MD).is_file() and not (tmp_path / "gone.db").exists()


def test_analyze_rejects_what_is_not_a_search_folder_with_exit_2_and_one_line(tmp_path, capsys):
    run_config_only = tmp_path / "not-a-search"
    run_config_only.mkdir()
    no_study = tmp_path / "results" / "planted"
    folder, cfg = make_search(tmp_path, n_trials=1)
    (folder / files.OPTUNA_DB).unlink()
    cases = {str(tmp_path / "missing"): "no such folder", str(run_config_only): "not a tune-mtard search folder",
             str(no_study): "holds no Optuna study 'planted'"}
    for path, message in cases.items():
        code, out, err = analyze(capsys, "--experiment", path)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (path, err)


def test_python_m_tune_mtard_analyze_is_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tune_mtard.analyze", "--experiment", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --experiment: {tmp_path / 'x'}: no such folder"
