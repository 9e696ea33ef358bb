"""A complete run config for the best (or a named) trial of a finished or interrupted search.

The best trial is chosen as the search chooses it (:func:`~tune_mtard.search.trials.rank_trials`): the
best ``search.metric`` at its last report among trials that ran the full ``train.epochs``, or among all
trials if none did; failed trials never. The config pins the teacher files the search used (path and
sha256), so ``train`` distils from exactly those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tune_mtard import files
from tune_mtard.config import load_config
from tune_mtard.errors import ConfigError
from tune_mtard.search.driver import reproducible_values
from tune_mtard.search.trials import TrialSummary, best_trial, load_experiment_trials


@dataclass
class ExportRequest:
    experiment: str  # the search's folder, <storage>/<name>
    trial: str | None = None  # a trial id; None: the best trial
    out: str | None = None


@dataclass
class Exported:
    trial: TrialSummary
    path: Path
    metric: str
    full_epochs: int


def export_trial(request: ExportRequest) -> Exported:
    folder = Path(request.experiment).resolve()
    if not (folder / files.SPACE).is_file():
        raise ConfigError("--experiment", f"{folder} is not a tune-mtard search folder (no {files.SPACE})")
    cfg = load_config(folder / files.SPACE, check_files=False)
    trials = load_experiment_trials(folder)
    if request.trial is not None:
        chosen = [t for t in trials if t.trial_id == request.trial]
        if not chosen:
            known = ", ".join(t.trial_id for t in trials) or "none"
            raise ConfigError("--trial", f"no trial {request.trial!r} in {folder} (trials: {known})")
        trial = chosen[0]
    else:
        trial = best_trial(trials, cfg.search.metric, cfg.search.mode, cfg.train.epochs)
        if trial is None:
            raise ConfigError("--experiment", f"no trial in {folder} has reported {cfg.search.metric} yet")
    if trial.failed:
        raise ConfigError("--trial", f"trial {trial.trial_id} failed ({trial.failure}): it has no result to export")
    default_name = files.BEST_CONFIG if request.trial is None else f"trial_{trial.trial_id}.yaml"
    out = Path(request.out) if request.out else folder / default_name
    cfg.run_config().with_values({**reproducible_values(cfg, trial.sampled), **teacher_pins(folder)}).dump(out)
    return Exported(trial, out, cfg.search.metric, cfg.train.epochs)


def teacher_pins(folder: Path) -> dict[str, str]:
    """The teacher files (path and sha256) the search in ``folder`` used, as dotted config keys."""
    try:
        return dict(json.loads((folder / files.TEACHERS_JSON).read_text())["pins"])
    except (OSError, ValueError, KeyError):
        return {}
