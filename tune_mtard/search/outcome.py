"""How a search ends, and what it hands over (docs/search.md, "Outcomes").

After the Tuner returns: ``interrupted`` when a signal stopped it (its records KILLED, resumable), else
the trials are settled, the best (or seed-confirmed) trial chosen, and the search is ``finished`` (its
config exported with the teachers pinned, its student registered as an MLflow Model) or
``no_usable_trial``. Either way the parent run gets the summary, the Pareto front and the sensitivity
analysis.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_mtard import files, tracking
from tune_mtard.config import Config
from tune_mtard.metrics import VAL_CLEAN_ACC, VAL_ROBUST_ACC, VALIDATION
from tune_mtard.model_registry import register_student
from tune_mtard.search import confirm as confirmation
from tune_mtard.search.remote import ray_experiment
from tune_mtard.search.sensitivity import analyze_search, log_sensitivity
from tune_mtard.search.study_storage import optuna_storage_url
from tune_mtard.search.trials import best_trial, load_experiment_trials, rank_at_epoch, summarize_results

Rerun = Callable[[list[dict[str, Any]]], Any]  # runs the confirmation trials; None when a signal stopped them


@dataclass
class SearchOutcome:
    """How a search ended: ``finished``, ``no_usable_trial`` or ``interrupted``, with its summary."""

    status: str
    summary: dict[str, Any]
    exit_code: int


def reproducible_values(cfg: Config, sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values plus the thread count it ran with, so ``train`` repeats it exactly on a CPU."""
    threads = cfg.perf.threads or max(1, int(cfg.search.resources.cpu))
    return {**sampled, "perf.threads": threads}


def interrupted(cfg: Config, folder: Path, parent, start: float) -> SearchOutcome:
    """Tune saved the interrupted trials as unfinished (resumable) and Optuna keeps them RUNNING for
    ``--resume``; their child runs and the parent run end KILLED."""
    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.budget import budget_outcome
    from tune_mtard.search.recorder import record_search

    (folder / files.BEST_CONFIG).unlink(missing_ok=True)
    trials = load_experiment_trials(*ray_experiment(cfg))
    parent.kill_running_children()
    budget = budget_outcome(cfg, folder, trials, parent)
    summary = record_search(parent, cfg, folder, trials, None, time.perf_counter() - start, "interrupted",
                            extra={"budget": budget} if budget else None)
    parent.set_tags({"search_status": "interrupted"})
    analyze(cfg, folder, trials, parent)
    return SearchOutcome("interrupted", summary, 130)


def conclude(cfg: Config, folder: Path, grid, teachers, data, parent, start: float, rerun: Rerun) -> SearchOutcome:
    """Pick and record the outcome: the best or confirmed trial's config (teachers pinned) and registered
    student, the parent run's records, the summary."""
    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.budget import budget_outcome
    from tune_mtard.search.recorder import record_front, record_search
    from tune_mtard.search.searcher import close_orphaned_optuna_trials

    s = cfg.search
    best_path = folder / files.BEST_CONFIG
    best_path.unlink(missing_ok=True)  # only a finished search has one
    trials = summarize_results(grid, s.metric)
    trial_ids = {t.trial_id for t in trials}
    close_orphaned_optuna_trials(optuna_storage_url(cfg, folder), cfg.name, trial_ids)
    parent.prune_children(trial_ids)  # journaled: sent when MLflow answers
    best = best_trial(trials, s.metric, s.mode, cfg.train.epochs)
    budget = budget_outcome(cfg, folder, trials, parent)
    if budget and budget["compared_at_epoch"] is not None:
        best = next(iter(rank_at_epoch(trials, s.metric, s.mode, budget["compared_at_epoch"])), None)
    confirmation = None
    if best is not None and s.confirm.top_k > 0:
        confirmation = confirm_top_trials(cfg, folder, trials, parent, rerun)
        if confirmation is None:
            return interrupted(cfg, folder, parent, start)
        if confirmation["winner"] is not None:
            best = next(t for t in trials if t.trial_id == confirmation["winner"])
    if best is not None:
        best.run_config(cfg, {**reproducible_values(cfg, best.sampled), **teachers.pins()}).dump(best_path)
    status = "finished" if best is not None else "no_usable_trial"
    extra = {**({"confirm": confirmation} if confirmation else {}), **({"budget": budget} if budget else {})}
    summary = record_search(parent, cfg, folder, trials, best, time.perf_counter() - start, status, extra=extra)
    parent.set_tags({"search_status": status})
    record_front(parent, cfg, folder, trials)
    analyze(cfg, folder, trials, parent)
    if best is None:
        parent.failed = True
    else:
        test_metrics: dict[str, float] = {}
        if s.final_eval.top_k > 0:
            # ray and optuna load at import of these: only a running search needs them
            from tune_mtard.search.final_eval import evaluate_top_trials

            results = evaluate_top_trials(cfg, trials, data, parent.client, parent.run_id, folder, first=best.trial_id)
            test_metrics = next((r.metrics for r in results if r.trial_id == best.trial_id), {})
        register(cfg, best, test_metrics, best_path, data, parent)
    print_result(cfg, best, best_path, summary, folder)
    return SearchOutcome(status, summary, 0 if best is not None else 1)


def confirm_top_trials(cfg: Config, folder: Path, trials, parent, rerun: Rerun) -> dict[str, Any] | None:
    """The seed confirmation of the ``confirm.top_k`` best trials; None when a signal stopped it."""
    chosen = confirmation.candidates(cfg, trials)
    print(f"confirming the {len(chosen)} best trials on {cfg.search.confirm.seeds} more seeds each", flush=True)
    grid = rerun(confirmation.rerun_points(cfg, chosen))
    if grid is None:
        return None
    reruns = confirmation.tally(cfg, chosen, grid)
    confirmation.write_confirm_csv(chosen, reruns, folder / files.CONFIRM_CSV, cfg)
    won = confirmation.winner(cfg, chosen)
    record = {"top_k": cfg.search.confirm.top_k, "seeds": cfg.search.confirm.seeds,
              "candidates": [c.record() for c in chosen], "winner": won.trial.trial_id if won else None}
    metric = cfg.search.metric
    parent.log_metrics({f"confirm/{c.trial.trial_id}/{metric}_{stat}": value for c in chosen
                        for stat, value in (("mean", c.mean), ("std", c.std))}, step=0)
    parent.log_artifacts([folder / files.CONFIRM_CSV])
    if won is not None:
        parent.set_tags({"confirmed_trial_id": won.trial.trial_id})
    for c in chosen:
        print(f"  trial {c.trial.trial_id}: {metric} {c.mean:.4f} ± {c.std:.4f} over seeds "
              f"{', '.join(map(str, sorted(c.values)))}"
              + (f" (failed on seeds {c.failed_seeds})" if c.failed_seeds else ""), flush=True)
    return record


def register(cfg: Config, best, test_metrics: dict[str, float], best_path: Path, data, parent) -> None:
    """The best student as an MLflow Model, registered as ``search.register_as``: a report, not a result, so a
    failure is a warning (the weights stay in the trial's checkpoint and child run)."""
    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.recorder import child_run_id

    name = cfg.name if cfg.search.register_as == "auto" else cfg.search.register_as
    if not name or best.checkpoint is None:
        return
    try:
        model = best.load_student(best.run_config(cfg), data)
        experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
        run_id = child_run_id(parent.client, experiment_id, parent.run_id, best.trial_id) or parent.run_id
        tags = {"trial_id": best.trial_id, "search": cfg.name, "config": best_path.read_text(),
                **{k: best.metrics[k] for k in VALIDATION if k in best.metrics}, **test_metrics}
        registered = register_student(parent.client, run_id, model, data, name, tags)
    except Exception as exc:
        print(f"warning: the best student was not registered as {name!r} ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return
    parent.set_tags({"registered_model": registered.model_uri})
    print(f"registered:  {registered.model_uri} (load it with mlflow.pytorch.load_model)", flush=True)


def analyze(cfg: Config, folder: Path, trials, parent) -> None:
    """The search's sensitivity analysis (docs/sensitivity.md), beside best_config.yaml and on the parent run.
    A report, not a result: if it fails, the search still ends as it ended, with a warning."""
    try:
        report = analyze_search(folder, cfg, trials)
        log_sensitivity(parent, report)
        if report.fidelity is not None:  # ASHA's fidelity joins the summary (docs/sensitivity.md)
            summary_path = folder / files.SUMMARY_JSON
            summary = json.loads(summary_path.read_text())
            summary_path.write_text(json.dumps({**summary, "asha_fidelity": report.fidelity}, indent=2))
            parent.log_artifacts([summary_path])
            if report.fidelity["sentence"]:
                print(f"ASHA's fidelity: {report.fidelity['sentence']}", flush=True)
    except Exception as exc:
        print(f"warning: the sensitivity analysis failed ({type(exc).__name__}: {exc}); rerun it with "
              f"python -m tune_mtard.analyze --experiment {folder}", file=sys.stderr)


def print_result(cfg: Config, best, best_path: Path, summary: dict[str, Any], folder: Path) -> None:
    full = cfg.train.epochs
    print()
    print(f"search {cfg.name}: {summary['n_trials']} trials, {summary['n_pruned']} stopped early by ASHA, "
          f"{summary['n_failed']} failed ({summary['n_diverged']} diverged), {summary['epochs_spent']} of "
          f"{summary['n_trials'] * full} epochs, {summary['wall_time_s']:.0f}s")
    for failure in summary["failed_trials"]:
        print(f"  failed: trial {failure['trial_id']}: {failure['reason']}")
    budget = summary.get("budget") or {}
    if budget.get("reached"):
        compared = budget["compared_at_epoch"]
        print(f"  budget reached ({budget['reached']} {budget['limits'][budget['reached']]:g}): no trial started after "
              f"it, {len(budget['stopped_trials'])} stopped by it"
              + (f"; trials compared at epoch {compared}" if compared is not None else ""))
    if best is None:
        print(f"no usable trial: every trial failed or diverged, so there is no best config; see the trials' "
              f"records above and the Ray Tune logs in {folder}", file=sys.stderr)
        return
    metric = cfg.search.metric
    chosen = "confirmed trial" if summary.get("confirm") else "best trial"
    print(f"{chosen} {best.trial_id}: {metric} {best.metric(metric):.4f} (clean {best.metric(VAL_CLEAN_ACC):.4f}, "
          f"robust {best.metric(VAL_ROBUST_ACC):.4f}, {best.epochs} epochs)")
    for key, value in best.sampled.items():
        print(f"  {key} = {value:.6g}" if isinstance(value, float) else f"  {key} = {value}")
    print(f"best config: {best_path}")
    print(f"train it:    python -m tune_mtard.train --config {best_path}")
    try:
        print(tracking.ui_hint(cfg.mlflow.tracking_uri, cfg.mlflow.experiment))
    except Exception:  # MLflow is down: the link is a convenience, the records wait in the journal
        print(f"MLflow UI:   {tracking.ui_link(cfg.mlflow.tracking_uri, '0')}")
