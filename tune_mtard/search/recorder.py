"""The MLflow side of a search: the parent run's records and the one writer of the child runs.

:class:`MlflowTrialRecorder` runs in the driver, so many concurrent trials never lock a sqlite store:
one child run per trial, named and tagged by its Ray Tune trial id, params = the sampled dotted keys,
metrics per epoch, and at the end the trial's balance trace, its plot and the student weights
(docs/search.md, "Records").
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray.tune import Callback

from tune_mtard import atomic, files, tracking
from tune_mtard.config import Config, flatten
from tune_mtard.diagnostics import csv_values, flag_counts, flag_tags
from tune_mtard.metrics import DIAGNOSTICS, EPOCH, EPOCH_METRICS, VAL_CLEAN_ACC, VAL_ROBUST_ACC, VALIDATION
from tune_mtard.plots import plot_clean_vs_robust, plot_pareto, plot_trace
from tune_mtard.search import journal
from tune_mtard.search.journal_ops import PARENT_TAG, TRIAL_ID_TAG, child_runs_filter
from tune_mtard.search.pareto import default_trial, front_objectives, pareto_front, write_pareto_csv
from tune_mtard.search.storage_fs import folder_on
from tune_mtard.search.trials import (
    BUDGET,
    FAILURE_KIND,
    FAILURE_KINDS,
    STOPPED_BY,
    TrialState,
    TrialSummary,
    read_divergence,
    trial_failure_kind,
    trial_state,
)

log = logging.getLogger(__name__)

REPORTED = EPOCH_METRICS + DIAGNOSTICS  # what each report of a trial logs to its child run


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / files.TRIAL_STATE, map_location="cpu", weights_only=True)


class MlflowTrialRecorder(Callback):
    """The one MLflow writer of a search (runs in the driver). Picklable: Ray stores it with the tuner.

    Every record goes to the search's journal first (``tune_mtard.search.journal``) and a background thread
    sends it, so a Tune callback never waits on MLflow or raises into Ray Tune. Each trial's run has the
    journal key of its Ray Tune trial id. A resumed search finds the trial's run again by that key (no
    duplicates), logs only the epochs the journal does not hold yet (a trial continued from a checkpoint older
    than its last report repeats an epoch), and does not log the files of a run already finished again.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, full_epochs: int,
                 search_name: str, extra_tags: dict[str, str] | None = None, budget=None,
                 folder: str | Path | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.full_epochs = full_epochs
        self.search_name = search_name
        self.extra_tags = dict(extra_tags or {})  # on every child run this recorder creates
        self.budget = budget  # a BudgetMeter: a trial it stopped ends KILLED, tagged stopped_by: budget
        self.folder = str(Path(folder if folder is not None else ".").resolve())  # where the journal is
        self._opened: dict[str, int | None] = {}  # keys (re)opened by this process -> epochs it was finished with

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_opened"] = {}  # a restored driver reopens each run it sees again
        return state

    @property
    def journal(self) -> journal.RecordJournal:
        return journal.writer_for(self.folder, self.tracking_uri).journal

    def _record(self, op: str, key: str, **fields: Any) -> None:
        journal.record(self.folder, self.tracking_uri, op, key, **fields)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the journal to reach MLflow; whether every record did."""
        return journal.writer_for(self.folder, self.tracking_uri).drain(timeout_s)

    def run_id(self, trial) -> str:
        """The journal key of the trial's child run, (re)opened once per driver process."""
        key = trial.trial_id
        if key not in self._opened:
            self._opened[key] = self.journal.finished_epochs(key)
            if not self.journal.has_run(key):
                self._record("run", key, experiment_id=self.experiment_id, name=key, tags={
                    PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: key, "tune_mtard.search": self.search_name,
                    **self.extra_tags})
                self._record("params", key, values=dict(trial.config))
            else:
                self._record("run", key, experiment_id=self.experiment_id, name=key, tags={})
        return key

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        _never_raise(self._start, trial)

    def _start(self, trial) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        _never_raise(self._result, trial, result)

    def _result(self, trial, result) -> None:
        key = self.run_id(trial)
        epoch = int(result.get(EPOCH, result.get("training_iteration", 0)))
        nodes = self.__dict__.setdefault("_nodes", {})  # key -> node tagged: once per trial, again if it moved
        if "node_id" in result and nodes.get(key) != result["node_id"]:
            self._record("tags", key, values={"node_id": result["node_id"]})
            nodes[key] = result["node_id"]
        if self.journal.has_step(key, epoch):
            return
        self._record("metrics", key, step=epoch, **journal.metrics_entry(
            {k: v for k, v in result.items() if k in REPORTED}))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        _never_raise(self._complete, trial)

    def _complete(self, trial) -> None:
        key = self.run_id(trial)
        epochs = int((trial.last_result or {}).get(EPOCH, 0))
        state = trial_state(epochs, self.full_epochs, failed=False)
        by_budget = self.budget is not None and self.budget.stopped(trial.trial_id)
        self._record("tags", key, values={"epochs_run": epochs, "trial_state": state.value,
                                          **({STOPPED_BY: BUDGET} if by_budget else {}),
                                          **flag_tags(trial.last_result or {})})
        if self._opened[key] != epochs:
            try:
                self._log_trial_files(trial, key)
            except Exception as exc:  # a missing checkpoint must not lose the rest of the records
                log.warning("could not log the files of trial %s: %s", trial.trial_id, exc)
        self._record("status", key, status=tracking.KILLED if by_budget else tracking.FINISHED)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _never_raise(self._error, trial)

    def _error(self, trial) -> None:
        """A failed trial: FAILED, with where it diverged (and its trace up to there) or the error."""
        key = self.run_id(trial)
        trial_dir = folder_on(trial.storage.storage_filesystem, trial.path)
        diverged = read_divergence(trial_dir)
        tags: dict[str, Any] = {"trial_state": TrialState.FAIL.value}
        tags[FAILURE_KIND] = FAILURE_KINDS[trial.trial_id] = trial_failure_kind(trial, diverged)
        if diverged is not None:
            tags.update(diverged, failure="diverged")
            if trial_dir.exists(files.TRACE_CSV):
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        trace, png = Path(tmp) / files.TRACE_CSV, Path(tmp) / files.TRACE_PNG
                        trace.write_bytes(trial_dir.read_bytes(files.TRACE_CSV))
                        plot_trace(trace, png, title=f"trial {trial.trial_id}: diverged at step "
                                                      f"{diverged['diverged_step']}")
                        self._record("artifacts", key, paths=[str(trace), str(png)])
                except Exception as exc:  # the tags matter more than the plot
                    log.warning("could not log the trace of diverged trial %s: %s", trial.trial_id, exc)
        else:
            tags["failure"] = _error_line(trial)
        if trial.error_file and Path(trial.error_file).is_file():  # the traceback the terminal does not show
            self._record("artifacts", key, paths=[str(trial.error_file)])
        self._record("tags", key, values=tags)
        self._record("status", key, status=tracking.FAILED)

    def _log_trial_files(self, trial, run_id: str) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:  # the trace and its plot are made by the journal's writer
            self._record("trace", run_id, paths=[str(Path(folder) / files.TRIAL_STATE)],
                         title=f"trial {trial.trial_id}: balance trace")
            self._record("artifacts", run_id, paths=[str(Path(folder) / files.STUDENT)], artifact_path="model")


def _never_raise(callback, *args) -> None:
    """A Tune callback's work: an error in it is logged, never raised into Ray Tune (which would count it as
    the trial's failure and restart a finished trial)."""
    try:
        callback(*args)
    except Exception as exc:
        log.warning("a record of the search was not journaled (%s: %s)", type(exc).__name__, exc)


def _error_line(trial) -> str:
    """The last line of the trial's error file (Ray writes each failure's traceback there)."""
    try:
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "error"
    return (lines[-1] if lines else "error")[:500]


def child_run_id(client, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow child run the search recorded for ``trial_id`` under ``parent_run_id``."""
    found = client.search_runs([experiment_id], filter_string=child_runs_filter(parent_run_id, trial_id),
                               max_results=1)
    return found[0].info.run_id if found else None


def start_parent(parent: tracking.RunHandle, cfg: Config, folder: Path) -> None:
    """A new search's parent run: the space (file and ``search.*`` params) and the search's settings."""
    atomic.write_text(folder / files.PARENT_RUN_ID, parent.run_id)
    cfg.dump(folder / files.SPACE, with_search=True)
    parent.log_params(flatten(cfg.to_dict(with_search=True)["search"], "search."))
    parent.log_params({"name": cfg.name, "data.dataset": cfg.data.dataset, "train.epochs": cfg.train.epochs,
                       "method": cfg.method})
    parent.log_artifacts([folder / files.SPACE])


def log_teachers(parent: tracking.RunHandle, teachers) -> None:
    """The teacher files the search uses (path and sha256, as params) and their validation quality (metrics)."""
    parent.log_params(teachers.pins())
    parent.log_metrics(teachers.quality_metrics(), step=0)


def write_trials_csv(trials: list[TrialSummary], path: Path, space_keys: list[str], full_epochs: int) -> None:
    columns = ["trial_id", "state", "epochs", *VALIDATION, *DIAGNOSTICS, "failure", "failure_kind", STOPPED_BY,
               *space_keys]
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for t in trials:
            state = t.state(full_epochs).value if t.finished else "RUNNING"
            writer.writerow([t.trial_id, state, t.epochs] + [t.metrics.get(k, "") for k in VALIDATION]
                            + list(csv_values(t.metrics).values()) + [t.failure, t.failure_kind, t.stopped_by]
                            + [t.sampled.get(k, "") for k in space_keys])


def record_search(parent: tracking.RunHandle, cfg: Config, folder: Path, trials: list[TrialSummary],
                  best: TrialSummary | None, wall: float, status: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parent run's records of a search that ran: ``trials.csv``, the clean-vs-robust plot, the summary
    (also ``summary.json``, with the outcome as ``status``) and the best config. Returns the summary."""
    full = cfg.train.epochs
    trials_csv = folder / files.TRIALS_CSV
    write_trials_csv(trials, trials_csv, list(cfg.space or {}), full)
    scatter = folder / files.TRIALS_PLOT
    points = [(t.trial_id, t.metric(VAL_CLEAN_ACC), t.metric(VAL_ROBUST_ACC)) for t in trials if not t.failed]
    plot_clean_vs_robust(points, scatter, None if best is None else
                         (best.trial_id, best.metric(VAL_CLEAN_ACC), best.metric(VAL_ROBUST_ACC)))
    states = [t.state(full) for t in trials if t.finished]
    failed = [t for t in trials if t.failed]
    summary: dict[str, Any] = {
        "n_trials": len(trials),
        "n_complete": states.count(TrialState.COMPLETE),
        "n_pruned": states.count(TrialState.PRUNED),
        "n_failed": len(failed),
        "n_diverged": sum(t.diverged is not None for t in failed),
        "n_errored": sum(t.diverged is None for t in failed),
        "n_unfinished": sum(not t.finished for t in trials),
        "epochs_spent": sum(t.epochs for t in trials),
        "epochs_full_budget": len(trials) * full,
        "wall_time_s": wall,
        **flag_counts(t.metrics for t in trials if not t.failed),
    }
    artifacts = [trials_csv, scatter]
    if best is not None:
        for key in VALIDATION:
            summary[f"best_{key}"] = best.metric(key)
        artifacts.append(folder / files.BEST_CONFIG)
        parent.set_tags({"best_trial_id": best.trial_id})
    parent.log_metrics(summary, step=0)
    summary.update(status=status, best_trial_id=best.trial_id if best else None,
                   failed_trials=[{"trial_id": t.trial_id, "reason": t.failure, "failure_kind": t.failure_kind,
                                   **(t.diverged or {})} for t in failed],
                   **(extra or {}))
    atomic.write_text(folder / files.SUMMARY_JSON, json.dumps(summary, indent=2))
    artifacts.append(folder / files.SUMMARY_JSON)
    parent.log_artifacts(artifacts)
    return summary


def record_front(parent: tracking.RunHandle, cfg: Config, folder: Path, trials: list[TrialSummary]) -> list:
    """``pareto.csv`` and ``pareto.png`` of the search's Pareto front, on the parent run; the front's child runs
    tagged ``pareto: true`` so the MLflow UI can filter them. Returns the front."""
    objectives, modes = front_objectives(cfg)
    front = pareto_front(trials, objectives, modes, cfg.train.epochs)
    write_pareto_csv(front, folder / files.PARETO_CSV, objectives, list(cfg.space or {}))
    x, y = objectives[:2]
    points = [(t.trial_id, t.metric(x), t.metric(y)) for t in trials if not t.failed]
    default = default_trial(trials, cfg)
    plot_pareto(points, [(t.trial_id, t.metric(x), t.metric(y)) for t in front], folder / files.PARETO_PNG,
                xlabel=f"{x} ({modes[0]})", ylabel=f"{y} ({modes[1]})", modes=(modes[0], modes[1]),
                default=None if default is None or default.failed else
                (default.trial_id, default.metric(x), default.metric(y)))
    parent.log_artifacts([folder / files.PARETO_CSV, folder / files.PARETO_PNG])
    for t in front:
        parent.tag_child(t.trial_id, {"pareto": "true"})
    parent.log_metrics({"pareto_front_size": len(front)}, step=0)
    return front
