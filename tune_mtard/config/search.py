"""The ``search`` and ``space`` sections of a search space file (docs/configuration.md, "search" and
"Search space"): how a search runs, and one distribution of the space. The rules a space must keep with
the run config (its keys, its corners) are in space.py."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tune_mtard.config.rules import check_attack_names, require
from tune_mtard.errors import ConfigError
from tune_mtard.metrics import EPOCH_METRICS
from tune_mtard.search.samplers import samplers
from tune_mtard.search.schedulers import SCHEDULERS


@dataclass
class Resources:
    cpu: float = 4
    gpu: float = 0.5  # a fraction shares one card between trials

    def device_share(self) -> tuple[float, str]:
        """What one trial holds of the devices, and the unit device-hours are counted in: GPUs when it asks for
        any (a trial with ``gpu: 0.5`` for an hour spends 0.5 GPU-hours), else CPU cores."""
        if self.gpu > 0:
            return self.gpu, "GPU-hours"
        return self.cpu, "CPU core-hours"


@dataclass
class SchedulerConfig:
    type: str = "asha"  # a name of tune_mtard.search.schedulers (asha, fifo)
    grace_period: int = 10
    reduction_factor: float = 3


@dataclass
class SamplerConfig:
    type: str = "tpe"  # a name of tune_mtard.search.samplers (tpe, random, nsga2, gp, cmaes)
    seed: int = 0
    n_startup_trials: int = 10


@dataclass
class FinalEvalConfig:
    top_k: int = 0
    attacks: list[str] = field(default_factory=lambda: ["aa"])
    n_examples: int = 1000


@dataclass
class ConfirmConfig:
    """Rerun the ``top_k`` best full-budget configurations on ``seeds`` more seeds; pick the best by mean."""

    top_k: int = 0  # 0: no confirmation
    seeds: int = 2


@dataclass
class BudgetConfig:
    """Stop the search once either is spent (docs/search.md, "Budget"); None: no limit."""

    device_hours: float | None = None  # GPU-hours (or CPU core-hours) of trials, as search --plan counts them
    wall_hours: float | None = None  # wall time of the search's sessions


@dataclass
class SearchConfig:
    """How a search runs (docs/search.md); ``space`` says what it samples."""

    num_samples: int = 64
    max_concurrent: int = 4
    metric: str = "val_w_robust_acc"  # what ASHA stops on and the best trial is chosen by
    mode: str = "max"
    objectives: list[str] = field(default_factory=list)  # two or more metrics: a multi-objective (Pareto) search
    modes: list[str] = field(default_factory=list)  # one per objective (default: max)
    resources: Resources = field(default_factory=Resources)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    storage: str = "./tune_results"  # a folder, or s3://bucket/prefix (docs/cluster.md, "Object storage")
    storage_options: dict[str, Any] = field(default_factory=dict)  # S3FileSystem's options (checked by the driver)
    optuna_storage: str = ""  # an SQLAlchemy URL of the Optuna study's database; "": optuna.db in the search folder
    max_failures: int = 5
    final_eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    register_as: str = "auto"  # the registered MLflow model of the best student; auto: the search's name; "": none
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def objective_modes(self) -> list[str]:
        """One mode per objective (``max`` where ``modes`` is not given)."""
        return list(self.modes) or ["max"] * len(self.objectives)

    def check(self) -> None:
        require(self.num_samples >= 1, "search.num_samples", "must be >= 1")
        require(self.max_concurrent >= 1, "search.max_concurrent", "must be >= 1")

        def reported(name: str, key: str) -> None:
            require(name in EPOCH_METRICS, key,
                    f"{name!r} is not a metric a trial reports (valid: {', '.join(EPOCH_METRICS)})")

        require(self.mode in ("max", "min"), "search.mode", f"must be max or min, got {self.mode!r}")
        reported(self.metric, "search.metric")
        if self.objectives:
            require(len(self.objectives) >= 2, "search.objectives", "a multi-objective search needs two or more")
            require(len(set(self.objectives)) == len(self.objectives), "search.objectives", "repeats a metric")
            for i, name in enumerate(self.objectives):
                reported(name, f"search.objectives[{i}]")
        require(not self.modes or len(self.modes) == len(self.objectives), "search.modes",
                f"needs one mode per objective ({len(self.objectives)}), got {len(self.modes)}")
        for i, mode in enumerate(self.modes):
            require(mode in ("max", "min"), f"search.modes[{i}]", f"must be max or min, got {mode!r}")
        require(self.confirm.top_k >= 0, "search.confirm.top_k", "must be >= 0 (0: no confirmation)")
        require(self.confirm.seeds >= 1, "search.confirm.seeds", "must be >= 1")
        require(self.resources.cpu > 0, "search.resources.cpu", "must be > 0")
        require(self.resources.gpu >= 0, "search.resources.gpu", "must be >= 0")
        s = self.scheduler
        require(s.type in SCHEDULERS, "search.scheduler.type",
                f"must be one of {', '.join(SCHEDULERS.names())}, got {s.type!r}")
        require(s.grace_period >= 1, "search.scheduler.grace_period", "must be >= 1")
        require(s.reduction_factor > 1, "search.scheduler.reduction_factor", "must be > 1")
        self.check_sampler()
        require(self.sampler.n_startup_trials >= 0, "search.sampler.n_startup_trials", "must be >= 0")
        require(self.max_failures >= 0, "search.max_failures", "must be >= 0")
        require(bool(self.storage), "search.storage", "must not be empty")
        url = self.optuna_storage
        require(not url or re.match(r"^[a-z][a-z0-9+_]*://", url) is not None, "search.optuna_storage",
                f"{url!r} is not an SQLAlchemy URL (dialect[+driver]://...)")
        require(re.search(r"://[^/@]*:[^/@]*@", url) is None, "search.optuna_storage",
                "holds a password, which search_space.yaml and the MLflow parent run would keep: give it in "
                "PGPASSWORD or ~/.pgpass instead")
        require(self.final_eval.top_k >= 0, "search.final_eval.top_k", "must be >= 0")
        require(self.final_eval.n_examples >= 1, "search.final_eval.n_examples", "must be >= 1")
        check_attack_names(self.final_eval.attacks, "search.final_eval.attacks")
        for key in ("device_hours", "wall_hours"):
            value = getattr(self.budget, key)
            require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                    f"search.budget.{key}", f"must be a number > 0 (or left out), got {value!r}")

    def check_sampler(self) -> None:
        """``search.sampler.type`` names a registered sampler that can handle the search's objectives."""
        registry = samplers()
        require(self.sampler.type in registry, "search.sampler.type",
                f"must be one of {', '.join(registry.names())}, got {self.sampler.type!r}")
        spec = registry.get(self.sampler.type)
        require(spec.multi_objective or not self.objectives, "search.sampler.type",
                f"{spec.name} handles one objective only; search.objectives names {len(self.objectives)} "
                f"(multi-objective samplers: {', '.join(n for n, s in registry.items() if s.multi_objective)})")


@dataclass
class Distribution:
    """One searched key of ``space`` (docs/configuration.md, "Search space"): ``float``/``int`` with ``low``,
    ``high``, optional ``log``/``step``; or ``categorical`` with ``choices``. Parsed and checked in space.py."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def extremes(self) -> list[Any]:
        """The values that bound what this distribution can sample (to check the config's rules)."""
        if self.type == "categorical":
            return list(self.choices or [])
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in (self.choices or [])
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def check(self, where: str) -> None:
        if self.type in ("float", "int"):
            for bound in ("low", "high"):
                require(getattr(self, bound) is not None, f"{where}.{bound}", f"required for type {self.type}")
            require(self.choices is None, f"{where}.choices", f"not allowed for type {self.type}")
            require(self.low < self.high, where, f"low ({self.low:g}) must be < high ({self.high:g})")
            require(not self.log or self.low > 0, f"{where}.low", "must be > 0 with log: true")
            require(self.step is None or self.step > 0, f"{where}.step", "must be > 0")
            require(not (self.log and self.step is not None), where, "log and step cannot be combined")
            if self.type == "int":
                for bound in ("low", "high", "step"):
                    value = getattr(self, bound)
                    if value is not None:
                        require(float(value).is_integer(), f"{where}.{bound}",
                                f"must be an integer for type int, got {value!r}")
                        setattr(self, bound, int(value))
        elif self.type == "categorical":
            require(bool(self.choices), f"{where}.choices", "a non-empty list is required for type categorical")
            for bound in ("low", "high", "step"):
                require(getattr(self, bound) is None, f"{where}.{bound}", "not allowed for type categorical")
        else:
            raise ConfigError(f"{where}.type", f"unknown distribution {self.type!r} (valid: float, int, categorical)")
