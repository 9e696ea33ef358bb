"""The Ray Tune trainable, ``train_bmtard``: the thin adapter between Ray Tune and the training loop
(``trainables/bmtard.py``, the top-level folder of the product's layout, is the entry that re-exports it).

Build the trial's config (the search's base config with the sampled dotted keys), the teachers (their
weights arrive through Ray's object store, so no worker trains or reads them from disk) and a
:class:`~tune_mtard.engine.Trainer`; continue from the trial's last checkpoint when Ray restarts it;
after every validation epoch, ``tune.report`` the metrics with a checkpoint of the whole loop state.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs
import ray
import torch
from ray import tune

from tune_mtard import files
from tune_mtard.config import Config
from tune_mtard.data import DataBundle
from tune_mtard.diagnostics import Diagnostician
from tune_mtard.engine import Trainer
from tune_mtard.errors import Diverged
from tune_mtard.models import save_checkpoint
from tune_mtard.perf import trial_device
from tune_mtard.search import compat
from tune_mtard.search.storage_fs import Storage, folder_on
from tune_mtard.search.trials import read_divergence, write_divergence
from tune_mtard.search.workers import Report, WorkerJob, run_workers, teacher_from_weights

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
EPOCH_KEY = "epoch"  # in each checkpoint's metadata: the epochs it has trained


def trial_config(base: Config, sampled: dict[str, Any]) -> Config:
    """The run config of one trial: the base run config with the sampled dotted keys set."""
    return base.run_config().with_values(sampled)


def find_checkpoints(fs: pyarrow.fs.FileSystem, experiment_path: str, trial_dir: str,
                     trial_name: str, everywhere: bool = True) -> list[tune.Checkpoint]:
    """Every checkpoint the trial left in the experiment folder, the furthest trained first.

    Ray hands a restarted trial the last checkpoint recorded in its latest experiment snapshot, and
    snapshots are throttled (10 s at least). A driver killed after a trial reported but before the next
    snapshot leaves newer checkpoints in the trial's folder; one killed while the snapshot still held the
    trial as pending leaves them in a folder the resumed Ray does not know (it names the trial's folder
    anew, with a new date). So look in every folder of this trial (``<trial name>_...``), and order by
    the epoch each checkpoint holds: checkpoint numbers restart from the snapshot's count after a resume.

    Listing the experiment folder costs a trial start in proportion to the trials so far, so only a resumed
    search does (``everywhere``); within one driver session Ray knows each trial's folder, and the trial's
    own folder is enough.
    """
    if everywhere:
        selector = pyarrow.fs.FileSelector(experiment_path, allow_not_found=True)
        folders = [i for i in fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.Directory
                   and (i.base_name == trial_dir or i.base_name.startswith(trial_name + "_"))]
    else:
        folders = [i for i in fs.get_file_info([f"{experiment_path}/{trial_dir}"])
                   if i.type == pyarrow.fs.FileType.Directory]
    found = []
    for folder in folders:
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder.path, allow_not_found=True)):
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX):
                checkpoint = tune.Checkpoint(info.path, filesystem=fs)
                found.append(((_epoch_of(checkpoint), folder.base_name == trial_dir, info.base_name), checkpoint))
    found.sort(key=lambda item: item[0], reverse=True)
    return [checkpoint for _, checkpoint in found]


def _epoch_of(checkpoint: tune.Checkpoint) -> int:
    """The epoch a checkpoint holds, from its metadata; -1 where it has none (a torn copy)."""
    try:
        return int(checkpoint.get_metadata().get(EPOCH_KEY, -1))
    except Exception:  # unreadable metadata: a copy cut short
        return -1


class CheckpointError(RuntimeError):
    """A trial's checkpoint is complete but cannot be loaded into the trial: failing beats silently restarting."""


def _resume(load: Callable[[dict[str, Any]], None], resumed_search: bool) -> tune.Checkpoint | None:
    """Hand ``load`` the loop state of the furthest checkpoint, and return that checkpoint (None when there is
    none): in any folder of the trial when the search was resumed, else in the trial's own folder, and only when
    Ray restarts the trial with a checkpoint.

    A torn copy (cut short by a kill mid-copy: no metadata, or a state file that cannot be read) is skipped
    with a warning, and the one before it is taken. A complete checkpoint that does not load into this
    trial (another config, another version) fails the trial: restarting it from scratch unannounced would
    hide the problem and waste its epochs.
    """
    given = tune.get_checkpoint()
    if given is None and not resumed_search:  # a trial's first start in this search: nothing to look for
        return None
    fs, experiment_path, trial_dir = compat.trial_storage()
    candidates = find_checkpoints(fs, experiment_path, trial_dir, tune.get_context().get_trial_name(),
                                  everywhere=resumed_search)
    if given is not None and all(c.path != given.path for c in candidates):
        candidates.append(given)
    for checkpoint in candidates:
        with checkpoint.as_directory() as folder:
            try:
                state = torch.load(Path(folder) / files.TRIAL_STATE, map_location="cpu", weights_only=True)
            except Exception as exc:  # missing or truncated: a torn copy
                log.warning("skipping the torn checkpoint %s: %s", checkpoint.path, str(exc).splitlines()[0])
                continue
            try:
                load(state)
            except Exception as exc:
                raise CheckpointError(f"the checkpoint {checkpoint.path} cannot be loaded into trial "
                                      f"{tune.get_context().get_trial_id()}: {str(exc).splitlines()[0]}") from exc
        return checkpoint
    return None


def _trial_folder() -> Storage:
    """The trial's folder in the search's storage (a folder or an object store), through Ray's filesystem."""
    fs, experiment_path, trial_dir = compat.trial_storage()
    return folder_on(fs, f"{experiment_path}/{trial_dir}")


def _record_divergence(trainer: Trainer, error: Diverged) -> None:
    """Where the trial diverged, and its trace up to there, in its folder: the driver records them, and a
    restart by Ray fails at once instead of training again into the same divergence."""
    folder = _trial_folder()
    with tempfile.TemporaryDirectory() as tmp:
        trainer.write_trace(Path(tmp) / files.TRACE_CSV)
        folder.write_bytes(files.TRACE_CSV, (Path(tmp) / files.TRACE_CSV).read_bytes())
    write_divergence(folder, error)


def train_bmtard(sampled: dict[str, Any], *, base: Config, data: DataBundle,
                 teachers: dict[str, tuple[str, dict[str, torch.Tensor]]], finished: set[str] = frozenset(),
                 resumed_search: bool = False, worker_resources: tuple[float, float] = (1.0, 0.0)) -> None:
    """One trial, of whichever method its config names (B-MTARD, an ablation or a baseline; the name is kept
    because Ray Tune names every trial folder after it, ``train_bmtard_<id>``, and a resumed search must find
    its folders). ``teachers`` maps role to ``(arch, state dict)``; ``data`` is the whole dataset;
    ``resumed_search``: whether the driver resumed the search (checkpoints are then looked for everywhere).

    ``finished`` holds the ids of trials that a killed driver had already finished (told to Optuna): when
    a resumed search restarts one, it only reports its last epoch again, so Ray records its final result.
    With ``train.workers`` > 1 the trial trains on that many Ray Train workers of ``worker_resources`` (CPU, GPU)
    each (:func:`_train_on_workers`).
    """
    compat.quiet_checkpoint_log()
    diverged = read_divergence(_trial_folder())
    if diverged is not None:
        raise Diverged(diverged["diverged_step"], diverged["diverged_epoch"])
    cfg = trial_config(base, sampled)
    if cfg.train.workers > 1:
        _train_on_workers(cfg, data, teachers, finished, worker_resources, resumed_search or bool(finished))
        return
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(cfg.perf.threads or max(1, int(assigned.get("CPU", 1))))
    trainer = Trainer(cfg, data, {role: teacher_from_weights(arch, weights, data)
                                  for role, (arch, weights) in teachers.items()},
                      device=trial_device(cfg.device, assigned.get("GPU", 0)))
    node_id = ray.get_runtime_context().get_node_id()
    resumed = _resume(trainer.load_state_dict, resumed_search or bool(finished)) is not None
    resumed_from_epoch = trainer.epoch  # 0 for a fresh start: shows in the results that a restart continued
    diagnostician = Diagnostician(cfg)  # reads each trace row once over the trial

    def report(t: Trainer, metrics: dict[str, float]) -> None:
        # The paper's balance failure signatures, judged on the trace so far (docs/sensitivity.md).
        metrics = {**metrics, **diagnostician.latest(t.trace).metrics()}
        with tempfile.TemporaryDirectory() as folder:
            t.save(Path(folder) / files.TRIAL_STATE)
            save_checkpoint(t.student, Path(folder) / files.STUDENT)
            checkpoint = tune.Checkpoint.from_directory(folder)
            checkpoint.set_metadata({EPOCH_KEY: t.epoch})
            tune.report(dict(metrics, node_id=node_id, resumed_from_epoch=resumed_from_epoch), checkpoint=checkpoint)

    if resumed and trainer.history:
        # The driver may never have received the last checkpointed epoch: report it again (the MLflow
        # recorder, Optuna and ASHA each take an epoch once).
        report(trainer, trainer.history[-1])
    if tune.get_context().get_trial_id() in finished:
        return
    try:
        trainer.fit(lambda t, result: report(t, result.metrics) if result.validated else None)
    except Diverged as error:
        _record_divergence(trainer, error)
        raise


def _train_on_workers(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
                      finished: set[str], resources: tuple[float, float], resumed_search: bool) -> None:
    """The trial as ``train.workers`` Ray Train workers (tune_mtard/search/workers.py): this process holds next to
    nothing (``DRIVER_CPU``) and hands Ray Tune rank 0's reports, each with the checkpoint rank 0 wrote, as a
    one-process trial reports them; it continues from its last checkpoint as such a trial does."""
    states: list[dict[str, Any]] = []
    resumed = _resume(states.append, resumed_search)
    state = states[-1] if resumed is not None else None
    node_id = ray.get_runtime_context().get_node_id()
    resumed_from_epoch = int(state["epoch"]) if state is not None else 0
    if resumed is not None and state["history"]:  # the driver may never have received it: report it again
        diagnosis = Diagnostician(cfg).latest(state["trace"]).metrics()
        tune.report(dict(state["history"][-1], **diagnosis, node_id=node_id, resumed_from_epoch=resumed_from_epoch),
                    checkpoint=resumed)
    if tune.get_context().get_trial_id() in finished:
        return
    fs, experiment_path, trial_dir = compat.trial_storage()
    folder = _trial_folder()

    def on_report(report: Report) -> None:
        if report.diverged is not None:  # the trace up to the divergence, where a one-process trial leaves it
            with report.checkpoint.as_directory() as tmp:
                folder.write_bytes(files.TRACE_CSV, (Path(tmp) / files.TRACE_CSV).read_bytes())
            write_divergence(folder, Diverged(*report.diverged))
            return
        checkpoint = tune.Checkpoint(report.checkpoint.path, filesystem=report.checkpoint.filesystem)
        checkpoint.set_metadata({EPOCH_KEY: int(report.metrics["epoch"])})
        tune.report(dict(report.metrics, node_id=node_id, resumed_from_epoch=resumed_from_epoch), checkpoint=checkpoint)

    job = WorkerJob(cfg, ray.put(data), ray.put(teachers), None if state is None else ray.put(state))
    run_workers(job, cpu=resources[0], gpu=resources[1], storage=f"{experiment_path}/{trial_dir}", filesystem=fs,
                on_report=on_report)
