"""A run or a search trial as ``train.workers`` data-parallel workers: Ray Train's torch workers (docs/scale.md,
"Workers").

:func:`run_workers` starts a :class:`ray.train.torch.TorchTrainer` of N workers (``gloo`` on CPUs, ``nccl`` on
GPUs), each given ``search.resources`` (its CPUs and GPUs), and waits for it. Every worker builds the same
:class:`~tune_mtard.engine.Trainer` with :class:`~tune_mtard.distributed.Workers` (each trains its shard of every
global batch, tune_mtard/distributed.py) and calls ``ray.train.report`` after each validated epoch, as Ray Train
wants from every worker; rank 0 alone validates, and its metrics (and, in a trial, its checkpoint) are what the
caller gets, one :class:`Report` at a time, in its own thread: the ``train`` command logs them to MLflow, a trial
hands them to Ray Tune with the checkpoint. In a ``train`` run rank 0 also writes the run's files
(:func:`~tune_mtard.pipeline.run_pipeline` without an MLflow run: the command's process logs it).

A worker, actor or node lost mid-run is an infrastructure failure (:class:`WorkerLostError`, which the search
retries from the trial's last checkpoint); a divergence stops every worker at the same step (the loss is reduced
with the trace row) and comes back as :class:`~tune_mtard.errors.Diverged`; any other error of a worker is the
run's own.
"""

from __future__ import annotations

import queue as queue_module
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tune_mtard import files
from tune_mtard.config import Config
from tune_mtard.data import DataBundle
from tune_mtard.diagnostics import Diagnostician
from tune_mtard.distributed import Workers
from tune_mtard.engine import Trainer
from tune_mtard.errors import Diverged, RunFailed
from tune_mtard.models import create_model, load_state, save_checkpoint
from tune_mtard.pipeline import run_pipeline
from tune_mtard.search.trials import error_kind

DRIVER_CPU = 0.01  # what a trial holds itself while its workers train (Ray refuses a bundle of nothing)
# What Ray Train's controller hands back for a worker it lost (classes of Ray Train V2's private exceptions,
# matched by name) or could not start: the machinery's failure, not the run's.
LOST = ("WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError", "WorkerGroupStartupTimeoutError",
        "WorkerGroupStartupFailedError")
DIVERGED = "tune_mtard_diverged"  # in a report's metrics: [step, epoch] of the divergence


def teacher_from_weights(arch: str, weights: dict[str, torch.Tensor], data: DataBundle) -> torch.nn.Module:
    """A frozen teacher in eval mode from its architecture and state dict (its normalisation buffers included)."""
    model = create_model(arch, data.num_classes, data.in_channels)
    load_state(model, weights, f"the {arch} teacher's weights", arch)
    return model.eval().requires_grad_(False)


class WorkerLostError(RuntimeError):
    """A worker process, its actor or its node was lost while the run trained: the machinery failed, not the run."""


@dataclass
class WorkerJob:
    """What every worker needs: the run config, the data and teachers (object refs, fetched by each worker),
    the loop state to continue from, and, for a ``train`` run, the folder rank 0 writes the run's files to."""

    cfg: Config
    data: Any  # ObjectRef of the DataBundle
    teachers: Any  # ObjectRef of {role: (arch, state dict)}
    state: Any = None  # ObjectRef of a Trainer.state_dict() to continue from, or None
    out: str | None = None  # train: rank 0 writes DIR's files; None: a search trial (rank 0 reports checkpoints)


@dataclass
class Report:
    """One validated epoch of rank 0: its metrics and, in a trial, the checkpoint Ray Train stored."""

    metrics: dict[str, Any]
    checkpoint: Any = None  # ray.train.Checkpoint or None
    diverged: tuple[int, int] | None = None  # (step, epoch) where the run diverged


def run_workers(job: WorkerJob, *, cpu: float, gpu: float, storage: str, on_report: Callable[[Report], None],
                filesystem: Any = None) -> None:
    """Train ``job`` on ``job.cfg.train.workers`` workers of ``cpu`` CPUs and ``gpu`` GPUs each; ``on_report`` gets
    each of rank 0's reports in the calling thread. Ray Train keeps its run (and a trial's checkpoints, the last
    two) in a new folder under ``storage`` (on ``filesystem``), removed when the run ends."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    relay: Any = Queue(actor_options={"num_cpus": 0})  # in no bundle: a trial's placement group has none to spare

    class Relay(UserCallback):
        """In Ray Train's controller: rank 0's metrics and the stored checkpoint of each report, to the caller."""

        def __init__(self, q: Any):
            self.q = q

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.q.put((metrics[0], checkpoint))

    name = f"workers-{uuid.uuid4().hex[:8]}"
    resources = {"CPU": cpu, **({"GPU": gpu} if gpu > 0 else {})}
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=job.cfg.train.workers, use_gpu=gpu > 0,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, storage_filesystem=filesystem,
                                       callbacks=[Relay(relay)], failure_config=ray.train.FailureConfig(max_failures=0),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    diverged: tuple[int, int] | None = None
    try:
        while thread.is_alive() or not _empty(relay):
            try:
                metrics, checkpoint = relay.get(timeout=0.5)
            except queue_module.Empty:
                continue
            except Exception:  # ray.util.queue.Empty
                continue
            step_epoch = metrics.pop(DIVERGED, None)
            diverged = None if step_epoch is None else (int(step_epoch[0]), int(step_epoch[1]))
            on_report(Report(metrics, checkpoint, diverged))
        thread.join()
    finally:
        _remove(storage, name, filesystem)
    if "error" in outcome:
        raise _classified(outcome["error"]) from outcome["error"]
    if diverged is not None:
        raise Diverged(*diverged)


def _empty(relay: Any) -> bool:
    try:
        return relay.empty()
    except Exception:  # the queue's actor is gone: nothing more comes
        return True


def _remove(storage: str, name: str, filesystem: Any) -> None:
    """Ray Train's folder of this run (its stored checkpoints are the caller's by now)."""
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        fs.delete_dir(f"{storage.rstrip('/')}/{name}")
    except (FileNotFoundError, OSError):
        pass


def _classified(error: BaseException) -> BaseException:
    """What Ray Train's failure means: a lost worker, actor or node (or Ray Train's own controller) is
    :class:`WorkerLostError`; a worker's own error is the run's, named by its rank."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, ControllerError):
        return WorkerLostError(f"Ray Train's controller failed: {str(error.controller_failure).splitlines()[0]}")
    if isinstance(error, WorkerGroupError):
        failures = sorted(error.worker_failures.items())
        for rank, failure in failures:
            if isinstance(failure, RayActorError) or type(failure).__name__ in LOST or error_kind(failure) == "infra":
                first = (str(failure).strip().splitlines() or [""])[0]
                return WorkerLostError(f"worker {rank} was lost ({type(failure).__name__}: {first})")
        rank, failure = failures[0]
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, RunFailed):
            return cause
        lines = [line for line in str(cause).strip().splitlines() if line.strip()]
        return RuntimeError(f"worker {rank}: {type(cause).__name__}: {lines[-1] if lines else ''}")
    return error


# ------------------------------------------------------------------------------------------------ on each worker

def _worker_loop(config: dict[str, Any]) -> None:
    """One worker: its trainer on its shard of every batch, a report per validated epoch (every worker reports;
    rank 0's metrics count), rank 0's files or checkpoints."""
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    job: WorkerJob = config["job"]
    cfg = job.cfg
    context = ray.train.get_context()
    first = context.get_world_rank() == 0
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(cfg.perf.threads or max(1, int(assigned.get("CPU", 1))))
    device = get_device() if torch.cuda.is_available() and assigned.get("GPU", 0) > 0 else torch.device("cpu")
    data = ray.get(job.data)
    teachers = {role: teacher_from_weights(arch, weights, data)
                for role, (arch, weights) in ray.get(job.teachers).items()}
    workers = Workers(dist.get_rank(), dist.get_world_size())
    trainer = Trainer(cfg, data, teachers, device=device, workers=workers, sync_batch_norm=cfg.train.sync_batch_norm)
    if job.state is not None:
        trainer.load_state_dict(ray.get(job.state))  # the same state, RNG included, on every worker
    diagnostician = Diagnostician(cfg)

    def report(t: Trainer, metrics: dict[str, float]) -> None:
        if not first:
            ray.train.report({})
            return
        if job.out is not None:
            ray.train.report(dict(metrics))
            return
        metrics = {**metrics, **diagnostician.latest(t.trace).metrics()}
        with tempfile.TemporaryDirectory() as folder:
            _write_checkpoint(t, Path(folder))
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))

    try:
        if job.out is not None and first:
            # Every worker reports after each epoch rank 0 validates (the others have no validation metrics).
            run_pipeline(trainer, data, Path(job.out), on_epoch=lambda result: report(trainer, result.metrics)
                         if trainer.validates(result.epoch) else None)
        else:
            trainer.fit(lambda t, result: report(t, result.metrics) if t.validates(result.epoch) else None)
    except Diverged as error:
        where = [error.step, error.epoch]
        if not first:
            ray.train.report({DIVERGED: where})
        elif job.out is not None:  # run_pipeline wrote the trace
            ray.train.report({DIVERGED: where})
        else:
            with tempfile.TemporaryDirectory() as folder:
                trainer.write_trace(Path(folder) / files.TRACE_CSV)
                ray.train.report({DIVERGED: where}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _write_checkpoint(trainer: Any, folder: Path) -> None:
    """A trial's checkpoint, as a one-process trial writes it: the loop state and the student."""
    trainer.save(folder / files.TRIAL_STATE)
    save_checkpoint(trainer.student, folder / files.STUDENT)


def loop_state(path: str | Path) -> dict[str, Any]:
    """A loop state file (``checkpoint.pt``, a trial's state), to hand every worker."""
    return torch.load(path, map_location="cpu", weights_only=True)
