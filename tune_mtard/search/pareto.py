"""The clean-robust Pareto front of a search (docs/search.md, "Pareto front").

B-MTARD is about a trade-off: a search records every full-budget trial that no other full-budget trial
beats on all its objectives at once, not only the one that maximises W-Robust Acc. A multi-objective
search (``search.objectives``) has its own objectives; any other search is read on validation clean and
robust accuracy, both maximised. Failed trials are never on the front.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tune_mtard import atomic
from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.metrics import VAL_CLEAN_ACC, VAL_ROBUST_ACC, w_robust_acc
from tune_mtard.search.trials import TrialSummary

DEFAULT_OBJECTIVES = (VAL_CLEAN_ACC, VAL_ROBUST_ACC)


def front_objectives(cfg: Config) -> tuple[list[str], list[str]]:
    """The objectives (and their modes) the front is taken on."""
    s = cfg.search
    if s.objectives:
        return list(s.objectives), s.objective_modes()
    return list(DEFAULT_OBJECTIVES), ["max"] * len(DEFAULT_OBJECTIVES)


def _oriented(trial: TrialSummary, objectives: list[str], modes: list[str]) -> list[float]:
    """The trial's objectives, each turned so that larger is better."""
    return [trial.metric(name) * (1 if mode == "max" else -1) for name, mode in zip(objectives, modes, strict=True)]


def dominates(a: list[float], b: list[float]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one (both oriented: larger is better)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(trials: list[TrialSummary], objectives: list[str], modes: list[str],
                 full_epochs: int) -> list[TrialSummary]:
    """The full-budget, non-failed trials no other such trial dominates, by the first objective (best first)."""
    pool = [t for t in trials if not t.failed and t.epochs >= full_epochs
            and all(t.metrics.get(name) is not None for name in objectives)]
    points = {t.trial_id: _oriented(t, objectives, modes) for t in pool}
    front = [t for t in pool if not any(dominates(points[o.trial_id], points[t.trial_id]) for o in pool)]
    return sorted(front, key=lambda t: points[t.trial_id], reverse=True)


def pick_by_clean_weight(front: list[TrialSummary], clean_weight: float, objectives: list[str]) -> TrialSummary:
    """The front point with the highest ``clean_weight * clean + (1 - clean_weight) * robust``."""
    if VAL_CLEAN_ACC not in objectives or VAL_ROBUST_ACC not in objectives:
        raise ConfigError("--clean-weight", f"the search's front is on {', '.join(objectives)}, not on "
                                            f"{VAL_CLEAN_ACC} and {VAL_ROBUST_ACC}")
    if not front:
        raise ConfigError("--clean-weight", "the search has no full-budget trial yet: its front is empty")
    return max(front, key=lambda t: (w_robust_acc(t.metric(VAL_CLEAN_ACC), t.metric(VAL_ROBUST_ACC), clean_weight),
                                     t.metric(VAL_CLEAN_ACC) if clean_weight >= 0.5 else t.metric(VAL_ROBUST_ACC)))


def write_pareto_csv(front: list[TrialSummary], path: Path, objectives: list[str], space_keys: list[str]) -> None:
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", *objectives, *space_keys])
        for t in front:
            writer.writerow([t.trial_id, *(t.metrics.get(name, "") for name in objectives),
                             *(t.sampled.get(key, "") for key in space_keys)])


def front_table(front: list[TrialSummary], objectives: list[str], space_keys: list[str]) -> str:
    """The front as a markdown table (``export --pareto`` prints it)."""
    header = ["trial", *objectives, *space_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in front:
        cells = [t.trial_id, *(f"{t.metric(name):.4f}" for name in objectives),
                 *(_cell(t.sampled.get(key)) for key in space_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def default_trial(trials: list[TrialSummary], cfg: Config) -> TrialSummary | None:
    """The trial that ran the base config's values of the searched keys (the paper's defaults), if any."""
    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.searcher import default_point

    point, _ = default_point(cfg)
    return next((t for t in trials if all(t.sampled.get(k) == v for k, v in point.items())), None)
