"""Did ASHA's early ranks predict the final ones, in this search? (docs/sensitivity.md, "ASHA's fidelity")

ASHA stops a trial on its value at a rung, assuming that early ranks predict final ranks. Among the trials
that reached the last rung, each rung's values are rank-correlated (Spearman) with the trials' final values
(at their last report). A low correlation at a rung means ASHA stopped trials there on ranks that did not
hold: the plain sentence says so, and what to change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tune_mtard.config import Config
from tune_mtard.search.schedule_model import asha_rungs

LOW = 0.5  # a rung whose Spearman correlation with the final values is below this did not predict them
MIN_TRIALS = 3  # fewer trials at the last rung give no correlation worth a number


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def value_at(values: dict[int, float], milestone: float) -> float | None:
    """A trial's value at a rung: its first report at or after the milestone, as ASHA reads it."""
    reached = [e for e in values if e >= milestone]
    return values[min(reached)] if reached else None


def asha_fidelity(histories: dict[str, dict[int, float]], cfg: Config) -> dict[str, Any] | None:
    """Per rung below the last, Spearman's correlation with the final values over the trials that reached the
    last rung (``histories``: trial id -> epoch -> search.metric). None when the search has no ASHA, or no rung
    below ``train.epochs``."""

    s = cfg.search
    if s.scheduler.type != "asha":
        return None
    rungs = asha_rungs(s.scheduler.grace_period, s.scheduler.reduction_factor, cfg.train.epochs)
    if not rungs:  # grace_period beyond train.epochs: ASHA stopped no trial early, there is nothing to judge
        return None
    last = rungs[-1]
    at_last = {tid: values for tid, values in histories.items() if values and max(values) >= last}
    final = {tid: values[max(values)] for tid, values in at_last.items()}
    record: dict[str, Any] = {"rungs": rungs, "last_rung": last, "n_trials": len(at_last), "spearman": {},
                              "sentence": ""}
    if len(at_last) < MIN_TRIALS:
        record["sentence"] = (f"Only {len(at_last)} trials reached the last rung (epoch {last:g}): too few to "
                              "say whether ASHA's early ranks predicted the final ones.")
        return record
    low = []
    for milestone in rungs[:-1] if len(rungs) > 1 else rungs:
        early = [value_at(at_last[tid], milestone) for tid in at_last]
        rho = spearman(early, list(final.values())) if None not in early else float("nan")
        record["spearman"][f"{milestone:g}"] = rho
        if not rho >= LOW:
            low.append((milestone, rho))
    if low:
        record["sentence"] = " ".join(
            f"Rung {milestone:g} ranks did not predict final ranks (Spearman {rho:.2f} over {len(at_last)} trials); "
            "raise grace_period." for milestone, rho in low)
    else:
        record["sentence"] = (f"Early ranks predicted final ranks: Spearman >= {LOW} at every rung over the "
                              f"{len(at_last)} trials that reached epoch {last:g}.")
    return record
