"""A complete run config for the best (or a named) trial of a finished or interrupted search.

The best trial is chosen as the search chooses it (:func:`~tune_mtard.search.trials.rank_trials`): the
best ``search.metric`` at its last report among trials that ran the full ``train.epochs``, or among all
trials if none did; failed trials never. The config pins the teacher files the search used (path and
sha256), so ``train`` distils from exactly those.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_mtard import files
from tune_mtard.config import load_config
from tune_mtard.errors import ConfigError
from tune_mtard.search.outcome import reproducible_values
from tune_mtard.search.pareto import front_objectives, front_table, pareto_front, pick_by_clean_weight
from tune_mtard.search.remote import Mirror
from tune_mtard.search.storage_fs import is_uri, open_storage
from tune_mtard.search.trials import TrialSummary, best_trial, load_experiment_trials


@dataclass
class ExportRequest:
    experiment: str  # the search's folder, <storage>/<name>
    trial: str | None = None  # a trial id; None: the best (or confirmed) trial
    out: str | None = None
    pareto: bool = False  # print the Pareto front instead of writing a config
    clean_weight: float | None = None  # the front point maximising W * clean + (1 - W) * robust


@dataclass
class Exported:
    trial: TrialSummary | None
    path: Path | None
    metric: str
    full_epochs: int
    front_table: str = ""
    location: str = ""  # where the config went, when not a local path (an object store's search folder)


def export_trial(request: ExportRequest) -> Exported:
    """What ``export`` does: write one trial's run config (pinning the teachers), or give the Pareto front."""
    choices = (request.trial, request.clean_weight, request.pareto or None)
    chosen_by = sum(x is not None and x is not False for x in choices)
    if chosen_by > 1:
        raise ConfigError("--trial", "give one of --trial, --clean-weight and --pareto")
    if request.clean_weight is not None and not 0 <= request.clean_weight <= 1:
        raise ConfigError("--clean-weight", f"must be in [0, 1], got {request.clean_weight:g}")
    if is_uri(request.experiment):  # an object store's search folder, read through a copy of its files
        storage = open_storage(request.experiment, key="--experiment")
        with tempfile.TemporaryDirectory() as tmp:
            Mirror(storage, Path(tmp)).pull()
            exported = _export(request, Path(tmp), (storage.root, storage.fs), storage.uri)
            if request.out is None and exported.path is not None:  # beside the search's files, as for a folder
                storage.write_bytes(exported.path.name, exported.path.read_bytes())
                exported.path = Path(storage.uri) / exported.path.name
                exported.location = f"{storage.uri.rstrip('/')}/{exported.path.name}"
            return exported
    folder = Path(request.experiment).resolve()
    return _export(request, folder, (str(folder), None), str(folder))


def _export(request: ExportRequest, folder: Path, experiment: tuple[str, Any], named: str) -> Exported:
    if not (folder / files.SPACE).is_file():
        raise ConfigError("--experiment", f"{named} is not a tune-mtard search folder (no {files.SPACE})")
    cfg = load_config(folder / files.SPACE, check_files=False)
    trials = load_experiment_trials(*experiment)
    full = cfg.train.epochs
    if request.pareto or request.clean_weight is not None:
        objectives, modes = front_objectives(cfg)
        front = pareto_front(trials, objectives, modes, full)
        if request.pareto:
            return Exported(None, None, cfg.search.metric, full, front_table(front, objectives, list(cfg.space or {})))
        trial = pick_by_clean_weight(front, request.clean_weight, objectives)
        default_name = f"trial_{trial.trial_id}.yaml"
    elif request.trial is not None:
        chosen = [t for t in trials if t.trial_id == request.trial]
        if not chosen:
            known = ", ".join(t.trial_id for t in trials) or "none"
            raise ConfigError("--trial", f"no trial {request.trial!r} in {named} (trials: {known})")
        trial = chosen[0]
        default_name = f"trial_{trial.trial_id}.yaml"
    else:
        confirmed = _confirmed_trial(folder)
        trial = next((t for t in trials if t.trial_id == confirmed), None) if confirmed else None
        trial = trial or best_trial(trials, cfg.search.metric, cfg.search.mode, full)
        if trial is None:
            raise ConfigError("--experiment", f"no trial in {named} has reported {cfg.search.metric} yet")
        default_name = files.BEST_CONFIG
    if trial.failed:
        raise ConfigError("--trial", f"trial {trial.trial_id} failed ({trial.failure}): it has no result to export")
    out = Path(request.out) if request.out else folder / default_name
    trial.run_config(cfg, {**reproducible_values(cfg, trial.sampled), **teacher_pins(folder)}).dump(out)
    return Exported(trial, out, cfg.search.metric, full)


def _confirmed_trial(folder: Path) -> str | None:
    """The winner of the search's seed confirmation, when it ran one (docs/search.md, "Seed-confirmed winners").

    A search that has not ended has no ``summary.json``; one that cannot be read is refused, never skipped
    (skipping it would export the unconfirmed best in place of the confirmed winner)."""
    path = folder / files.SUMMARY_JSON
    if not path.exists():
        return None
    summary = read_json(path)
    confirm = summary.get("confirm") if isinstance(summary, dict) else None
    return confirm.get("winner") if isinstance(confirm, dict) else None


def teacher_pins(folder: Path) -> dict[str, str]:
    """The teacher files (path and sha256) the search in ``folder`` used, as dotted config keys; a missing or
    unreadable ``teachers.json`` is refused rather than exporting a config without its pins."""
    path = folder / files.TEACHERS_JSON
    record = read_json(path)
    pins = record.get("pins") if isinstance(record, dict) else None
    if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
        raise ConfigError(str(path), "holds no teacher pins (a torn file?); the export would not pin the teachers")
    return dict(pins)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(str(path), f"is not valid JSON (a torn file?): {exc}") from None
