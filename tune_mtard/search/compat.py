"""Every use of a private or developer-only part of Ray Tune or Optuna, in one place.

Checked against ray 2.60.0 and optuna 5.0.0 (the versions ``pyproject.toml`` admits were tested with
these); recheck each function here when either is upgraded. Everything else in the package uses their
public APIs only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
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


def quiet_preset_points() -> None:
    """The confirmation trials set every key of a constant space from their points, as intended; Ray warns
    about each ("Pre-set value ... is not equal")."""
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)


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


# ---- stopping a running Tuner.fit (see search/interrupts.py) ---------------------------------------------

# Read by ray.tune.run when fit starts: with it set, Tune leaves our SIGINT handler in place.
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


def request_tune_stop() -> None:
    """Ask a ``Tuner.fit`` running in this process's main thread for its graceful stop: it stops the trials and
    saves the experiment with them unfinished (resumable), then returns.

    Private: ``ray.tune.tune._setup_signal_catching`` handles SIGUSR1 this way while ``fit`` runs.
    """
    import signal

    signal.raise_signal(signal.SIGUSR1)


# ---- where a search runs ----------------------------------------------------------------------------------

ADDRESS_TIMEOUT_S = 3.0


def unreachable_ray_address(address: str) -> str | None:
    """Why the Ray cluster at ``address`` cannot be reached (None when it can), found within seconds.

    ``ray.init`` itself retries an unreachable address for many minutes. ``auto`` is resolved as ``ray.init``
    resolves it (``RAY_ADDRESS``, Ray's address file, a local ``gcs_server``; private:
    ``ray._private.services.canonicalize_bootstrap_address``); ``ray://host:port`` is a Ray Client server.
    A TCP connection to the resolved address must open within :data:`ADDRESS_TIMEOUT_S`.
    """
    import socket

    target = os.environ.get("RAY_ADDRESS") or address if address == "auto" else address
    if target == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError as exc:
            return f"no running Ray cluster found ({str(exc).splitlines()[0]})"
    if target.startswith("ray://"):
        target = target[len("ray://"):].split("/")[0]
    elif "://" in target:
        return f"unsupported address scheme in {address!r} (use host:port, auto or ray://host:port)"
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return f"{address!r} is not a Ray address (host:port, auto or ray://host:port)"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {target}: {exc}"


def largest_node() -> tuple[float, float]:
    """CPUs and GPUs of the largest alive node of the connected cluster (``ray.nodes()``, a developer API)."""
    import ray

    cpu = gpu = 0.0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            cpu, gpu = max(cpu, float(resources.get("CPU", 0))), max(gpu, float(resources.get("GPU", 0)))
    return cpu, gpu


def trial_nodes(cpu: float, gpu: float) -> list[tuple[str, str]]:
    """``(node id, "ip (id ..., the head)")`` of each alive node with ``cpu`` CPUs and ``gpu`` GPUs, those Ray
    Tune can place a trial on (``ray.nodes()``, a developer API; the head by its private resource
    ``node:__internal_head__``)."""
    import ray

    found = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("CPU", 0) >= cpu and resources.get("GPU", 0) >= gpu:
            head = ", the head" if "node:__internal_head__" in resources else ""
            found.append((node["NodeID"], f"{node['NodeManagerAddress']} (id {node['NodeID'][:12]}{head})"))
    return found


def trial_ids(grid: Any) -> list[str]:
    """The Ray trial id of each result of a ``ResultGrid``, in its order (private: ``_experiment_analysis``).

    A result carries its trial id only in the metrics it reported: a trial that failed before its first
    report has none.
    """
    return [trial.trial_id for trial in grid._experiment_analysis.trials]


def reopen_search_generator(experiment_dir: Path) -> bool:
    """Let a restored search propose trials again after a Stopper's ``stop_all`` ended it (a spent budget,
    docs/search.md, "Budget"): Tune marks its ``SearchGenerator`` finished then, and saves that as ``finished``
    in the newest ``search_gen_state-*.json`` (a cloudpickle of ``SearchGenerator.get_state()``; private
    format, checked with Ray 2.60.0). Returns whether a state was reopened."""
    import ray.cloudpickle as cloudpickle

    states = sorted(Path(experiment_dir).glob("search_gen_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return False
    state = cloudpickle.loads(states[-1].read_bytes())
    if not state.get("finished"):
        return False
    state["finished"] = False
    tmp = states[-1].with_name(f".{states[-1].name}.tmp")
    tmp.write_bytes(cloudpickle.dumps(state))
    tmp.replace(states[-1])
    return True


def grow_search(experiment_dir: Path, num_samples: int) -> bool:
    """Let a restored search propose trials up to ``num_samples`` (``--resume --num-samples N``, docs/search.md,
    "Resume"; never shrinks it): a restored Tuner takes its trial count from the ``total_samples`` of the newest
    ``search_gen_state-*.json``, not from its Tuner config (same private format as above, Ray 2.60.0).
    Returns whether the count changed."""
    import ray.cloudpickle as cloudpickle

    # The newest by name, as Ray picks it: the names hold each session's start time, while the mtimes are
    # those of Ray's last sync of the whole folder.
    states = sorted(Path(experiment_dir).glob("search_gen_state-*.json"))
    if not states:
        return False
    state = cloudpickle.loads(states[-1].read_bytes())
    if state.get("total_samples", 0) >= num_samples:  # never fewer: an earlier resume may have grown it
        return False
    state["total_samples"] = num_samples
    tmp = states[-1].with_name(f".{states[-1].name}.tmp")
    tmp.write_bytes(cloudpickle.dumps(state))
    tmp.replace(states[-1])
    return True


CHECKED_RAY = "2.60."  # the Ray release line the patches below were read against
_RETRIES: dict[str, int] = {}  # the retry count of this session's search (docs/search.md, "Resume")


def infra_retries() -> int:
    """The retry count the rule below applies in this session."""
    return _RETRIES.get("max_failures", 0)


def judged_failure_kind(trial: Any) -> str | None:
    """The kind the rule below gave the trial's latest failure in this driver (None before any), from the exception
    itself: the callbacks that record the failure get the trial, not the exception."""
    return getattr(trial.temporary_state, "failure_kind", None)


def retry_only_infra_failures(kind_of: Any, max_failures: int) -> None:
    """Make Ray retry a failed trial only when ``kind_of(error)`` is ``infra``, up to ``max_failures`` times
    (docs/search.md, "Outcomes").

    Ray's ``FailureConfig(max_failures)`` retries every error alike; a trial's own error or divergence would
    start again and fail again. Ray 2.60's controller calls ``Trial.handle_error(exc)`` (which counts the
    failure) and then ``Trial.should_recover()``: the first notes whether this error is final, the second
    then declines the retry, so the trial goes to ERROR at its first such failure. The count is this
    session's, not the one each trial was pickled with, so a resumed search takes a changed
    ``search.max_failures``. Private: ``ray.tune.experiment.trial.Trial.handle_error`` / ``should_recover``.
    """
    import ray
    from ray.tune.experiment.trial import Trial

    _RETRIES["max_failures"] = max_failures
    if getattr(Trial.should_recover, "infra_only", False):
        return
    if not ray.__version__.startswith(CHECKED_RAY):
        log.warning("ray %s: the infra-only retry rule was checked against ray %sx", ray.__version__, CHECKED_RAY)
    handle_error = Trial.handle_error

    def handle_final_error(self, exc=None):
        self.temporary_state.failure_kind = kind_of(exc)
        self.temporary_state.final_failure = self.temporary_state.failure_kind != "infra"
        handle_error(self, exc)

    def recover_infra_only(self) -> bool:
        if getattr(self.temporary_state, "final_failure", False):
            return False
        limit = _RETRIES.get("max_failures", self.max_failures)
        return self.run_metadata.num_failures <= limit or limit < 0

    recover_infra_only.infra_only = True
    Trial.handle_error, Trial.should_recover = handle_final_error, recover_infra_only


_RESUME_ERRORED: set[str] = set()  # the ERROR trials the next restored Tuner resumes (--retry-errored)


def resume_errored_trials(trial_ids: list[str]) -> None:
    """Let the Tuner this process restores next resume the ERROR trials ``trial_ids``, and no other, from their
    last checkpoint, each with this session's ``search.max_failures`` retries afresh (``--resume --retry-errored``,
    docs/search.md, "Retrying infra failures").

    ``Tuner.restore(resume_errored=True)`` would resume every errored trial, a trial's own failures and diverged
    ones included. Here each chosen trial is set back to PENDING before Ray requeues the restored trials, so
    Ray resumes it as an unfinished one (same trial id, same folder, its checkpoint); the search wrappers are
    told it is live again (``ConcurrencyLimiter.live_trials``, which otherwise drops its result) and the base
    searcher's ``reopen_trial(trial_id)``, where it has one, gives it a new record to tell. Private:
    ``TuneController._requeue_restored_trials`` (called once the searcher is restored),
    ``Trial.run_metadata.num_failures``, ``ConcurrencyLimiter.live_trials`` (Ray 2.60.0).
    """
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment.trial import Trial

    _RESUME_ERRORED.clear()
    _RESUME_ERRORED.update(trial_ids)
    if getattr(TuneController._requeue_restored_trials, "resumes_chosen", False):
        return
    requeue = TuneController._requeue_restored_trials

    def requeue_chosen(self, trials, resume_config) -> None:
        for trial in trials:
            if trial.status == Trial.ERROR and trial.trial_id in _RESUME_ERRORED:
                trial.run_metadata.num_failures = 0
                trial.set_status(Trial.PENDING)
                _reopen_in_searchers(self._search_alg, trial.trial_id)
        _RESUME_ERRORED.clear()  # once: a confirmation Tuner restored later has trials of its own
        requeue(self, trials, resume_config)

    requeue_chosen.resumes_chosen = True
    TuneController._requeue_restored_trials = requeue_chosen


def _reopen_in_searchers(search_alg: Any, trial_id: str) -> None:
    searcher = getattr(search_alg, "searcher", None)
    while hasattr(searcher, "searcher"):  # the wrappers: ConcurrencyLimiter, Repeater
        if isinstance(getattr(searcher, "live_trials", None), set):
            searcher.live_trials.add(trial_id)
            searcher.num_unfinished_live_trials = getattr(searcher, "num_unfinished_live_trials", 0) + 1
        searcher = searcher.searcher
    if hasattr(searcher, "reopen_trial"):
        searcher.reopen_trial(trial_id)


def save_failed_trial_states() -> None:
    """Let Ray's experiment snapshot hold every trial that failed as ERROR, a trial whose worker died included.

    Ray 2.60 marks a stopped trial for its next snapshot only while the trial still has its actor; when the actor
    died (a SIGKILLed worker, a lost node) it is forgotten first, and the final snapshot keeps the trial as it was
    before, RUNNING with no failure: a plain ``--resume`` would then run the failed trial again and count it as a
    result. Private: ``TuneController._schedule_trial_stop`` / ``_mark_trial_to_checkpoint``.
    """
    from ray.tune.execution.tune_controller import TuneController

    if getattr(TuneController._schedule_trial_stop, "marks_always", False):
        return
    schedule_stop = TuneController._schedule_trial_stop

    def stop_and_mark(self, trial, exception=None) -> None:
        schedule_stop(self, trial, exception=exception)
        self._mark_trial_to_checkpoint(trial)

    stop_and_mark.marks_always = True
    TuneController._schedule_trial_stop = stop_and_mark
