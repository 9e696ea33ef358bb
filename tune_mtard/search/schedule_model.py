"""The epochs a scheduler will run, simulated before a search starts (docs/search.md, "Planning a search").

ASHA's decisions follow Ray Tune's ``AsyncHyperBandScheduler`` (one bracket, ``stop_last_trials``): rungs at
``grace_period * reduction_factor**k`` below ``max_t``; a trial reaching a rung stops when its value is below
the ``1 - 1/reduction_factor`` percentile of the values recorded there before it, and the first trial at a rung
always continues. Which trials stop depends on the values they report, which no plan knows: each simulated
search draws every trial's value at random (each trial keeps its rank at every rung) and runs the trials in
``slots`` parallel lanes in the order the searcher proposes them; the expected figures are means over many
draws. The worst case is every trial running ``max_t`` epochs (each new trial better than all before it).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DRAWS = 200  # simulated searches averaged into the expected figures


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """Ray Tune's rung milestones of one ASHA bracket, ascending."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


@dataclass
class SimulatedSearch:
    epochs: list[int]  # per trial, in start order
    wall_s: float  # from the first trial's start to the last trial's end

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs)


def simulate(values: list[float], slots: int, max_t: int, rungs: list[float], reduction_factor: float,
             reported: list[int], trial_seconds: Callable[[int], float]) -> SimulatedSearch:
    """One search of ``len(values)`` trials, in the order the searcher proposes them and with those values at
    every rung (higher is better), in ``slots`` lanes; each reports at the epochs of ``reported`` (ascending,
    ending at ``max_t``); ``trial_seconds(e)`` is a trial's time from its start to its report of epoch ``e``.
    No rungs: no trial is stopped early (FIFO, and ASHA's worst case)."""
    num_samples = len(values)
    recorded: list[dict[int, float]] = [{} for _ in rungs]
    epochs = [0] * num_samples
    events: list[tuple[float, int, int]] = []  # (seconds, trial, epoch): one per report, in time order
    started, end = 0, 0.0

    def start_next(at: float) -> None:
        nonlocal started
        for epoch in reported:
            heapq.heappush(events, (at + trial_seconds(epoch), started, epoch))
        started += 1

    for _ in range(min(slots, num_samples)):
        start_next(0.0)
    stopped: set[int] = set()
    while events:
        at, trial, epoch = heapq.heappop(events)
        if trial in stopped:
            continue
        epochs[trial] = epoch
        if epoch >= max_t or _asha_stops(values[trial], trial, epoch, rungs, recorded, reduction_factor):
            stopped.add(trial)  # its lane goes to the next trial
            end = max(end, at)
            if started < num_samples:
                start_next(at)
    return SimulatedSearch(epochs, end)


def _asha_stops(value: float, trial: int, epoch: int, rungs: list[float], recorded: list[dict[int, float]],
               reduction_factor: float) -> bool:
    """Ray's ``_Bracket.on_result`` for one report: the highest rung reached that has no record of this trial
    decides, against the values recorded there before it."""
    for milestone, seen in zip(reversed(rungs), reversed(recorded), strict=False):
        if epoch < milestone or trial in seen:
            continue
        cutoff = float(np.percentile(list(seen.values()), (1 - 1 / reduction_factor) * 100)) if seen else None
        seen[trial] = value
        return cutoff is not None and value < cutoff
    return False


def random_values(num_samples: int, seed: int) -> list[float]:
    """One draw of the trials' values for :func:`simulate`."""
    rng = np.random.default_rng(seed)
    return rng.random(num_samples).tolist()
