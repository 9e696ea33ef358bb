"""The Ray Tune trial schedulers a search can use, by name (``search.scheduler.type``; docs/search.md,
"Schedulers").

Each scheduler is one decorated builder, in this package: ``@register_scheduler("name")`` on a function that
takes the ``search.scheduler`` section and ``max_t`` (the epochs of a full trial) and returns a Ray Tune
scheduler. Every module of this package is imported when the registry is first read, so a scheduler added
in a new file here is known to config validation, the search, ``compare --tune`` and the docs with no other
file touched.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tune_mtard.errors import ConfigError
from tune_mtard.registry import Registry

if TYPE_CHECKING:
    from tune_mtard.config.search import SchedulerConfig


@dataclass(frozen=True)
class SchedulerSpec:
    """A registered scheduler: how to build it, how to name it in a report, and the epoch a trial must reach
    before it may stop one (``first_rung``; None: it never stops a trial early)."""

    name: str
    build: Callable[[SchedulerConfig, int], Any]  # (search.scheduler, max_t) -> ray.tune.schedulers.TrialScheduler
    title: str
    describe: Callable[[SchedulerConfig], str]
    first_rung: str | None  # the search.scheduler field holding it, e.g. "grace_period"
    summary: str


SCHEDULERS: Registry[SchedulerSpec] = Registry("scheduler")


def register_scheduler(name: str, *, title: str, summary: str, first_rung: str | None = None,
                       describe: Callable[[SchedulerConfig], str] | None = None):
    """Decorator: ``build(scheduler_config, max_t)`` becomes the scheduler ``name`` (``search.scheduler.type``)."""

    def add(build: Callable[[SchedulerConfig, int], Any]) -> Callable[[SchedulerConfig, int], Any]:
        SCHEDULERS.add(name, SchedulerSpec(name, build, title, describe or (lambda config: title), first_rung,
                                            summary))
        return build

    return add


def build_scheduler(config: SchedulerConfig, max_t: int):
    """The Ray Tune scheduler ``config`` names, for trials of ``max_t`` epochs."""
    return SCHEDULERS.get(config.type).build(config, max_t)


def describe_scheduler(config: SchedulerConfig) -> str:
    """``ASHA (grace period 3, reduction factor 3)``: the scheduler as a report names it."""
    return SCHEDULERS.get(config.type).describe(config)


def fit_to_epochs(config: SchedulerConfig, epochs: int, flag: str) -> tuple[dict[str, Any], str | None]:
    """The one place a shorter trial budget (``--max-epochs``, ``--tune-epochs``) adapts the scheduler: its
    first rung lowered to ``epochs`` where it lies past them. Returns the changed ``search.scheduler`` fields
    and the line that says so (None when nothing changed)."""
    spec = SCHEDULERS.get(config.type)
    if spec.first_rung is None or getattr(config, spec.first_rung) <= epochs:
        return {}, None
    given = getattr(config, spec.first_rung)
    return {spec.first_rung: epochs}, f"{flag} {epochs}: {spec.title}'s {spec.first_rung} {given} lowered to {epochs}"



def check_first_rung(config: SchedulerConfig, epochs: int) -> None:
    """A scheduler's first rung must be an epoch a trial of ``epochs`` epochs reaches (ConfigError otherwise)."""
    spec = SCHEDULERS.get(config.type)
    if spec.first_rung is not None and getattr(config, spec.first_rung) > epochs:
        raise ConfigError(f"search.scheduler.{spec.first_rung}",
                          f"({getattr(config, spec.first_rung)}) must be <= train.epochs ({epochs}): "
                          f"{spec.title}'s first rung must be an epoch a trial reaches")

for _module in pkgutil.iter_modules(__path__):  # each module of this package registers its own schedulers
    importlib.import_module(f"{__name__}.{_module.name}")
