"""The search's plumbing between Ray Tune, Optuna and MLflow.

* :class:`PrunedAwareOptunaSearch`: Ray's ``OptunaSearch`` with a persistent study, intermediate values
  reported per epoch, and trials that ASHA stops early told to Optuna as PRUNED (not COMPLETE, or TPE
  would learn from partial-budget scores as if they were final).
* :class:`MlflowTrialRecorder`: the single MLflow writer of a search. It runs in the driver, so many
  concurrent trials never lock a sqlite store: one child run per trial, named and tagged by its Ray
  Tune trial id, params = the sampled dotted keys, metrics per epoch, and at the end the trial's balance
  trace, its plot and the student weights.
* :func:`best_trial` and friends read trials back from an experiment folder, for ``export`` and the end
  of a search.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from tune_mtard import tracking
from tune_mtard.config import Config, Distribution
from tune_mtard.engine import write_trace

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
PARENT_RUN_FILE = "mlflow_parent_run_id"
SPACE_FILE = "search_space.yaml"
BEST_CONFIG = "best_config.yaml"
STATE_FILE = "state.pt"
STUDENT_FILE = "student.pt"
RAY_TRIAL_ATTR = "ray_trial_id"
EXPERIMENT_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"


@contextlib.contextmanager
def quiet_experiment_analysis():
    """Ray warns about every trial of an interrupted search that has no results yet, e.g. one that was
    pending when the driver died: expected when reading such a search back, so not shown."""
    logger = logging.getLogger(EXPERIMENT_ANALYSIS_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def optuna_distributions(space: dict[str, Distribution]) -> dict[str, optuna.distributions.BaseDistribution]:
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, d in space.items():
        if d.type == "float":
            out[key] = FloatDistribution(float(d.low), float(d.high), log=d.log,
                                         step=None if d.step is None else float(d.step))
        elif d.type == "int":
            out[key] = IntDistribution(int(d.low), int(d.high), log=d.log, step=1 if d.step is None else int(d.step))
        else:
            out[key] = CategoricalDistribution(list(d.choices or []))
    return out


def default_point(cfg: Config) -> dict[str, Any]:
    """The base config's values of the searched keys (the paper's defaults) that lie inside their ranges."""
    point = {}
    for key, d in (cfg.space or {}).items():
        value = cfg.get(key)
        if d.type == "categorical":
            if value in (d.choices or []):
                point[key] = value
        elif d.low <= value <= d.high:
            point[key] = int(value) if d.type == "int" else float(value)
    return point


def optuna_storage_url(experiment_dir: Path) -> str:
    return f"sqlite:///{experiment_dir / OPTUNA_DB}"


class PrunedAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports per epoch and records early-stopped trials as PRUNED.

    A trial's end is told to the study when Tune next snapshots the experiment (``save``), not at once:
    a trial the study holds as finished is then always one that a resumed search knows as finished too,
    never one that a killed driver ran after its last snapshot (which the resumed search replaces).
    After a resume, the pickled state can still be older than the study; trials the study holds as
    finished are then neither reported to nor told again.
    """

    def __init__(self, *args: Any, full_epochs: int, **kwargs: Any):
        self.full_epochs = full_epochs
        self._reported_epochs: dict[str, set[int]] = {}
        self._pending_tells: dict[str, tuple[TrialState, float | None]] = {}
        super().__init__(*args, **kwargs)

    def save(self, checkpoint_path: str) -> None:
        self.tell_pending()
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        storage = self._ot_study._storage
        for trial_id, ot_trial in self._ot_trials.items():
            if storage.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        epoch = int(result.get("epoch", 0))
        if self.metric in result and epoch and epoch not in self._reported_epochs.get(trial_id, set()):
            self._ot_trials[trial_id].report(float(result[self.metric]), epoch)
            self._reported_epochs.setdefault(trial_id, set()).add(epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = None if not result else result.get(self.metric)
        epochs = int(result.get("epoch", 0)) if result else 0
        if value is not None and epochs:
            # The result that ends a trial (ASHA's stop, or the last epoch) reaches us only here.
            self.on_trial_result(trial_id, result)
        if error or value is None or (isinstance(value, float) and math.isnan(value)):
            state, value = TrialState.FAIL, None
        elif epochs < self.full_epochs:
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self._pending_tells[trial_id] = (state, value)
        self._completed_trials.add(trial_id)

    def tell_pending(self) -> None:
        for trial_id, (state, value) in list(self._pending_tells.items()):
            try:
                self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
            except Exception as exc:  # e.g. told already by the driver a resumed search replaces
                log.warning("optuna tell for %s failed: %s", trial_id, exc)
            del self._pending_tells[trial_id]


def close_orphaned_optuna_trials(experiment_dir: Path, study_name: str, known_trial_ids: set[str]) -> int:
    """Optuna trials left RUNNING by a killed driver whose Ray trial no longer exists are marked FAIL.

    A driver killed between asking Optuna for a trial and its next snapshot of the Tune experiment leaves
    such a trial: the resumed search never hears of it and asks Optuna for a new one in its place.
    """
    study = optuna.load_study(study_name=study_name, storage=optuna_storage_url(experiment_dir))
    closed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(RAY_TRIAL_ATTR) not in known_trial_ids:
            study.tell(t.number, state=TrialState.FAIL)
            closed += 1
    return closed


def finished_optuna_trials(experiment_dir: Path, study_name: str) -> set[str]:
    """Ray trial ids whose Optuna trial is told (COMPLETE, PRUNED or FAIL): a resumed search must not rerun them."""
    storage = optuna_storage_url(experiment_dir)
    if not (experiment_dir / OPTUNA_DB).is_file():
        return set()
    study = optuna.load_study(study_name=study_name, storage=storage)
    return {t.user_attrs[RAY_TRIAL_ATTR] for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and RAY_TRIAL_ATTR in t.user_attrs}


def tolerate_deleted_checkpoints() -> None:
    """Let Ray's checkpoint manager skip an old checkpoint that is already gone instead of failing the trial.

    With ``CheckpointConfig(num_to_keep=K)`` the experiment snapshot a resumed search starts from can list
    checkpoints that the killed driver deleted after taking it; Ray 2.x then raises ``FileNotFoundError``
    when it deletes them again and errors the trial. The snapshot's latest checkpoint always still exists.
    """
    from ray.train._internal import checkpoint_manager

    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "tolerates_missing", False):
        return

    def delete_if_present(fs, fs_path: str) -> None:
        try:
            delete(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            log.debug("checkpoint %s was already deleted", fs_path)

    delete_if_present.tolerates_missing = True
    checkpoint_manager._delete_fs_path = delete_if_present


@dataclass
class TrialSummary:
    trial_id: str
    sampled: dict[str, Any]
    status: str
    epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None

    def metric(self, name: str) -> float:
        value = self.metrics.get(name)
        return float("nan") if value is None else float(value)


def best_trial(trials: list[TrialSummary], metric: str, mode: str, full_epochs: int) -> TrialSummary | None:
    """SPEC section 5: the best last report among trials that ran the full epochs; if none did, among all."""
    scored = [t for t in trials if not math.isnan(t.metric(metric))]
    full = [t for t in scored if t.epochs >= full_epochs]
    pool = full or scored
    if not pool:
        return None
    sign = 1 if mode == "max" else -1
    return max(pool, key=lambda t: sign * t.metric(metric))


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)


class MlflowTrialRecorder(Callback):
    """The one MLflow writer of a search (runs in the driver). Picklable: Ray stores it with the tuner.

    A resumed search finds each trial's child run again by its ``trial_id`` tag, logs only the epochs the
    run does not hold yet (a trial continued from a checkpoint older than its last report repeats an
    epoch), and does not log the files of a run that is already finished again.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, full_epochs: int,
                 search_name: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.full_epochs = full_epochs
        self.search_name = search_name
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
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.trial_id = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:
            run = found[0]
            run_id = run.info.run_id
            self._logged_epochs[run_id] = {m.step for m in self.client.get_metric_history(run_id, "val_clean_acc")}
            if run.info.status == "FINISHED" and "epochs_run" in run.data.tags:
                self._finished_runs[run_id] = int(run.data.tags["epochs_run"])
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=trial_id,
                tags={"mlflow.parentRunId": self.parent_run_id, "trial_id": trial_id,
                      "tune_mtard.search": self.search_name},
            )
            run_id = run.info.run_id
            self._logged_epochs[run_id] = set()
            tracking.log_params(self.client, run_id, dict(trial.config))
        self._run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self.run_id(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if "node_id" in result:
            tracking.set_tags(self.client, run_id, {"node_id": result["node_id"]})
        if epoch in self._logged_epochs[run_id]:
            return
        metrics = {k: v for k, v in result.items() if k in METRIC_KEYS}
        tracking.log_metrics(self.client, run_id, metrics, step=epoch)
        self._logged_epochs[run_id].add(epoch)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial)
        epochs = int((trial.last_result or {}).get("epoch", 0))
        stopped_early = epochs < self.full_epochs
        tracking.set_tags(self.client, run_id, {"epochs_run": epochs,
                                                "trial_state": "PRUNED" if stopped_early else "COMPLETE"})
        if self._finished_runs.get(run_id) != epochs:
            try:
                self._log_trial_files(trial, run_id)
            except Exception as exc:  # a missing checkpoint must not lose the rest of the records
                log.warning("could not log the files of trial %s: %s", trial.trial_id, exc)
        self.client.set_terminated(run_id, "FINISHED")
        self._finished_runs[run_id] = epochs

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial)
        tracking.set_tags(self.client, run_id, {"trial_state": "FAIL"})
        self.client.set_terminated(run_id, "FAILED")

    def _log_trial_files(self, trial, run_id: str) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
            state = read_checkpoint_state(folder)
            trace_csv = Path(tmp) / "balance_trace.csv"
            write_trace(state["trace"], trace_csv)
            tracking.plot_trace(trace_csv, Path(tmp) / "balance_trace.png")
            tracking.log_artifacts(self.client, run_id, [trace_csv, Path(tmp) / "balance_trace.png"])
            tracking.log_artifacts(self.client, run_id, [Path(folder) / STUDENT_FILE], "model")


def delete_orphaned_child_runs(client, experiment_id: str, parent_run_id: str, trial_ids: set[str]) -> int:
    """Child runs of trials that a killed driver started but its last snapshot never recorded.

    Ray does not know these trials after a resume (it samples new ones in their place), so their runs
    would be duplicates with no trial behind them.
    """
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=10_000)
    orphans = [r for r in runs if r.data.tags.get("trial_id") not in trial_ids]
    for run in orphans:
        client.delete_run(run.info.run_id)
    return len(orphans)


METRIC_KEYS = (
    "val_clean_acc", "val_robust_acc", "val_w_robust_acc", "loss_adv", "loss_nat", "entropy_adv",
    "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "epoch_time_s", "lr",
)


def load_experiment_trials(folder: str | Path) -> list[TrialSummary]:
    """Every trial of a finished or interrupted search folder, with its last reported metrics.

    The last report is read from the trial's own results, which hold every report: the experiment
    snapshot an interrupted search left can be older.
    """
    from ray.tune import ExperimentAnalysis

    with quiet_experiment_analysis():
        analysis = ExperimentAnalysis(str(folder))
        frames = analysis.trial_dataframes
        trials = []
        for trial in analysis.trials:
            last = dict(trial.last_result or {})
            frame = frames.get(trial.path)
            if frame is not None and len(frame) and "epoch" in frame and frame["epoch"].iloc[-1] > last.get("epoch", 0):
                last = frame.iloc[-1].to_dict()
            checkpoint = analysis.get_last_checkpoint(trial)
            trials.append(TrialSummary(
                trial_id=trial.trial_id,
                sampled=dict(trial.config or {}),
                status=str(trial.status),
                epochs=int(last.get("epoch", 0) or 0),
                metrics=last,
                checkpoint_dir=checkpoint.path if checkpoint is not None else None,
            ))
    return trials
