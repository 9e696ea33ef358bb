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
from tune_mtard.search.pareto import default_trial, front_objectives, pareto_front, write_pareto_csv
from tune_mtard.search.trials import (
    BUDGET,
    FAILURE_KIND,
    FAILURE_KINDS,
    STOPPED_BY,
    TrialState,
    TrialSummary,
    failure_kind,
    read_divergence,
    trial_state,
)
from tune_mtard.trace import write_trace

log = logging.getLogger(__name__)

TRIAL_ID_TAG = "trial_id"
REPORTED = EPOCH_METRICS + DIAGNOSTICS  # what each report of a trial logs to its child run
PARENT_TAG = "mlflow.parentRunId"


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / files.TRIAL_STATE, map_location="cpu", weights_only=True)


def child_runs_filter(parent_run_id: str, trial_id: str | None = None) -> str:
    """The MLflow search filter for the child runs of a search (or for one trial's)."""
    parent = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return parent if trial_id is None else f"tags.{TRIAL_ID_TAG} = '{trial_id}' and {parent}"


class MlflowTrialRecorder(Callback):
    """The one MLflow writer of a search (runs in the driver). Picklable: Ray stores it with the tuner.

    A resumed search finds each trial's child run again by its ``trial_id`` tag, logs only the epochs the
    run does not hold yet (a trial continued from a checkpoint older than its last report repeats an
    epoch), and does not log the files of a run that is already finished again.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, full_epochs: int,
                 search_name: str, extra_tags: dict[str, str] | None = None, budget=None):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.full_epochs = full_epochs
        self.search_name = search_name
        self.extra_tags = dict(extra_tags or {})  # on every child run this recorder creates
        self.budget = budget  # a BudgetMeter: a trial it stopped ends KILLED, tagged stopped_by: budget
        self._client = None
        self._run_ids: dict[str, str] = {}
        self._logged_epochs: dict[str, set[int]] = {}
        self._finished_runs: dict[str, int] = {}  # run id -> epochs it was finished with

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = tracking.client_for(self.tracking_uri)
        return self._client

    def run_id(self, trial) -> str:
        """The trial's child run: found again after a resume (no duplicates), created otherwise."""
        trial_id = trial.trial_id
        if trial_id in self._run_ids:
            return self._run_ids[trial_id]
        found = self.client.search_runs([self.experiment_id], filter_string=child_runs_filter(self.parent_run_id,
                                                                                              trial_id), max_results=1)
        if found:
            run = found[0]
            run_id = run.info.run_id
            self._logged_epochs[run_id] = {m.step for m in self.client.get_metric_history(run_id, VAL_CLEAN_ACC)}
            if run.info.status == tracking.FINISHED and "epochs_run" in run.data.tags:
                self._finished_runs[run_id] = int(run.data.tags["epochs_run"])
            self.client.update_run(run_id, status=tracking.RUNNING)
        else:
            run = self.client.create_run(self.experiment_id, run_name=trial_id, tags={
                PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial_id, "tune_mtard.search": self.search_name,
                **self.extra_tags})
            run_id = run.info.run_id
            self._logged_epochs[run_id] = set()
            tracking.log_params(self.client, run_id, dict(trial.config))
        self._run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self.run_id(trial)
        epoch = int(result.get(EPOCH, result.get("training_iteration", 0)))
        nodes = self.__dict__.setdefault("_nodes", {})  # run id -> node tagged: once per trial, again if it moved
        if "node_id" in result and nodes.get(run_id) != result["node_id"]:
            tracking.set_tags(self.client, run_id, {"node_id": result["node_id"]})
            nodes[run_id] = result["node_id"]
        if epoch in self._logged_epochs[run_id]:
            return
        tracking.log_metrics(self.client, run_id, {k: v for k, v in result.items() if k in REPORTED}, step=epoch)
        self._logged_epochs[run_id].add(epoch)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial)
        epochs = int((trial.last_result or {}).get(EPOCH, 0))
        state = trial_state(epochs, self.full_epochs, failed=False)
        by_budget = self.budget is not None and self.budget.stopped(trial.trial_id)
        tracking.set_tags(self.client, run_id, {"epochs_run": epochs, "trial_state": state.value,
                                                **({STOPPED_BY: BUDGET} if by_budget else {}),
                                                **flag_tags(trial.last_result or {})})
        if self._finished_runs.get(run_id) != epochs:
            try:
                self._log_trial_files(trial, run_id)
            except Exception as exc:  # a missing checkpoint must not lose the rest of the records
                log.warning("could not log the files of trial %s: %s", trial.trial_id, exc)
        self.client.set_terminated(run_id, tracking.KILLED if by_budget else tracking.FINISHED)
        self._finished_runs[run_id] = epochs

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        """A failed trial: FAILED, with where it diverged (and its trace up to there) or the error."""
        run_id = self.run_id(trial)
        diverged = read_divergence(trial.path)
        tags: dict[str, Any] = {"trial_state": TrialState.FAIL.value}
        tags[FAILURE_KIND] = FAILURE_KINDS[trial.trial_id] = failure_kind(_error_line(trial), diverged)
        if diverged is not None:
            tags.update(diverged, failure="diverged")
            trace = Path(trial.path) / files.TRACE_CSV
            if trace.is_file():
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        png = Path(tmp) / files.TRACE_PNG
                        plot_trace(trace, png, title=f"trial {trial.trial_id}: diverged at step "
                                                      f"{diverged['diverged_step']}")
                        tracking.log_artifacts(self.client, run_id, [trace, png])
                except Exception as exc:  # the tags matter more than the plot
                    log.warning("could not log the trace of diverged trial %s: %s", trial.trial_id, exc)
        else:
            tags["failure"] = _error_line(trial)
        if trial.error_file and Path(trial.error_file).is_file():  # the traceback the terminal does not show
            tracking.log_artifacts(self.client, run_id, [Path(trial.error_file)])
        tracking.set_tags(self.client, run_id, tags)
        self.client.set_terminated(run_id, tracking.FAILED)

    def _log_trial_files(self, trial, run_id: str) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
            state = read_checkpoint_state(folder)
            trace_csv, trace_png = Path(tmp) / files.TRACE_CSV, Path(tmp) / files.TRACE_PNG
            write_trace(state["trace"], trace_csv)
            plot_trace(trace_csv, trace_png, title=f"trial {trial.trial_id}: balance trace")
            tracking.log_artifacts(self.client, run_id, [trace_csv, trace_png])
            tracking.log_artifacts(self.client, run_id, [Path(folder) / files.STUDENT], "model")


def _error_line(trial) -> str:
    """The last line of the trial's error file (Ray writes each failure's traceback there)."""
    try:
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "error"
    return (lines[-1] if lines else "error")[:500]


def _child_runs(client, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=child_runs_filter(parent_run_id), max_results=10_000)


def kill_running_child_runs(client, parent_run_id: str) -> int:
    """After an interrupt: the child runs of trials that were still running end KILLED (a resume reopens them)."""
    running = [r for r in _child_runs(client, parent_run_id) if r.info.status == tracking.RUNNING]
    for run in running:
        client.set_terminated(run.info.run_id, tracking.KILLED)
    return len(running)


def delete_orphaned_child_runs(client, parent_run_id: str, trial_ids: set[str]) -> int:
    """Child runs of trials that a killed driver started but its last snapshot never recorded.

    Ray does not know these trials after a resume (it samples new ones in their place), so their runs
    would be duplicates with no trial behind them.
    """
    orphans = [r for r in _child_runs(client, parent_run_id)
               if r.data.tags.get(TRIAL_ID_TAG) not in trial_ids and r.data.tags.get("confirm") != "true"]
    for run in orphans:
        client.delete_run(run.info.run_id)
    return len(orphans)


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
    on_front = {t.trial_id for t in front}
    for run in _child_runs(parent.client, parent.run_id):
        if run.data.tags.get(TRIAL_ID_TAG) in on_front:
            tracking.set_tags(parent.client, run.info.run_id, {"pareto": "true"})
    parent.log_metrics({"pareto_front_size": len(front)}, step=0)
    return front
