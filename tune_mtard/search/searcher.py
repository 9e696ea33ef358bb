"""The Optuna side of a search: the space as Optuna distributions, the paper-defaults first point, the
persistent study, and the searcher that tells the study how each trial ended (docs/search.md).

Trials that ASHA stops early are told to Optuna as PRUNED with their intermediate values, not COMPLETE,
so TPE does not learn from partial-budget scores as if they were final; failed trials are FAIL.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.search.optuna import OptunaSearch

from tune_mtard.config import Config, Distribution
from tune_mtard.files import OPTUNA_DB
from tune_mtard.metrics import EPOCH
from tune_mtard.search import compat
from tune_mtard.search.trials import BUDGET, STOPPED_BY, TrialState, trial_state

log = logging.getLogger(__name__)

RAY_TRIAL_ATTR = "ray_trial_id"  # user attribute of each Optuna trial: the Ray Tune trial it was asked for
_OPTUNA_STATES = {TrialState.COMPLETE: optuna.trial.TrialState.COMPLETE,
                  TrialState.PRUNED: optuna.trial.TrialState.PRUNED,
                  TrialState.FAIL: optuna.trial.TrialState.FAIL}


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


def default_point(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """The first trial: the base config's values of the searched keys (the paper's defaults).

    A value outside its key's range is clipped into it (and onto the ``step`` grid); a categorical value
    that is not one of the choices is replaced by the first choice. Returns the point and one note per
    key so changed (docs/search.md, "What a search does").
    """
    point: dict[str, Any] = {}
    notes = []
    for key, d in (cfg.space or {}).items():
        value = cfg.get(key)
        if d.type == "categorical":
            chosen = value if value in (d.choices or []) else d.choices[0]
        else:
            chosen = min(max(value, d.low), d.high)
            if d.step is not None:
                chosen = d.low + round((chosen - d.low) / d.step) * d.step
                chosen = min(chosen, d.high)
            chosen = int(round(chosen)) if d.type == "int" else float(chosen)
        if chosen != value:
            notes.append(f"the first trial uses {key} = {chosen!r}: the base config's {value!r} is outside the "
                         "searched range")
        point[key] = chosen
    return point, notes


def optuna_storage_url(experiment_dir: Path) -> str:
    return f"sqlite:///{experiment_dir / OPTUNA_DB}"


class PrunedAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports per epoch and tells each trial's end as :func:`trial_state` names it.

    With a list of metrics (a multi-objective search) the study has one direction per metric, receives no
    intermediate values (Optuna has none for several objectives) and is told a trial's values at its last
    report; a trial stopped early is still PRUNED, a failed one FAIL.

    A trial's end is told to the study when Tune next snapshots the experiment (``save``), not at once:
    a trial the study holds as finished is then always one that a resumed search knows as finished too,
    never one that a killed driver ran after its last snapshot (which the resumed search replaces).
    After a resume, the pickled state can still be older than the study; trials the study holds as
    finished are then neither reported to nor told again.
    """

    def __init__(self, *args: Any, full_epochs: int, budget=None, **kwargs: Any):
        self.full_epochs = full_epochs
        self.budget = budget  # a BudgetMeter: which trials the budget stopped (docs/search.md, "Budget")
        self._reported_epochs: dict[str, set[int]] = {}
        self._pending_tells: dict[str, tuple[TrialState, float | list[float] | None]] = {}
        super().__init__(*args, **kwargs)

    def save(self, checkpoint_path: str) -> None:
        self.tell_pending()
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        storage = compat.study_storage(compat.optuna_study(self))
        for trial_id, ot_trial in compat.optuna_trials(self).items():
            if storage.get_trial(compat.storage_trial_id(ot_trial)).state.is_finished():
                compat.completed_trials(self).add(trial_id)

    def suggest(self, trial_id: str) -> dict | None:
        if self.budget is not None and self.budget.spent_on_file():
            return None  # no new trial once the budget is spent; a --resume with a larger one asks again
        params = super().suggest(trial_id)
        ot_trial = compat.optuna_trials(self).get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return params

    def _open(self, trial_id: str) -> bool:
        return trial_id not in compat.completed_trials(self) and trial_id in compat.optuna_trials(self)

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    def _value(self, result: dict | None) -> float | list[float] | None:
        """The trial's value(s) in ``result``, None when any is missing or not a number."""
        names = self.metric if self.multi_objective else [self.metric]
        values = [None if not result else result.get(name) for name in names]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            return None
        return [float(v) for v in values] if self.multi_objective else float(values[0])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._open(trial_id) or self.multi_objective:
            return
        epoch = int(result.get(EPOCH, 0))
        if self.metric in result and epoch and epoch not in self._reported_epochs.get(trial_id, set()):
            compat.optuna_trials(self)[trial_id].report(float(result[self.metric]), epoch)
            self._reported_epochs.setdefault(trial_id, set()).add(epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not self._open(trial_id):
            return
        value = self._value(result)
        epochs = int(result.get(EPOCH, 0)) if result else 0
        if value is not None and epochs:
            # The result that ends a trial (ASHA's stop, or the last epoch) reaches us only here.
            self.on_trial_result(trial_id, result)
        state = trial_state(epochs, self.full_epochs, failed=error or value is None)
        self._pending_tells[trial_id] = (state, value if state is TrialState.COMPLETE else None)
        compat.completed_trials(self).add(trial_id)

    def tell_pending(self) -> None:
        study = compat.optuna_study(self)
        for trial_id, (state, value) in list(self._pending_tells.items()):
            try:
                if self.budget is not None and self.budget.stopped(trial_id):
                    compat.optuna_trials(self)[trial_id].set_user_attr(STOPPED_BY, BUDGET)
                study.tell(compat.optuna_trials(self)[trial_id], value, state=_OPTUNA_STATES[state])
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
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(RAY_TRIAL_ATTR) not in known_trial_ids:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            closed += 1
    return closed


def close_budget_stopped_trials(experiment_dir: Path, study_name: str, trial_ids: set[str]) -> None:
    """Optuna trials of Ray trials the budget kept from starting: PRUNED, with ``stopped_by: budget``."""
    study = optuna.load_study(study_name=study_name, storage=optuna_storage_url(experiment_dir))
    storage = compat.study_storage(study)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(RAY_TRIAL_ATTR) in trial_ids:
            storage.set_trial_user_attr(compat.storage_trial_id(t), STOPPED_BY, BUDGET)
            study.tell(t.number, state=optuna.trial.TrialState.PRUNED)


def finished_optuna_trials(experiment_dir: Path, study_name: str) -> set[str]:
    """Ray trial ids whose Optuna trial is told (COMPLETE, PRUNED or FAIL): a resumed search must not rerun them."""
    if not (experiment_dir / OPTUNA_DB).is_file():
        return set()
    study = optuna.load_study(study_name=study_name, storage=optuna_storage_url(experiment_dir))
    return {t.user_attrs[RAY_TRIAL_ATTR] for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and RAY_TRIAL_ATTR in t.user_attrs}
