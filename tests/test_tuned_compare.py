"""`compare --tune N`: every method at its own searched best, at an equal search budget (docs/methods.md, "Tuned
comparisons"): one ordinary search per method (its own Optuna study, MLflow experiment and parent run, best config),
then each best config on the seeds; resumable; bad input exits 2 before anything is written."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tune_mtard import files
from tune_mtard.cli import compare
from tune_mtard.cli.common import run
from tune_mtard.config import load_config
from tune_mtard.config.space import method_search_base, method_space
from tune_mtard.errors import ConfigError, Interrupted
from tune_mtard.methods import default_space, variants

METHODS = ["natural", "b-mtard"]
N, EPOCHS = 2, 2
optuna.logging.set_verbosity(optuna.logging.WARNING)


def compare_args(config: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--methods", ",".join(METHODS), "--seeds", "0", "--tune", str(N),
            "--tune-epochs", str(EPOCHS), "--out", str(root / "out"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
            *extra]


def run_compare(argv: list[str]) -> tuple[int, str, str]:
    """The compare command in-process (on the session's Ray): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run(compare.main, argv)
    return exit_info.value.code, out.getvalue(), err.getvalue()


def study_trials(out: Path, method: str) -> list[optuna.trial.FrozenTrial]:
    name = f"tiny-digits-tune-{method}"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'searches' / name / 'optuna.db'}").trials


def experiment_runs(root: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client, client.search_runs([found.experiment_id], max_results=1000)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tuned(tiny_config_path, tiny_teachers, ray_address, tmp_path_factory):
    """A tuned comparison of natural and b-mtard (N = 2, 2 epochs, seed 0), interrupted as b-mtard's search was
    about to start, then continued with --resume. Returns the folder and what each of the two calls left."""
    from tune_mtard.search import driver

    root = tmp_path_factory.mktemp("tuned")
    real_run_search = driver.run_search

    def interrupted_at_b_mtard(cfg, **kwargs):
        if cfg.name.endswith("-tune-b-mtard"):
            raise Interrupted("SIGINT")
        return real_run_search(cfg, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "run_search", interrupted_at_b_mtard)
        first = run_compare(compare_args(tiny_config_path, root))
    out = root / "out"
    before = {"natural_trials": [(t.number, t.datetime_complete) for t in study_trials(out, "natural")],
              "natural_runs": {r.info.run_id for r in experiment_runs(root, "tiny-digits-tune-natural")[1]},
              "parent": experiment_runs(root, "tiny-digits")[1],
              "b_mtard_started": (out / "searches" / "tiny-digits-tune-b-mtard" / "tuner.pkl").exists(),
              "runs_written": (out / "comparison.csv").exists()}
    resumed = run_compare(compare_args(tiny_config_path, root, "--resume"))
    return root, out, first, before, resumed


def test_an_interrupted_search_interrupts_the_comparison_with_exit_130_and_says_how_to_resume(tuned):
    _, out, (code, _, err), before, _ = tuned
    assert code == 130
    assert "--resume" in err.strip().splitlines()[-1]
    assert [(r.info.run_name, r.info.status) for r in before["parent"]] == [("tiny-digits-compare-tuned", "KILLED")]
    assert json.loads((out / "searches" / "tiny-digits-tune-natural" / "summary.json").read_text())["status"] == \
        "finished"
    assert not before["b_mtard_started"] and not before["runs_written"]


def test_resume_finishes_the_comparison_without_redoing_a_finished_search(tuned):
    root, out, _, before, (code, stdout, err) = tuned
    assert code == 0, err
    assert "natural: ended finished before; not run again" in stdout
    assert [(t.number, t.datetime_complete) for t in study_trials(out, "natural")] == before["natural_trials"]
    assert {r.info.run_id for r in experiment_runs(root, "tiny-digits-tune-natural")[1]} == before["natural_runs"]
    _, parents = experiment_runs(root, "tiny-digits")
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert [(r.info.run_name, r.info.status) for r in parents] == [("tiny-digits-compare-tuned", "FINISHED")]


@pytest.mark.parametrize("changed, says", [
    (["--seeds", "0,1"], "ran with seeds [0], not [0, 1]"),
    (["--tune", "3"], "ran with tune 2, not 3"),
    (["--set", "spaces.natural.train.lr={type: float, low: 0.001, high: 0.1, log: true}"], "searched other spaces"),
    (["--set", "train.momentum=0.8"], "differs from the interrupted comparison's in 'train'"),
])
def test_resume_refuses_a_comparison_asked_for_differently(tuned, tiny_config_path, changed, says):
    root, out, *_ = tuned
    argv = compare_args(tiny_config_path, root, "--resume")
    for flag, value in zip(changed[::2], changed[1::2], strict=False):
        if flag in argv and flag != "--set":
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, _, err = run_compare(argv)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_each_method_has_its_own_search_in_optuna_and_mlflow_linked_from_the_comparison(tuned):
    root, out, *_ = tuned
    _, comparison_runs = experiment_runs(root, "tiny-digits")
    parent = next(r for r in comparison_runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["compare.tune"] == str(N) and parent.data.params["compare.tune_epochs"] == str(EPOCHS)
    for method in METHODS:
        trials = study_trials(out, method)
        assert len(trials) == N
        assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
        assert set(trials[0].params) == set(default_space(method))
        _, runs = experiment_runs(root, f"tiny-digits-tune-{method}")
        search_parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert [(r.info.run_name, r.info.status) for r in search_parents] == [
            (f"tiny-digits-tune-{method}", "FINISHED")]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search_parents[0].info.run_id]
        assert len(children) == N and len(runs) == N + 1
        assert {t.user_attrs["ray_trial_id"] for t in trials} == {c.data.tags["trial_id"] for c in children}
        assert parent.data.tags[f"tune.{method}.search_run_id"] == search_parents[0].info.run_id
        assert parent.data.tags[f"tune.{method}.search_status"] == "finished"


def test_each_final_run_trains_its_methods_best_config_with_only_the_seed_changed(tuned):
    root, out, *_ = tuned
    _, runs = experiment_runs(root, "tiny-digits")
    finals = {r.data.tags["compare.method"]: r for r in runs if "compare.method" in r.data.tags}
    assert sorted(finals) == sorted(METHODS)
    for method in METHODS:
        search = out / "searches" / f"tiny-digits-tune-{method}"
        best = yaml.safe_load((search / "best_config.yaml").read_text())
        final = yaml.safe_load((out / method / "seed0" / "config.yaml").read_text())
        assert best["teachers"] == final["teachers"] and (method == "natural" or best["teachers"]["clean"]["sha256"])
        best.pop("mlflow"), final.pop("mlflow")  # records to the comparison's experiment,
        assert (best.pop("name"), final.pop("name")) == (f"tiny-digits-tune-{method}", "tiny-digits")  # named by it
        assert final.pop("seed") == 0 and best.pop("seed") == 0
        assert final == best
        assert finals[method].info.status == "FINISHED"
        assert finals[method].data.tags["compare.search_run_id"] == (search / "mlflow_parent_run_id").read_text()


def test_the_table_gives_each_methods_tuned_values_and_search_budget_beside_its_test_accuracy(tuned):
    _, out, *_ = tuned
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in (out / "comparison.md").read_text().splitlines() if line.startswith("|")]
    assert rows[0] == ["method", "tuned values", "trials", "epochs", "search time", "Clean", "PGD-20",
                       "W-Robust (PGD-20)"]
    summary = {row["method"]: row for row in read_csv(out / "comparison_summary.csv")}
    for row in rows[2:]:
        method, tuned_values, trials, epochs, search_time = row[:5]
        best = load_config(out / "searches" / f"tiny-digits-tune-{method}" / "best_config.yaml", check_files=False)
        assert tuned_values == ", ".join(f"{k.rsplit('.', 1)[-1]}={best.get(k):.3g}" for k in default_space(method))
        s = summary[method]
        for key in default_space(method):
            assert float(s[f"tuned.{key}"]) == best.get(key)
        spent = int(s["search_epochs_spent"])
        assert trials == str(N) and s["search_trials"] == str(N) and s["search_epochs_cap"] == str(N * EPOCHS)
        assert epochs == f"{spent} of {N * EPOCHS} ({100 * spent / (N * EPOCHS):.0f}%)"
        assert search_time.endswith(" s") and float(s["search_wall_time_s"]) > 0
        assert 0 <= float(row[5]) <= 100 and int(s["seeds_finished"]) == 1


def test_a_method_whose_search_found_no_usable_trial_gets_a_failed_row_and_exit_1(tiny_config_path, ray_address,
                                                                                  tmp_path, monkeypatch):
    from tune_mtard.search import driver

    def every_trial_diverged(cfg, **kwargs):
        folder = Path(cfg.search.storage) / cfg.name
        folder.mkdir(parents=True)
        (folder / files.PARENT_RUN_ID).write_text("run-id")
        (folder / files.SUMMARY_JSON).write_text(json.dumps({"status": "no_usable_trial", "n_trials": N,
                                                             "n_failed": N, "epochs_spent": 2}))
        return 1

    monkeypatch.setattr(driver, "run_search", every_trial_diverged)
    code, _, err = run_compare(["--config", str(tiny_config_path), "--methods", "natural", "--seeds", "0", "--tune",
                                str(N), "--out", str(tmp_path / "out"), "--tracking-uri",
                                f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 1
    assert "the search of natural found no usable trial" in err
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in (tmp_path / "out" / "comparison.md").read_text().splitlines() if line.startswith("|")]
    assert rows[2][:4] == ["natural (search found no usable trial)", "", f"{N} ({N} failed)", "2 of 4 (50%)"]
    assert rows[2][5:] == ["failed"] * 3
    _, runs = experiment_runs(tmp_path, "tiny-digits")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("tiny-digits-compare-tuned", "FAILED")]


@pytest.mark.parametrize("flags, named", [
    (["--tune", "0"], "--tune"),
    (["--tune-epochs", "2"], "--tune-epochs"),
    (["--resume"], "--resume"),
    (["--tune", "2", "--tune-epochs", "0"], "--tune-epochs"),
    (["--tune", "2", "--resume"], "--resume"),
    (["--tune", "2", "--set", "spaces.foo={train.lr: {type: float, low: 0.01, high: 0.1}}"], "spaces.foo"),
    (["--tune", "2", "--set", "spaces.natural.train.lr={type: float, low: 0.1, high: 0.01}"],
     "spaces.natural.train.lr"),
    (["--tune", "2", "--set", "spaces.natural.train.lr={type: gauss, low: 0.01, high: 0.1}"],
     "spaces.natural.train.lr"),
    (["--tune", "2", "--set", "spaces.natural.train.epochs={type: int, low: 1, high: 3}"],
     "spaces.natural.train.epochs"),
    (["--tune", "2", "--set", "spaces.b-mtard.balance.entropy={type: categorical, choices: [true, false]}"],
     "spaces.b-mtard.balance.entropy"),
    (["--tune", "2", "--set", "spaces.b-mtard.balance.tau_min={type: float, low: 1.0, high: 5.0}"],
     "spaces.b-mtard.balance.tau_min"),
    (["--tune", "2", "--set", "spaces.natural.balance.beta=null"], "spaces.natural.balance.beta"),
    (["--tune", "2", "--set", "spaces.natural={train.lr: null, train.weight_decay: null}"], "spaces.natural"),
])
def test_bad_input_exits_2_with_one_line_before_anything_is_written(tiny_config_path, tmp_path, flags, named):
    out = tmp_path / "out"
    code, _, err = run_compare(["--config", str(tiny_config_path), "--methods", "natural,b-mtard", "--seeds", "0",
                                "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *flags])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and named in err, err
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_every_default_space_is_searchable_on_the_shipped_spaces_and_the_ablations_skip_the_balancer_they_switch_off():
    for space_file in ("digits.yaml", "cifar10.yaml"):
        cfg = load_config(space_file, check_files=False)
        for variant in variants():
            searched = method_search_base(cfg, variant)
            assert list(searched.space) == list(default_space(variant))
            assert {"train.lr", "train.weight_decay"} <= set(searched.space)
    bmtard = set(default_space("b-mtard"))
    entropy, loss = {"balance.tau_min", "balance.tau_max", "balance.tau_lr"}, {"balance.beta", "balance.weight_lr"}
    assert entropy | loss <= bmtard
    assert set(default_space("b-mtard-no-ebb")) == bmtard - entropy
    assert set(default_space("b-mtard-no-nlb")) == bmtard - loss
    assert set(default_space("b-mtard-none")) == bmtard - entropy - loss


def test_a_spaces_entry_lays_its_keys_over_the_default_space_and_no_run_config_holds_it(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"spaces": {"trades": {
        "baselines.trades_beta": {"type": "float", "low": 1.0, "high": 8.0},
        "train.weight_decay": None,
        "train.momentum": {"type": "float", "low": 0.5, "high": 0.95}}}}))
    cfg = load_config(path, check_files=False)
    space = method_space(cfg, "trades")
    assert list(space) == ["train.lr", "baselines.trades_beta", "train.momentum"]
    assert (space["baselines.trades_beta"].low, space["baselines.trades_beta"].high) == (1.0, 8.0)
    assert list(method_space(cfg, "natural")) == ["train.lr", "train.weight_decay"]
    assert "spaces" not in cfg.to_dict() and "spaces" not in cfg.run_config().to_dict(with_search=True)
    assert not any(key.startswith("spaces") for key in cfg.flat())
    assert load_config(path, ["spaces.trades.train.lr=null"], check_files=False).spaces["trades"]["train.lr"] is None
    with pytest.raises(ConfigError, match="spaces.natural.spaces"):
        load_config(path, ["spaces.natural.spaces={type: float, low: 1, high: 2}"], check_files=False)
    with pytest.raises(ConfigError, match="space.spaces"):
        load_config(path, ["space.spaces={type: float, low: 1, high: 2}"], check_files=False)
