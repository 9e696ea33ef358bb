"""search.budget: a digits search whose budget is spent at its first reports stops there, exits 0 with a best
config chosen at an equal epoch, and every record names the budget; --resume with a larger budget continues
(docs/search.md, "Budget")."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
from searchkit import NUM_SAMPLES, mlflow_runs, optuna_trials, ray_reports, search_args

from tune_mtard.cli import search
from tune_mtard.cli.common import run as cli_run
from tune_mtard.search.trials import TrialSummary, equal_budget_epoch, rank_at_epoch


def run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = search.main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def budget_search(space_file, ray_address, tmp_path_factory) -> dict:
    """5 trials of 3 epochs, 2 at a time, with 0.36 s of trial time as the budget: spent at the first reports."""
    root = tmp_path_factory.mktemp("budget")
    name = "tiny-budget"
    code, stdout = run(search_args(space_file, root, name, "--set", "search.budget.device_hours=0.0001"))
    folder = root / "results" / name
    return {"root": root, "name": name, "folder": folder, "code": code, "stdout": stdout, "space": space_file,
            "summary": json.loads((folder / "summary.json").read_text()), "reports": ray_reports(folder)}


def test_a_spent_budget_ends_the_search_with_exit_0_and_a_best_config(budget_search):
    assert budget_search["code"] == 0, budget_search["stdout"][-2000:]
    assert (budget_search["folder"] / "best_config.yaml").is_file()
    summary = budget_search["summary"]
    assert summary["status"] == "finished"
    budget = summary["budget"]
    assert budget["reached"] == "device_hours" and budget["limits"]["device_hours"] == 0.0001
    assert budget["unit"] == "CPU core-hours" and budget["spent"]["device_hours"] >= 0.0001
    assert "budget reached (device_hours 0.0001)" in budget_search["stdout"]


def test_no_trial_starts_after_the_budget_is_spent_and_running_ones_stop_at_their_next_report(budget_search):
    reports = budget_search["reports"]
    # The budget is spent by the first report: the two trials running then stop at their next report (each
    # reports at most twice; ASHA may stop one first, at its rung), and no other trial ever reports.
    assert 1 <= len(reports) <= 2 < NUM_SAMPLES
    assert all(len(rows) <= 2 for rows in reports.values())
    stopped = set(budget_search["summary"]["budget"]["stopped_trials"])
    assert set(reports) & stopped
    # The trials the searcher proposed but the budget kept from starting are stopped by it too, at 0 epochs.
    summary = budget_search["summary"]
    assert summary["n_trials"] - len(reports) == len(stopped - set(reports))


def test_every_record_names_the_budget(budget_search):
    folder, name = budget_search["folder"], budget_search["name"]
    stopped = set(budget_search["summary"]["budget"]["stopped_trials"])
    with (folder / "trials.csv").open() as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert {tid for tid, r in rows.items() if r["stopped_by"] == "budget"} == stopped & set(rows)
    assert all(rows[tid]["state"] == "PRUNED" for tid in stopped & set(rows))  # not COMPLETE, not FAIL
    client, parents, children = mlflow_runs(budget_search["root"], name)
    assert parents[0].data.tags["budget_reached"] == "device_hours"
    assert parents[0].data.tags["budget.device_hours"] == "0.0001"
    reported = set(budget_search["reports"]) & stopped
    for child in children:
        if child.data.tags["trial_id"] in reported:
            assert child.data.tags["stopped_by"] == "budget"
            assert child.info.status == "KILLED"
    told = {t.user_attrs.get("ray_trial_id"): t for t in optuna_trials(folder, name)}
    for tid in stopped:  # those it stopped at a report, and those it kept from starting
        assert told[tid].state.name == "PRUNED" and told[tid].user_attrs["stopped_by"] == "budget"


def test_resume_with_a_larger_budget_continues_the_search(budget_search):
    before = set(budget_search["reports"])
    code, stdout = run(search_args(budget_search["space"], budget_search["root"], budget_search["name"], "--resume",
                                   "--set", "search.budget.device_hours=10"))
    assert code == 0, stdout[-2000:]
    summary = json.loads((budget_search["folder"] / "summary.json").read_text())
    assert summary["budget"]["reached"] is None and summary["budget"]["limits"]["device_hours"] == 10
    after = ray_reports(budget_search["folder"])
    assert before < set(after) and len(after) == NUM_SAMPLES
    assert summary["n_trials"] == NUM_SAMPLES
    # ASHA's fidelity of the whole search (rungs 1 and 2 of 3 epochs), in the summary, sensitivity.md and MLflow.
    fidelity = summary["asha_fidelity"]
    assert fidelity["rungs"] == [1, 2] and fidelity["sentence"]
    assert "## ASHA's fidelity" in (budget_search["folder"] / "sensitivity.md").read_text()
    _, parents, _ = mlflow_runs(budget_search["root"], budget_search["name"])
    assert parents[0].data.tags["asha_fidelity"] == fidelity["sentence"]


def trial(tid: str, history: dict[int, float]) -> TrialSummary:
    last = max(history)
    return TrialSummary(tid, {}, False, last, {"val_w_robust_acc": history[last]}, history=history)


def test_trials_a_budget_stopped_are_compared_at_the_deepest_epoch_two_of_them_reached():
    trials = [trial("a", {1: 0.5, 2: 0.6}), trial("b", {1: 0.7}), trial("c", {1: 0.4, 2: 0.65, 3: 0.9})]
    # c alone reached epoch 3; a and c both reached 2: compared there, c (0.65) beats a (0.6), b comes last.
    assert equal_budget_epoch(trials, full_epochs=5) == 2
    assert [t.trial_id for t in rank_at_epoch(trials, "val_w_robust_acc", "max", 2)] == ["c", "a", "b"]
    # A trial that ran the full budget: the usual ranking holds.
    assert equal_budget_epoch(trials + [trial("d", {1: 0.1, 5: 0.2})], full_epochs=5) is None


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_a_budget_that_is_not_a_positive_number_is_exit_2_naming_the_key(space_file, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cli_run(search.main, search_args(space_file, tmp_path, "bad-budget", "--set",
                                         f"search.budget.wall_hours={value}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "search.budget.wall_hours" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "results").exists()
