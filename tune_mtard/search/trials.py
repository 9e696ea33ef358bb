"""Trials of a search as plain rows: their state, and the one ranking whose first element is the best trial.

The best trial (docs/search.md, "Which trial is best") has the best ``search.metric`` at its last report
among the trials that ran the full ``train.epochs``; if none did, among all. Failed trials (errored or
diverged) are never ranked.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_mtard.errors import Diverged
from tune_mtard.files import DIVERGED_JSON, STUDENT
from tune_mtard.metrics import EPOCH
from tune_mtard.models import create_model, load_checkpoint
from tune_mtard.search import compat
from tune_mtard.search.compat import quiet_experiment_analysis, trial_ids
from tune_mtard.search.storage_fs import Storage, folder_on

if TYPE_CHECKING:
    from torch import nn

    from tune_mtard.config import Config
    from tune_mtard.data import DataBundle

STOPPED_BY = "stopped_by"  # a trial stopped by the search's budget: MLflow tag, Optuna user attribute, CSV column
BUDGET = "budget"


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
    """One trial: its id, sampled values, whether it failed, epochs run, last reported metrics and checkpoint.

    ``failure`` says why a failed trial failed: ``diverged at step S (epoch E)`` or the error's first line.
    """

    trial_id: str
    sampled: dict[str, Any]
    failed: bool
    epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Storage | None = None  # the folder of the trial's last checkpoint, wherever the storage is
    failure: str = ""
    diverged: dict[str, int] | None = None  # {"diverged_step": S, "diverged_epoch": E}
    finished: bool = True  # False for a trial an interrupted search left running or pending
    stopped_by: str = ""  # BUDGET for a trial the search's budget stopped
    history: dict[int, float] = field(default_factory=dict)  # epoch -> search.metric, where it is known
    kind: str = ""  # the failure kind judged from the error itself (:func:`error_kind`), where it is known

    def metric(self, name: str) -> float:
        value = self.metrics.get(name)
        return float("nan") if value is None else float(value)

    def state(self, full_epochs: int) -> TrialState:
        return trial_state(self.epochs, full_epochs, self.failed)

    def run_config(self, search: Config, extra: dict[str, Any] | None = None) -> Config:
        """The config this trial ran: the search's run config with the trial's sampled values (then ``extra``)."""
        return search.run_config().with_values({**self.sampled, **(extra or {})})

    def load_student(self, run_config: Config, data: DataBundle) -> nn.Module:
        """The trial's student at its last checkpoint, built as ``run_config`` (its :meth:`run_config`) says."""
        if self.checkpoint is None:
            raise ValueError(f"trial {self.trial_id} has no checkpoint")
        model = create_model(run_config.student.arch, data.num_classes, data.in_channels)
        with self.checkpoint.local_file(STUDENT) as weights:
            load_checkpoint(model, weights)
        return model

    @property
    def failure_kind(self) -> str:
        """``trial``, ``infra`` or ``diverged`` for a failed trial (docs/search.md, "Outcomes"); empty otherwise."""
        if not self.failed:
            return ""
        return self.kind if self.kind and self.diverged is None else failure_kind(self.failure, self.diverged)


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


def write_divergence(trial_dir: Storage, error: Diverged) -> None:
    """The record a diverged trial leaves in its folder (``diverged.json``: ``step``, ``epoch``), which
    :func:`read_divergence` reads."""
    trial_dir.write_text(DIVERGED_JSON, json.dumps({"step": error.step, "epoch": error.epoch}))

def equal_budget_epoch(trials: list[TrialSummary], full_epochs: int) -> int | None:
    """Where a search that its budget stopped compares its trials (docs/search.md, "Budget"): None when some
    trial ran ``full_epochs`` (the usual ranking holds), else the deepest epoch that two usable trials both
    reported (one, when only one trial is usable)."""
    usable = [t for t in trials if not t.failed and t.history]
    if not usable or any(t.epochs >= full_epochs for t in usable):
        return None
    reached = sorted((max(t.history) for t in usable), reverse=True)
    return reached[1] if len(reached) > 1 else reached[0]


def rank_at_epoch(trials: list[TrialSummary], metric: str, mode: str, epoch: int) -> list[TrialSummary]:
    """The trials that reported ``epoch``, best first by their value there (equal budget, each), then the rest
    by :func:`rank_trials`."""
    sign = -1 if mode == "max" else 1
    at = sorted((t for t in trials if not t.failed and not math.isnan(t.history.get(epoch, math.nan))),
                key=lambda t: sign * t.history[epoch])
    chosen = {t.trial_id for t in at}
    return at + [t for t in rank_trials(trials, metric, mode, epoch) if t.trial_id not in chosen]


def read_divergence(trial_dir: Storage) -> dict[str, int] | None:
    """Where a trial diverged (:meth:`Diverged.tags`), from the record :func:`write_divergence` left in its
    folder; None if it did not."""
    try:
        record = json.loads(trial_dir.read_text(DIVERGED_JSON))
    except (OSError, ValueError):
        return None
    return Diverged(int(record["step"]), int(record["epoch"])).tags()


# What the machinery around a trial raises when it, not the trial, failed: a lost worker, actor or node, the
# host's or a card's memory, a full disk. Matched in the error's text, as Ray hands back each error.
INFRA_MARKERS = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
                 "WorkerLostError", "ObjectLostError", "OwnerDiedError", "OutOfMemoryError", "CUDA out of memory",
                 "No space left on device", "ENOSPC", "[Errno 28]")


FAILURE_KIND = "failure_kind"  # the column, MLflow tag and Optuna user attribute
# Ray trial id -> kind, noted by the recorder as a trial fails, for the searcher to set on the Optuna trial
# before it tells the study (both live in the driver; the recorder sees the error, the searcher does not).
FAILURE_KINDS: dict[str, str] = {}


def failure_kind(failure: str, diverged: dict[str, int] | None = None) -> str:
    """How a failed trial failed: ``diverged``, ``infra`` (the machinery around it) or ``trial`` (its own code
    or config)."""
    if diverged is not None:
        return "diverged"
    return "infra" if any(marker in failure for marker in INFRA_MARKERS) else "trial"


def error_kind(error: BaseException | None) -> str:
    """``infra`` or ``trial`` for the exception Ray hands the driver as a trial fails: a dead actor or worker
    is infra; a task error is judged by its cause (its type and message, not the traceback around it)."""
    from ray.exceptions import RayActorError, RayTaskError

    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(cause, RayActorError):
        return "infra"
    return failure_kind(f"{type(cause).__name__}: {cause}")


def trial_failure_kind(trial: Any, diverged: dict[str, int] | None) -> str:
    """The failure kind of a failed Ray trial, judged as the retry rule judges it, from the exception (a dead
    worker's error names no marker in its text): the rule's own judgement in this driver, else the exception Ray
    pickled for the trial's latest failure, else its error file's last line."""
    if diverged is not None:
        return "diverged"
    judged = compat.judged_failure_kind(trial)
    if judged is not None:
        return judged
    try:
        error = trial.get_pickled_error()
    except Exception:  # an error that does not unpickle here: its text is all there is
        error = None
    if isinstance(error, BaseException):
        return error_kind(error)
    return failure_kind(error_file_text(folder_on(trial.storage.storage_filesystem, trial.path)))


def error_file_text(trial_dir: Storage) -> str:
    """The last line of the traceback Ray wrote into a failed trial's folder (``error.txt``), or ``error``."""
    try:
        lines = [line for line in trial_dir.read_text("error.txt").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return "error"
    return (lines[-1] if lines else "error")[:500]


def failure_text(error: BaseException | None, diverged: dict[str, int] | None) -> str:
    if diverged is not None:
        return f"diverged at step {diverged['diverged_step']} (epoch {diverged['diverged_epoch']})"
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:500]


def _history(frame: Any, metric: str) -> dict[int, float]:
    if frame is None or EPOCH not in frame or metric not in frame:
        return {}
    return {int(e): float(v) for e, v in zip(frame[EPOCH], frame[metric], strict=False) if e == e and v == v}


def summarize_results(grid: Any, metric: str | None = None) -> list[TrialSummary]:
    """The trials of a finished :class:`ray.tune.ResultGrid` (with each one's ``metric`` per epoch, if named)."""
    summaries = []
    for trial_id, result in zip(trial_ids(grid), grid, strict=True):
        metrics = dict(result.metrics or {})
        checkpoint = result.checkpoint
        diverged = read_divergence(folder_on(result.filesystem, result.path)) if result.error is not None else None
        summaries.append(TrialSummary(
            trial_id=trial_id,
            sampled=dict(result.config or {}),
            failed=result.error is not None,
            epochs=int(metrics.get(EPOCH, 0) or 0),
            metrics=metrics,
            checkpoint=folder_on(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None,
            failure=failure_text(result.error, diverged),
            diverged=diverged,
            history=_history(result.metrics_dataframe, metric) if metric else {},
            kind=error_kind(result.error) if isinstance(result.error, BaseException) else "",
        ))
    return summaries


def load_experiment_trials(folder: str | Path, filesystem: Any = None) -> list[TrialSummary]:
    """Every trial of a finished or interrupted search folder, with its last reported metrics (``filesystem``:
    the ``pyarrow.fs`` filesystem ``folder`` is a path of, for object storage; None: a local folder).

    The last report is read from the trial's own results, which hold every report: the experiment
    snapshot an interrupted search left can be older.
    """
    from ray.tune import ExperimentAnalysis

    with quiet_experiment_analysis():
        analysis = ExperimentAnalysis(str(folder), storage_filesystem=filesystem)
        frames = analysis.trial_dataframes
        trials = []
        for trial in analysis.trials:
            last = dict(trial.last_result or {})
            frame = frames.get(trial.path)
            if frame is not None and len(frame) and EPOCH in frame and frame[EPOCH].iloc[-1] > last.get(EPOCH, 0):
                last = frame.iloc[-1].to_dict()
            checkpoint = analysis.get_last_checkpoint(trial)
            failed = str(trial.status) == "ERROR"
            trial_dir = folder_on(trial.storage.storage_filesystem, trial.path)
            diverged = read_divergence(trial_dir) if failed else None
            trials.append(TrialSummary(
                trial_id=trial.trial_id,
                sampled=dict(trial.config or {}),
                failed=failed,
                epochs=int(last.get(EPOCH, 0) or 0),
                metrics=last,
                checkpoint=folder_on(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None,
                failure=failure_text(None, diverged) or (error_file_text(trial_dir) if failed else ""),
                diverged=diverged,
                finished=str(trial.status) in ("TERMINATED", "ERROR"),
                kind=trial_failure_kind(trial, diverged) if failed else "",
            ))
    return trials
