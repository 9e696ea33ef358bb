"""Every use of a private or developer-only part of Ray Tune or Optuna, in one place.

Checked against ray 2.60.0 and optuna 5.0.0 (the versions ``pyproject.toml`` admits were tested with
these); recheck each function here when either is upgraded. Everything else in the package uses their
public APIs only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"
# Ray logs a line per persisted checkpoint, i.e. per trial and epoch here: too many to read in the driver.
RAY_CHECKPOINT_LOGGER = "ray.train._internal.storage"


@contextlib.contextmanager
def quiet_experiment_analysis() -> Iterator[None]:
    """Ray warns about every trial of an interrupted search that has no results yet, e.g. one that was
    pending when the driver died: expected when reading such a search back, so not shown."""
    logger = logging.getLogger(EXPERIMENT_ANALYSIS_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_checkpoint_log() -> None:
    logging.getLogger(RAY_CHECKPOINT_LOGGER).setLevel(logging.WARNING)


def tolerate_deleted_checkpoints() -> None:
    """Let Ray's checkpoint manager skip an old checkpoint that is already gone instead of failing the trial.

    With ``CheckpointConfig(num_to_keep=K)`` the experiment snapshot a resumed search starts from can list
    checkpoints that the killed driver deleted after taking it; Ray 2.60 then raises ``FileNotFoundError``
    when it deletes them again and errors the trial. The snapshot's latest checkpoint always still exists.
    Private: ``ray.train._internal.checkpoint_manager._delete_fs_path``.
    """
    from ray.train._internal import checkpoint_manager

    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "tolerates_missing", False):
        return

    def delete_if_present(fs: Any, fs_path: str) -> None:
        try:
            delete(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            log.debug("checkpoint %s was already deleted", fs_path)

    delete_if_present.tolerates_missing = True
    checkpoint_manager._delete_fs_path = delete_if_present


def trial_storage() -> tuple[Any, str, str]:
    """Inside a trial: its storage filesystem, the experiment's path on it and the trial's folder name.

    Developer API: ``ray.tune.get_context().get_storage()`` (``StorageContext``).
    """
    from ray import tune

    storage = tune.get_context().get_storage()
    return storage.storage_filesystem, storage.experiment_fs_path, storage.trial_dir_name


def study_storage(study: Any) -> Any:
    """The storage of an ``optuna.Study`` (private: ``Study._storage``)."""
    return study._storage


def storage_trial_id(ot_trial: Any) -> int:
    """The storage's id of an ``optuna.Trial`` (private: ``Trial._trial_id``)."""
    return ot_trial._trial_id


def optuna_study(searcher: Any) -> Any:
    """The ``optuna.Study`` of Ray's ``OptunaSearch`` (private: ``_ot_study``)."""
    return searcher._ot_study


def optuna_trials(searcher: Any) -> dict[str, Any]:
    """Ray trial id -> the ``optuna.Trial`` asked for it (private: ``OptunaSearch._ot_trials``)."""
    return searcher._ot_trials


def completed_trials(searcher: Any) -> set[str]:
    """Ray trial ids that ``OptunaSearch`` has told the study about (private: ``_completed_trials``)."""
    return searcher._completed_trials
