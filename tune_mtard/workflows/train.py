"""One full training run from a config: what the ``train`` command does (docs/cli.md, "train").

Writes ``DIR/metrics.json``, ``DIR/student.pt``, ``DIR/balance_trace.csv`` (+ ``.png``), ``DIR/config.yaml``
(the resolved config) and ``DIR/checkpoint.pt`` (the full loop state, every epoch), and logs one MLflow
run, reopened by ``resume``. A search space file works too: its ``search`` and ``space`` sections are
ignored.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tune_mtard import atomic, files, tracking
from tune_mtard.config import Config, load_config
from tune_mtard.config.rules import check_model_name
from tune_mtard.data import DataBundle, load_data
from tune_mtard.engine import EpochResult
from tune_mtard.errors import ConfigError, Diverged
from tune_mtard.metrics import EPOCH, VAL_CLEAN_ACC, VAL_ROBUST_ACC, VAL_W_ROBUST_ACC
from tune_mtard.model_registry import register_student
from tune_mtard.models import create_model, load_checkpoint
from tune_mtard.perf import resolve_device
from tune_mtard.pipeline import log_finished_run, log_missing_epochs, new_trainer, run_pipeline
from tune_mtard.search.local_ray import ray_session
from tune_mtard.search.workers import Report, WorkerJob, loop_state, run_workers
from tune_mtard.services import check_tracking_uri, unwritable_folder
from tune_mtard.teachers import TeacherSet, prepare_teachers
from tune_mtard.tracking import RunHandle

# Keys a resumed run may change: where things are stored and logged, and how long it trains.
RESUMABLE_CHANGES = ("train.epochs", "data.root", "teachers.cache_dir")


@dataclass
class TrainRequest:
    config: str
    out: str | None = None
    overrides: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    resume: bool = False
    progress: bool = False
    register: str | None = None  # register the final student as this MLflow model
    address: str | None = None  # the Ray cluster train.workers > 1 runs on (None: a local Ray of its own)


@dataclass
class TrainPlan:
    """A validated request: the run config and where the run goes."""

    cfg: Config
    out: Path
    resume: bool
    progress: bool


def plan_training(request: TrainRequest) -> TrainPlan:
    """Check everything the run needs before anything is written or logged; ConfigError (exit 2) otherwise."""
    if request.register is not None:
        check_model_name(request.register, "--register")
    flags = {"mlflow.tracking_uri": ("--tracking-uri", request.tracking_uri)} if request.tracking_uri else {}
    cfg = load_config(request.config, request.overrides, flags=flags).run_config()

    resolve_device(cfg.device)
    out = Path(request.out or Path("runs") / cfg.name).resolve()
    check_tracking_uri(cfg.mlflow.tracking_uri, "--tracking-uri" if request.tracking_uri else "mlflow.tracking_uri")
    problem = unwritable_folder(out)
    if problem is not None:
        raise ConfigError("--out", problem)
    if request.resume:
        if not (out / files.CHECKPOINT).is_file():
            raise ConfigError("--out", f"nothing to resume: no {files.CHECKPOINT} in {out}")
        saved = out / files.RUN_CONFIG
        if saved.is_file():
            previous = load_config(saved, check_files=False).flat()
            for key, value in cfg.flat().items():
                if key in RESUMABLE_CHANGES or key.startswith("mlflow."):
                    continue
                if previous.get(key) != value:
                    raise ConfigError(key, f"differs from the run being resumed ({previous.get(key)!r} -> {value!r})")
    elif out.exists() and any((out / name).exists() for name in (files.CHECKPOINT, files.METRICS_JSON)):
        raise ConfigError("--out", f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return TrainPlan(cfg, out, request.resume, request.progress)


def train(request: TrainRequest) -> dict[str, Any]:
    """The ``train`` command: one run through the pipeline, recorded as one MLflow run; its final metrics."""
    p = plan_training(request)
    cfg, out = p.cfg, p.out

    if cfg.perf.threads:
        torch.set_num_threads(cfg.perf.threads)
    data = load_data(cfg)
    device = resolve_device(cfg.device)
    teachers = prepare_teachers(cfg, data, device, progress=p.progress)
    teachers.announce()
    if cfg.train.workers > 1:
        state = _saved_state(out) if p.resume else None  # checked before anything is written or logged
    else:
        trainer = new_trainer(cfg, data, teachers.models, out, resume=p.resume)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / files.RUN_ID
    with tracking.command_run(cfg.mlflow, cfg.name, "train", out, id_file=id_file, resume=p.resume) as run:
        if not run.reopened:
            run.log_params(cfg.flat())
            run.log_metrics(teachers.quality_metrics(), step=0)
            atomic.write_text(id_file, run.run_id)
        print(f"run {cfg.name}: {cfg.method} on {cfg.data.dataset}, {cfg.train.epochs} epochs on {device}; "
              f"output in {out}; MLflow run {run.run_id}", flush=True)
        if cfg.train.workers > 1:
            metrics = _train_on_workers(cfg, data, teachers, out, run, state, request.address)
            student = create_model(cfg.student.arch, data.num_classes, data.in_channels, cfg.student.normalization)
            load_checkpoint(student, out / files.STUDENT)
        else:
            result = run_pipeline(trainer, data, out, run=run, progress=p.progress, on_epoch=_print_epoch)
            metrics, student = result.metrics, result.trainer.student
        if request.register:
            scores = {k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))}
            registered = register_student(run.client, run.run_id, student, data, request.register,
                                          {"run_id": run.run_id, "config": (out / files.RUN_CONFIG).read_text(),
                                           **scores})
            run.set_tags({"registered_model": registered.model_uri})
            print(f"registered: {registered.model_uri}", flush=True)
    print(_summary(metrics, out))
    print(tracking.ui_hint(cfg.mlflow.tracking_uri, cfg.mlflow.experiment))
    return metrics


def _saved_state(out: Path) -> dict[str, Any]:
    """The loop state a resumed multi-worker run hands its workers; ConfigError (exit 2) when it cannot be read."""
    try:
        return loop_state(out / files.CHECKPOINT)
    except Exception as exc:  # a torn or foreign file is bad input, not a crash
        raise ConfigError(str(out / files.CHECKPOINT), f"cannot resume from it: {str(exc).splitlines()[0]}") from None


def _train_on_workers(cfg: Config, data: DataBundle, teachers: TeacherSet, out: Path, run: RunHandle,
                      state: dict[str, Any] | None, address: str | None) -> dict[str, Any]:
    """The run as ``train.workers`` Ray Train workers (docs/scale.md, "Workers"): rank 0 writes the run's files into
    ``out`` as one process would; this process logs each validated epoch it reports, then the final metrics and
    files, to ``run``. Each worker gets ``perf.threads`` CPUs (1 when 0) and, on a GPU device, one GPU."""
    import ray


    if state is not None and state["history"]:
        log_missing_epochs(run, state["history"])
    weights = {role: (t.arch, {k: v.detach().cpu() for k, v in t.model.state_dict().items()})
               for role, t in teachers.teachers.items()}
    gpu = 1.0 if resolve_device(cfg.device).type == "cuda" else 0.0

    def on_report(report: Report) -> None:
        if report.diverged is None:
            run.log_metrics({k: v for k, v in report.metrics.items() if k != EPOCH}, step=int(report.metrics[EPOCH]))
            _print_epoch(EpochResult(int(report.metrics[EPOCH]), report.metrics))

    storage = out / ".workers"  # Ray Train's own records of the run, removed at its end
    with ray_session(address):
        job = WorkerJob(cfg, ray.put(data), ray.put(weights), None if state is None else ray.put(state), out=str(out))
        try:
            run_workers(job, cpu=float(cfg.perf.threads or 1), gpu=gpu, storage=str(storage), on_report=on_report)
        except Diverged as error:  # rank 0 wrote the trace of the steps done
            run.set_tags(error.tags())
            run.log_artifacts([out / files.TRACE_CSV])
            raise
        finally:
            shutil.rmtree(storage, ignore_errors=True)
    metrics = json.loads((out / files.METRICS_JSON).read_text())
    history = _history(out)
    log_finished_run(run, out, metrics, history[-1] if history else {})
    return metrics


def _history(out: Path) -> list[dict[str, float]]:
    """The validated epochs' metrics of the finished run, from its last checkpoint."""
    return list(loop_state(out / files.CHECKPOINT)["history"])


def _print_epoch(result: EpochResult) -> None:
    if result.validated:
        m = result.metrics
        print(f"epoch {result.epoch:4d}  val clean {m[VAL_CLEAN_ACC]:.4f}  robust {m[VAL_ROBUST_ACC]:.4f}  "
              f"w-robust {m[VAL_W_ROBUST_ACC]:.4f}  tau {m['tau_adv']:.3f}/{m['tau_nat']:.3f}  "
              f"w {m['w_adv']:.3f}/{m['w_nat']:.3f}  {m['epoch_time_s']:.1f}s", flush=True)


def _summary(metrics: dict[str, Any], out: Path) -> str:
    lines = ["final metrics:"]
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isnan(value):
            lines.append(f"  {key:28s} {value:.4f}")
    lines.append(f"files in {out}: {files.METRICS_JSON} {files.STUDENT} {files.TRACE_CSV} {files.RUN_CONFIG}")
    return "\n".join(lines)
