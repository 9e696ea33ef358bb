"""Trials of a search as plain rows: their state, and the one ranking whose first element is the best trial.

The best trial (docs/search.md, "Which trial is best") has the best ``search.metric`` at its last report
among the trials that ran the full ``train.epochs``; if none did, among all. Failed trials (errored or
diverged) are never ranked.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_mtard.metrics import EPOCH


class TrialState(str, enum.Enum):
    """How a trial ended, named as Optuna names its trial states."""

    COMPLETE = "COMPLETE"  # ran every epoch
    PRUNED = "PRUNED"  # stopped early by the scheduler (or not finished yet)
    FAIL = "FAIL"  # errored or diverged: never a result


def trial_state(epochs: int, full_epochs: int, failed: bool) -> TrialState:
    """The one rule for a trial's state, used by Optuna, MLflow, ``trials.csv`` and the summary alike."""
    if failed:
        return TrialState.FAIL
    return TrialState.COMPLETE if epochs >= full_epochs else TrialState.PRUNED


@dataclass
class TrialSummary:
    """One trial: its id, sampled values, whether it failed, epochs run, last reported metrics and checkpoint."""

    trial_id: str
    sampled: dict[str, Any]
    failed: bool
    epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None

    def metric(self, name: str) -> float:
        value = self.metrics.get(name)
        return float("nan") if value is None else float(value)

    def state(self, full_epochs: int) -> TrialState:
        return trial_state(self.epochs, full_epochs, self.failed)


def rank_trials(trials: list[TrialSummary], metric: str, mode: str, full_epochs: int) -> list[TrialSummary]:
    """Trials that can be a result, best first: those that ran ``full_epochs`` by ``metric``, then the rest.

    Failed trials and trials without the metric are left out; the first trial is the best one.
    """
    usable = [t for t in trials if not t.failed and not math.isnan(t.metric(metric))]
    sign = -1 if mode == "max" else 1
    full = sorted((t for t in usable if t.epochs >= full_epochs), key=lambda t: sign * t.metric(metric))
    partial = sorted((t for t in usable if t.epochs < full_epochs), key=lambda t: sign * t.metric(metric))
    return full + partial


def best_trial(trials: list[TrialSummary], metric: str, mode: str, full_epochs: int) -> TrialSummary | None:
    ranked = rank_trials(trials, metric, mode, full_epochs)
    return ranked[0] if ranked else None


def summarize_results(grid: Any) -> list[TrialSummary]:
    """The trials of a finished :class:`ray.tune.ResultGrid`."""
    summaries = []
    for result in grid:
        metrics = dict(result.metrics or {})
        checkpoint = result.checkpoint
        summaries.append(TrialSummary(
            trial_id=str(metrics.get("trial_id") or Path(result.path).name),
            sampled=dict(result.config or {}),
            failed=result.error is not None,
            epochs=int(metrics.get(EPOCH, 0) or 0),
            metrics=metrics,
            checkpoint_dir=checkpoint.path if checkpoint is not None else None,
        ))
    return summaries


def load_experiment_trials(folder: str | Path) -> list[TrialSummary]:
    """Every trial of a finished or interrupted search folder, with its last reported metrics.

    The last report is read from the trial's own results, which hold every report: the experiment
    snapshot an interrupted search left can be older.
    """
    from ray.tune import ExperimentAnalysis

    from tune_mtard.search.compat import quiet_experiment_analysis

    with quiet_experiment_analysis():
        analysis = ExperimentAnalysis(str(folder))
        frames = analysis.trial_dataframes
        trials = []
        for trial in analysis.trials:
            last = dict(trial.last_result or {})
            frame = frames.get(trial.path)
            if frame is not None and len(frame) and EPOCH in frame and frame[EPOCH].iloc[-1] > last.get(EPOCH, 0):
                last = frame.iloc[-1].to_dict()
            checkpoint = analysis.get_last_checkpoint(trial)
            trials.append(TrialSummary(
                trial_id=trial.trial_id,
                sampled=dict(trial.config or {}),
                failed=str(trial.status) == "ERROR",
                epochs=int(last.get(EPOCH, 0) or 0),
                metrics=last,
                checkpoint_dir=checkpoint.path if checkpoint is not None else None,
            ))
    return trials
