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
    """``OptunaSearch`` that reports per epoch and records early-stopped trials as PRUNED."""

    def __init__(self, *args: Any, full_epochs: int, **kwargs: Any):
        self.full_epochs = full_epochs
        self._reported_epochs: dict[str, set[int]] = {}
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self.metric in result and "epoch" in result:
            self._ot_trials[trial_id].report(float(result[self.metric]), int(result["epoch"]))
            self._reported_epochs.setdefault(trial_id, set()).add(int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = None if not result else result.get(self.metric)
        epochs = int(result.get("epoch", 0)) if result else 0
        if value is not None and epochs and epochs not in self._reported_epochs.get(trial_id, set()):
            # The result that ends a trial (ASHA's stop, or the last epoch) reaches us only here.
            ot_trial.report(float(value), epochs)
        if error or value is None or (isinstance(value, float) and math.isnan(value)):
            state, value = TrialState.FAIL, None
        elif epochs < self.full_epochs:
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as exc:  # e.g. already told by an earlier driver
            log.warning("optuna tell for %s failed: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def close_orphaned_optuna_trials(experiment_dir: Path, study_name: str, known_trial_ids: set[str]) -> int:
    """Optuna trials left RUNNING by a killed driver whose Ray trial no longer exists are marked FAIL."""
    study = optuna.load_study(study_name=study_name, storage=optuna_storage_url(experiment_dir))
    closed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.WAITING:
            continue
        if t.user_attrs.get(RAY_TRIAL_ATTR) not in known_trial_ids:
            study.tell(t.number, state=TrialState.FAIL)
            closed += 1
    return closed


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
    """The one MLflow writer of a search (runs in the driver). Picklable: Ray stores it with the tuner."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, full_epochs: int,
                 search_name: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.full_epochs = full_epochs
        self.search_name = search_name
        self._client = None
        self._run_ids: dict[str, str] = {}

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
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=trial_id,
                tags={"mlflow.parentRunId": self.parent_run_id, "trial_id": trial_id,
                      "tune_mtard.search": self.search_name},
            )
            run_id = run.info.run_id
            tracking.log_params(self.client, run_id, dict(trial.config))
        self._run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self.run_id(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = {k: v for k, v in result.items() if k in METRIC_KEYS}
        tracking.log_metrics(self.client, run_id, metrics, step=epoch)
        if "node_id" in result:
            tracking.set_tags(self.client, run_id, {"node_id": result["node_id"]})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial)
        epochs = int((trial.last_result or {}).get("epoch", 0))
        stopped_early = epochs < self.full_epochs
        tracking.set_tags(self.client, run_id, {"epochs_run": epochs,
                                                "trial_state": "PRUNED" if stopped_early else "COMPLETE"})
        try:
            self._log_trial_files(trial, run_id)
        except Exception as exc:  # a missing checkpoint must not lose the rest of the records
            log.warning("could not log the files of trial %s: %s", trial.trial_id, exc)
        self.client.set_terminated(run_id, "FINISHED")

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


METRIC_KEYS = (
    "val_clean_acc", "val_robust_acc", "val_w_robust_acc", "loss_adv", "loss_nat", "entropy_adv",
    "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "epoch_time_s", "lr",
)


def load_experiment_trials(folder: str | Path) -> list[TrialSummary]:
    """Every trial of a finished or interrupted search folder, with its last reported metrics."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(folder))
    trials = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
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
