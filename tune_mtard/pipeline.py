"""The one run pipeline: a config to a finished run (fit, final metrics, files, MLflow).

``train``, ``compare`` and the teachers' training all run through :func:`run_pipeline`, so every run
writes the same files (docs/cli.md, "train") and, when it has an MLflow run, logs the same records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_mtard import atomic, files
from tune_mtard.config import Config, to_yaml
from tune_mtard.data import DataBundle
from tune_mtard.engine import EpochResult, Trainer
from tune_mtard.errors import ConfigError, Diverged
from tune_mtard.evaluation import final_test_metrics
from tune_mtard.methods import Teachers
from tune_mtard.metrics import EPOCH, VAL_W_ROBUST_ACC, VALIDATION
from tune_mtard.models import save_checkpoint
from tune_mtard.perf import resolve_device
from tune_mtard.plots import plot_trace
from tune_mtard.tracking import RunHandle

EpochHook = Callable[[EpochResult], None]


@dataclass
class RunResult:
    """A finished run: its final metrics (what ``metrics.json`` holds), its trainer and its folder."""

    metrics: dict[str, Any]
    trainer: Trainer
    out: Path


def new_trainer(cfg: Config, data: DataBundle, teachers: Teachers, out: Path, resume: bool = False) -> Trainer:
    """The run's :class:`Trainer`; with ``resume``, continued from ``out/checkpoint.pt`` (ConfigError, exit 2,
    when that file cannot be loaded: checked before anything is written or logged)."""
    trainer = Trainer(cfg, data, teachers, device=resolve_device(cfg.device))
    if resume:
        try:
            trainer.load(out / files.CHECKPOINT)
        except Exception as exc:  # a torn or foreign file is bad input, not a crash
            raise ConfigError(str(out / files.CHECKPOINT), f"cannot resume from it: {str(exc).splitlines()[0]}") \
                from None
    return trainer


def run_pipeline(trainer: Trainer, data: DataBundle, out: Path, *, run: RunHandle | None = None,
                 test_eval: bool = True, progress: bool = False, on_epoch: EpochHook | None = None) -> RunResult:
    """Train ``trainer`` from where it is to its last epoch and write the run's files into ``out``.

    Every epoch the whole loop state goes to ``out/checkpoint.pt`` (:func:`new_trainer` with ``resume``
    continues from it); every validated epoch's metrics go to ``run`` (``step`` = epoch), the epochs a
    killed run checkpointed but never logged included. At the end: the final validation metrics and, with
    ``test_eval``, the test metrics of ``eval.final_attacks`` go to ``metrics.json`` and ``run``, with
    ``balance_trace.csv`` and its plot, ``config.yaml`` and ``student.pt``. A run that fails still writes
    the trace of the steps it did.
    """
    cfg = trainer.cfg
    if run is not None and trainer.history:
        log_missing_epochs(run, trainer.history)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / files.RUN_CONFIG, to_yaml(cfg))

    def on_epoch_end(t: Trainer, result: EpochResult) -> None:
        t.save(out / files.CHECKPOINT)
        if result.validated and run is not None:
            run.log_metrics({k: v for k, v in result.metrics.items() if k != EPOCH}, step=result.epoch)
        if on_epoch is not None:
            on_epoch(result)

    start = time.perf_counter()
    try:
        trainer.fit(on_epoch_end, progress=progress)
        trainer.student.eval()
        last = trainer.history[-1] if trainer.history else {}
        metrics: dict[str, Any] = {k: last[k] for k in VALIDATION if k in last}
        if test_eval:
            metrics.update(final_test_metrics(cfg, trainer.student, data, trainer.device, progress=progress))
        metrics.update(epochs=trainer.epoch, steps=trainer.step, train_time_s=round(time.perf_counter() - start, 2))
    except BaseException as error:
        trainer.write_trace(out / files.TRACE_CSV)  # the steps done so far are never lost
        if run is not None and isinstance(error, Diverged):
            run.set_tags(error.tags())
            run.log_artifacts([out / files.TRACE_CSV])
        raise
    trainer.write_trace(out / files.TRACE_CSV)
    save_checkpoint(trainer.student, out / files.STUDENT)
    atomic.write_text(out / files.METRICS_JSON, json.dumps(metrics, indent=2))

    plot_trace(out / files.TRACE_CSV, out / files.TRACE_PNG, title=f"{cfg.name}: {cfg.method} balance trace")
    if run is not None:
        log_finished_run(run, out, metrics, last)
    return RunResult(metrics, trainer, out)


def log_finished_run(run: RunHandle, out: Path, metrics: dict[str, Any], last: dict[str, float]) -> None:
    """A finished run's final metrics (``metrics.json``'s, at its last epoch) and files to ``run``; ``last`` is the
    last epoch's metrics, whose val_* values were logged with it already."""
    run.log_metrics({k: v for k, v in metrics.items() if k not in last}, step=int(metrics["epochs"]))
    run.log_artifacts([out / name for name in (files.TRACE_CSV, files.TRACE_PNG, files.RUN_CONFIG, files.METRICS_JSON)])
    run.log_artifacts([out / files.STUDENT], "model")


def log_missing_epochs(run: RunHandle, history: list[dict[str, float]]) -> None:
    """Log the epochs a killed run checkpointed but never logged (it died between the two), so none is lost."""
    logged = run.logged_steps(VAL_W_ROBUST_ACC)
    for metrics in history:
        if int(metrics[EPOCH]) not in logged:
            run.log_metrics({k: v for k, v in metrics.items() if k != EPOCH}, step=int(metrics[EPOCH]))
