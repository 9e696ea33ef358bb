"""A search's budget: ``search.budget: {device_hours, wall_hours}`` (docs/search.md, "Budget").

Device-hours are counted as a plan counts them (``Resources.device_share``): each report's ``time_this_iter_s``
times what a trial holds (GPUs, else CPU cores); wall hours from each session's start. Both add up over the
sessions of a resumed search. Once either is reached, no new trial starts, each running trial is stopped at
its next report (the scheduler's STOP, so it keeps its last checkpoint and metrics), and the experiment ends
when none is left running. Trials stopped so are recorded as stopped by the budget (``stopped_by: budget``):
a tag and KILLED in MLflow, an Optuna user attribute on a PRUNED trial, a column of ``trials.csv``.

Ray Tune pickles the scheduler, the stopper, the searcher and the recorder with the tuner and restores them
on ``--resume``; they share one :class:`BudgetMeter`, which reads the limits (and what earlier sessions spent)
from ``budget.json`` that the driver writes before every session, so ``--resume`` with a larger budget
continues, and records what it stopped there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune import Stopper
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from tune_mtard import files
from tune_mtard.config import Config
from tune_mtard.errors import ConfigError


class BudgetMeter:
    """Spending against the limits of ``<folder>/budget.json``; shared by the scheduler, stopper, searcher and
    recorder of one search."""

    def __init__(self, folder: str | Path):
        self.folder = str(folder)
        self._state: dict[str, Any] | None = None
        self.running: set[str] = set()  # trials started and not ended, in this session

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_state": None, "running": set()}  # the file is read in every session

    @property
    def path(self) -> Path:
        return Path(self.folder) / files.BUDGET_JSON

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = json.loads(self.path.read_text()) if self.path.is_file() else dict(NO_BUDGET)
            self._state.update(session_device_s=0.0, session_start=self._state.get("session_start") or time.time())
        return self._state

    @property
    def limited(self) -> bool:
        return any(value is not None for value in self.state["limits"].values())

    def observe(self, result: dict[str, Any]) -> None:
        self.state["session_device_s"] += float(result.get("time_this_iter_s") or 0.0) * self.state["share"]

    def spent(self) -> dict[str, float]:
        s = self.state
        return {"device_hours": (s["device_s_before"] + s["session_device_s"]) / 3600,
                "wall_hours": (s["wall_s_before"] + time.time() - s["session_start"]) / 3600}

    def reached(self) -> str | None:
        """The first limit spent (``device_hours`` or ``wall_hours``), or None."""
        s = self.state
        if s.get("reached") or not self.limited:
            return s.get("reached")
        spent = self.spent()
        for key in ("device_hours", "wall_hours"):
            if s["limits"].get(key) is not None and spent[key] >= s["limits"][key]:
                s["reached"] = key
                self._write()
                return key
        return None

    def stop(self, trial_id: str) -> None:
        stopped = self.state.setdefault("stopped_trials", [])
        if trial_id not in stopped:
            stopped.append(trial_id)
            self._write()

    def started(self, trial_id: str) -> None:
        self.running.add(trial_id)

    def ended(self, trial_id: str) -> None:
        if trial_id in self.running:
            self.running.discard(trial_id)
            if self.state.get("reached"):
                self._write()

    def spent_on_file(self) -> bool:
        """Whether the scheduler found the budget spent, as the file says (the searcher holds its own copy)."""
        return self.path.is_file() and bool(json.loads(self.path.read_text()).get("reached"))

    def stopped(self, trial_id: str) -> bool:
        """Whether the budget stopped the trial, as the file says (the recorder and searcher may hold copies)."""
        if trial_id in self.state.get("stopped_trials", []):
            return True
        return self.path.is_file() and trial_id in json.loads(self.path.read_text()).get("stopped_trials", [])

    def _write(self) -> None:
        record = {**self.state, "spent": self.spent(), "running": sorted(self.running)}
        self.path.write_text(json.dumps(record, indent=2))


NO_BUDGET: dict[str, Any] = {"limits": {}, "share": 0.0, "device_s_before": 0.0, "wall_s_before": 0.0,
                             "stopped_trials": [], "reached": None}


def read_reached(folder: Path) -> str | None:
    """The limit that ended the search's last session, if one did."""
    path = folder / files.BUDGET_JSON
    return json.loads(path.read_text()).get("reached") if path.is_file() else None


def start_session(cfg: Config, folder: Path, trials_time_s: float, resume: bool) -> dict[str, Any] | None:
    """Write ``budget.json`` for this session: the limits, what trials ran so far (``trials_time_s``: the sum
    of their ``time_total_s``) and the wall time of earlier sessions. None when the search has no budget."""
    budget = cfg.search.budget
    path = folder / files.BUDGET_JSON
    if budget.device_hours is None and budget.wall_hours is None:
        path.unlink(missing_ok=True)
        return None
    before = json.loads(path.read_text()) if resume and path.is_file() else {}
    wall_before = before.get("spent", {}).get("wall_hours", 0.0) * 3600
    share, unit = cfg.search.resources.device_share()
    share *= cfg.train.workers  # a trial's workers each hold search.resources
    state = {"limits": {"device_hours": budget.device_hours, "wall_hours": budget.wall_hours}, "unit": unit,
             "share": share, "device_s_before": trials_time_s * share, "wall_s_before": wall_before,
             "session_start": time.time(), "stopped_trials": before.get("stopped_trials", []), "reached": None}
    path.write_text(json.dumps({**state, "spent": {"device_hours": state["device_s_before"] / 3600,
                                                   "wall_hours": wall_before / 3600}}, indent=2))
    return state


def budget_outcome(cfg: Config, folder: Path, trials: list, parent) -> dict[str, Any] | None:
    """After the Tuner: the trials the budget stopped marked so, the epoch the best is chosen at when the budget
    ended the search before any trial ran ``train.epochs``, and the parent run's tags. Returns the summary's
    ``budget`` record (None without a budget)."""
    # the search's Optuna side loads optuna: only a search that ran needs it
    from tune_mtard.search.searcher import close_budget_stopped_trials
    from tune_mtard.search.study_storage import optuna_storage_url
    from tune_mtard.search.trials import BUDGET, equal_budget_epoch

    path = folder / files.BUDGET_JSON
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    stopped = set(record.get("stopped_trials", []))
    if record.get("reached"):  # trials the searcher had proposed but that the budget kept from starting
        never_started = {t.trial_id for t in trials if not t.failed and t.epochs == 0}
        close_budget_stopped_trials(optuna_storage_url(cfg, folder), cfg.name, never_started)
        stopped |= never_started
    record["stopped_trials"] = sorted(stopped)
    for t in trials:
        if t.trial_id in stopped:
            t.stopped_by = BUDGET
    # What was spent, as the next session's start counts it: every trial's time, and each session's wall time.
    record["spent"] = {"device_hours": sum(float(t.metrics.get("time_total_s") or 0) for t in trials)
                       * record["share"] / 3600,
                       "wall_hours": (record["wall_s_before"] + time.time() - record["session_start"]) / 3600}
    path.write_text(json.dumps(record, indent=2))
    reached = record.get("reached")
    compared = equal_budget_epoch(trials, cfg.train.epochs) if reached else None
    parent.set_tags({"budget_reached": reached or "no",
                     **{f"budget.{k}": v for k, v in record["limits"].items() if v is not None}})
    return {"limits": record["limits"], "unit": record["unit"], "spent": record["spent"],
            "reached": reached, "stopped_trials": sorted(stopped), "compared_at_epoch": compared}


class _BudgetRule:
    """Mixed into a scheduler: once the budget is spent, no trial starts and every running one stops at its next
    report. It keeps which trials run (started, not ended) in the meter, for :class:`BudgetStopper`."""

    meter: BudgetMeter

    def choose_trial_to_run(self, tune_controller):
        if self.meter.reached():
            return None
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None:
            self.meter.started(trial.trial_id)
        return trial

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        self.meter.observe(result)
        if decision == TrialScheduler.CONTINUE and self.meter.reached():
            self.meter.stop(trial.trial_id)  # it ends (on_trial_complete) once Tune and the recorder have it
            decision = TrialScheduler.STOP
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self.meter.ended(trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        super().on_trial_error(tune_controller, trial)
        self.meter.ended(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self.meter.ended(trial.trial_id)


class BudgetedASHA(_BudgetRule, ASHAScheduler):
    pass


class BudgetedFIFO(_BudgetRule, FIFOScheduler):
    pass


_BUDGETED = {ASHAScheduler: BudgetedASHA, FIFOScheduler: BudgetedFIFO}


def with_budget(scheduler: TrialScheduler, meter: BudgetMeter, budget: Any) -> TrialScheduler:
    """``scheduler`` (built by the scheduler registry) as one that keeps the budget: the same object's state in
    its budgeted subclass, which only adds the rule above. A scheduler with no budgeted form is refused when a
    budget is set, and left as it is otherwise."""
    budgeted = _BUDGETED.get(type(scheduler))
    if budgeted is None:
        if budget is not None and (budget.device_hours is not None or budget.wall_hours is not None):
            raise ConfigError("search.budget", f"the {type(scheduler).__name__} scheduler cannot keep a budget "
                                               f"(budgeted: {', '.join(c.__name__ for c in _BUDGETED)})")
        return scheduler
    kept = budgeted.__new__(budgeted)
    kept.__dict__.update(scheduler.__dict__)
    kept.meter = meter
    return kept


class BudgetStopper(Stopper):
    """Ends the experiment once the budget is spent and no trial runs any more (each stopped at its report):
    the trials not started yet never start. Reads what the scheduler wrote to ``budget.json`` (Tune may hold
    its own copy of the stopper)."""

    def __init__(self, folder: str | Path):
        self.folder = str(folder)
        self._spent = False

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_spent": False}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if not self._spent:
            path = Path(self.folder) / files.BUDGET_JSON
            record = json.loads(path.read_text()) if path.is_file() else {}
            self._spent = bool(record.get("reached")) and not record.get("running")
        return self._spent
