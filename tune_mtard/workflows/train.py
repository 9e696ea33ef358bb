"""One full training run from a config: what the ``train`` command does (docs/cli.md, "train").

Writes ``DIR/metrics.json``, ``DIR/student.pt``, ``DIR/balance_trace.csv`` (+ ``.png``), ``DIR/config.yaml``
(the resolved config) and ``DIR/checkpoint.pt`` (the full loop state, every epoch), and logs one MLflow
run, reopened by ``resume``. A search space file works too: its ``search`` and ``space`` sections are
ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tune_mtard import atomic, files, tracking
from tune_mtard.config import Config, load_config
from tune_mtard.config.rules import check_model_name
from tune_mtard.data import load_data
from tune_mtard.engine import EpochResult
from tune_mtard.errors import ConfigError
from tune_mtard.metrics import VAL_CLEAN_ACC, VAL_ROBUST_ACC, VAL_W_ROBUST_ACC
from tune_mtard.model_registry import register_student
from tune_mtard.perf import resolve_device
from tune_mtard.pipeline import new_trainer, run_pipeline
from tune_mtard.services import check_tracking_uri, unwritable_folder
from tune_mtard.teachers import prepare_teachers

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
        result = run_pipeline(trainer, data, out, run=run, progress=p.progress, on_epoch=_print_epoch)
        if request.register:
            scores = {k: v for k, v in result.metrics.items() if k.startswith(("val_", "test_"))}
            registered = register_student(run.client, run.run_id, result.trainer.student, data, request.register,
                                          {"run_id": run.run_id, "config": (out / files.RUN_CONFIG).read_text(),
                                           **scores})
            run.set_tags({"registered_model": registered.model_uri})
            print(f"registered: {registered.model_uri}", flush=True)
    print(_summary(result.metrics, out))
    print(tracking.ui_hint(cfg.mlflow.tracking_uri, cfg.mlflow.experiment))
    return result.metrics


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
