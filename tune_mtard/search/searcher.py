"""The Optuna side of a search: the space as Optuna distributions, the paper-defaults first point, the
persistent study, and the searcher that tells the study how each trial ended (docs/search.md).

Trials that ASHA stops early are told to Optuna as PRUNED with their intermediate values, not COMPLETE,
so TPE does not learn from partial-budget scores as if they were final; failed trials are FAIL.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.search.optuna import OptunaSearch

from tune_mtard import atomic
from tune_mtard.config import Config, Distribution
from tune_mtard.config.search import SamplerConfig
from tune_mtard.metrics import EPOCH
from tune_mtard.search import compat
from tune_mtard.search.samplers import build_sampler
from tune_mtard.search.study_storage import study_exists
from tune_mtard.search.trials import BUDGET, FAILURE_KIND, FAILURE_KINDS, STOPPED_BY, TrialState, trial_state

log = logging.getLogger(__name__)
TELL_ATTEMPTS = 3  # per snapshot; a trial still untold stays pending for the next one
TELL_BACKOFF_S = 0.5

RAY_TRIAL_ATTR = "ray_trial_id"  # user attribute of each Optuna trial: the Ray Tune trial it was asked for
# User attribute of the Optuna trial of a retried infra failure (--resume --retry-errored): the number of the FAIL
# trial it retries, which Optuna cannot reopen (docs/search.md, "Retrying infra failures").
RETRY_OF_ATTR = "retry_of"
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

    The sampler is built from ``sampler_config`` (the ``search.sampler`` section) and never pickled: Ray Tune
    pickles the searcher into the tuner state and every snapshot, and Optuna's samplers need not pickle
    (see :func:`state_without_sampler`).
    """

    def __init__(self, *args: Any, sampler_config: SamplerConfig, full_epochs: int, budget=None, **kwargs: Any):
        self.sampler_config = sampler_config
        self.full_epochs = full_epochs
        self.budget = budget  # a BudgetMeter: which trials the budget stopped (docs/search.md, "Budget")
        self._reported_epochs: dict[str, set[int]] = {}
        self._pending_tells: dict[str, tuple[TrialState, float | list[float] | None]] = {}
        super().__init__(*args, sampler=build_sampler(sampler_config), **kwargs)
        # optuna-dashboard and trials_dataframe show the objectives by these names, not "Objective 0".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            compat.optuna_study(self).set_metric_names(self.metric if self.multi_objective else [self.metric])

    def __reduce__(self):
        return _restored_searcher, (type(self), state_without_sampler(self))

    def save(self, checkpoint_path: str) -> None:
        self.tell_pending()
        atomic.write_bytes(checkpoint_path, state_without_sampler(self))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(state_with_sampler(Path(checkpoint_path).read_bytes()))
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

    def reopen_trial(self, trial_id: str) -> None:
        """The infra-failed Ray trial ``trial_id`` runs again (``--resume --retry-errored``): its Optuna trial is
        FAIL and cannot be told again, so it gets the trial :func:`retry_trial` names, which is told when the
        retry ends. A trial whose FAIL was never told (its tell still pending) is told by the retry instead."""
        self.tell_pending()
        study = compat.optuna_study(self)
        failed = compat.study_storage(study).get_trial(compat.storage_trial_id(compat.optuna_trials(self)[trial_id]))
        if failed.state.is_finished():
            retry = retry_trial(study, failed)
            compat.optuna_trials(self)[trial_id] = optuna.Trial(study, compat.storage_trial_id(retry))
            self._reported_epochs[trial_id] = set(retry.intermediate_values)
        self._pending_tells.pop(trial_id, None)
        compat.completed_trials(self).discard(trial_id)

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
        """Tell the study every trial that ended since the last snapshot. A tell that fails (the database
        locked, the disk full) is retried a few times, then kept pending: told at the next snapshot, the last
        one at the end of the search, or on ``--resume`` (the pending tells are part of the saved state)."""
        for trial_id, (state, value) in list(self._pending_tells.items()):
            if self._tell(trial_id, state, value):
                del self._pending_tells[trial_id]

    def _tell(self, trial_id: str, state: TrialState, value: float | list[float] | None) -> bool:
        """Whether the trial is told (or was already, by a driver a resumed search replaces)."""
        ot_trial = compat.optuna_trials(self)[trial_id]
        for attempt in range(1, TELL_ATTEMPTS + 1):
            try:
                if trial_id in FAILURE_KINDS:  # noted by the recorder when the trial failed
                    ot_trial.set_user_attr(FAILURE_KIND, FAILURE_KINDS[trial_id])
                if self.budget is not None and self.budget.stopped(trial_id):
                    ot_trial.set_user_attr(STOPPED_BY, BUDGET)
                compat.optuna_study(self).tell(ot_trial, value, state=_OPTUNA_STATES[state])
                return True
            except Exception as exc:
                if self._told_already(ot_trial):
                    return True
                if attempt == TELL_ATTEMPTS:
                    log.warning("optuna: trial %s stays pending (%s); it is told at the next snapshot, at the "
                                "end of the search or on --resume", trial_id, str(exc).splitlines()[0][:200])
                    return False
                time.sleep(TELL_BACKOFF_S * attempt)
        return False

    def _told_already(self, ot_trial) -> bool:
        try:
            storage = compat.study_storage(compat.optuna_study(self))
            return storage.get_trial(compat.storage_trial_id(ot_trial)).state.is_finished()
        except Exception:  # the storage is still unreachable: not known to be told
            return False


_SAMPLER_ID = "tune_mtard.search.sampler"


class _SamplerLeftOut(pickle.Pickler):
    """Pickles everything but one object, the sampler, which it writes as a reference to be rebuilt."""

    def __init__(self, file: io.BytesIO, sampler: Any):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.sampler = sampler

    def persistent_id(self, obj: Any) -> str | None:
        return _SAMPLER_ID if obj is self.sampler else None


class _SamplerPutBack(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, sampler: Any):
        super().__init__(file)
        self.sampler = sampler

    def persistent_load(self, pid: Any) -> Any:
        if pid != _SAMPLER_ID:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self.sampler


def resumed_seed(seed: int, asked: int) -> int:
    """The seed of a sampler rebuilt after ``asked`` trials: ``seed`` itself for a new search, else one drawn
    from (seed, asked), so a resumed search neither repeats the draws it already made nor depends on the day."""
    if asked == 0:
        return seed
    return int(np.random.SeedSequence([seed, asked]).generate_state(1)[0])


def state_without_sampler(searcher: PrunedAwareOptunaSearch) -> bytes:
    """The searcher's state with its sampler left out, wherever it is referenced (the study, each trial's
    study): the ``search.sampler`` section and the number of trials asked, to build it again from."""
    body = io.BytesIO()
    _SamplerLeftOut(body, compat.optuna_study(searcher).sampler).dump(searcher.__dict__)
    return pickle.dumps((searcher.sampler_config, len(compat.optuna_trials(searcher)), body.getvalue()))


def state_with_sampler(data: bytes) -> dict[str, Any]:
    """:func:`state_without_sampler`'s state with a sampler built again from its ``search.sampler`` section."""
    sampler_config, asked, body = pickle.loads(data)
    sampler = build_sampler(sampler_config, resumed_seed(sampler_config.seed, asked))
    return _SamplerPutBack(io.BytesIO(body), sampler).load()


def _restored_searcher(cls: type, data: bytes) -> PrunedAwareOptunaSearch:
    searcher = cls.__new__(cls)
    searcher.__dict__.update(state_with_sampler(data))
    return searcher


def close_orphaned_optuna_trials(storage_url: str, study_name: str, known_trial_ids: set[str]) -> int:
    """Optuna trials left RUNNING by a killed driver whose Ray trial no longer exists are marked FAIL.

    A driver killed between asking Optuna for a trial and its next snapshot of the Tune experiment leaves
    such a trial: the resumed search never hears of it and asks Optuna for a new one in its place.
    """
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    closed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(RAY_TRIAL_ATTR) not in known_trial_ids:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            closed += 1
    return closed


def close_budget_stopped_trials(storage_url: str, study_name: str, trial_ids: set[str]) -> None:
    """Optuna trials of Ray trials the budget kept from starting: PRUNED, with ``stopped_by: budget``."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    storage = compat.study_storage(study)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(RAY_TRIAL_ATTR) in trial_ids:
            storage.set_trial_user_attr(compat.storage_trial_id(t), STOPPED_BY, BUDGET)
            study.tell(t.number, state=optuna.trial.TrialState.PRUNED)


def retry_trial(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The RUNNING Optuna trial that retries the FAIL trial ``failed``: its params, distributions, intermediate
    values and Ray trial id, with ``retry_of`` = its number. Added through the study's public ``add_trial`` (the
    sampler draws nothing); one already there (a retry a killed driver began) is taken again."""
    def open_retry() -> optuna.trial.FrozenTrial | None:
        return next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                     if t.user_attrs.get(RETRY_OF_ATTR) == failed.number), None)

    if open_retry() is None:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING, params=failed.params, distributions=failed.distributions,
            intermediate_values=failed.intermediate_values,
            user_attrs={RAY_TRIAL_ATTR: failed.user_attrs.get(RAY_TRIAL_ATTR), RETRY_OF_ATTR: failed.number}))
    return open_retry()


def finished_optuna_trials(storage_url: str, study_name: str) -> set[str]:
    """Ray trial ids whose latest Optuna trial is told (COMPLETE, PRUNED or FAIL): a resumed search must not rerun
    them. The latest: a retried infra failure has a FAIL trial and, after it, the trial of its retry."""
    if not study_exists(storage_url, study_name):
        return set()
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    latest = {t.user_attrs[RAY_TRIAL_ATTR]: t for t in study.get_trials(deepcopy=False)
              if RAY_TRIAL_ATTR in t.user_attrs}  # in the order they were asked
    return {ray_id for ray_id, t in latest.items() if t.state.is_finished()}
