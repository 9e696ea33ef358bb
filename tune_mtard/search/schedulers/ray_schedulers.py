"""The trial schedulers Ray Tune ships that a search uses (docs/search.md, "Schedulers"): one definition each.

Ray is imported inside each builder: config validation reads this registry and must not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tune_mtard.search.schedulers import register_scheduler

if TYPE_CHECKING:
    from tune_mtard.config.search import SchedulerConfig


def _asha_text(config: SchedulerConfig) -> str:
    return f"ASHA (grace period {config.grace_period}, reduction factor {config.reduction_factor:g})"


@register_scheduler("asha", title="ASHA", first_rung="grace_period", describe=_asha_text,
                    summary="stops weak trials at rungs grace_period, grace_period * reduction_factor, ...")
def asha(config: SchedulerConfig, max_t: int):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=config.grace_period,
                         reduction_factor=config.reduction_factor)


@register_scheduler("fifo", title="FIFO", summary="runs every trial to the end")
def fifo(config: SchedulerConfig, max_t: int):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()
