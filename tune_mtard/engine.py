"""The training loop: epochs of ``objective.step`` with SGD, the schedule, validation and the balance trace.

It knows nothing of Ray, MLflow or the command line: those wrap it through ``on_epoch_end``.
It is device-agnostic; on a GPU the hot loop never waits for the host: the objective's balancers and
the trace rows stay on the device and are copied back once per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from tune_mtard.attacks import PGD, Clean
from tune_mtard.config import Config
from tune_mtard.data import DataBundle, iterate_batches, num_batches
from tune_mtard.distributed import Workers, synchronise_batch_norm, training_shard
from tune_mtard.errors import Diverged
from tune_mtard.evaluation import progress_bar, robust_accuracy
from tune_mtard.methods import Objective, Teachers, build_objective, needed_teachers
from tune_mtard.metrics import (
    EPOCH,
    EPOCH_ENDS,
    EPOCH_MEANS,
    EPOCH_TIME_S,
    LR,
    TRACE_COLUMNS,
    TRACE_HEADER,
    VAL_CLEAN_ACC,
    VAL_ROBUST_ACC,
    VAL_W_ROBUST_ACC,
    w_robust_acc,
)
from tune_mtard.models import create_model
from tune_mtard.perf import PerfOptions, data_bytes, resolve_device
from tune_mtard.trace import write_trace


def lr_scale(cfg: Config, epoch: int) -> float:
    """``lr_gamma`` to the number of milestones (fractions of ``train.epochs``) passed by ``epoch`` (0-based)."""
    milestones = [round(m * cfg.train.epochs) for m in cfg.train.lr_milestones]
    return cfg.train.lr_gamma ** sum(epoch >= m for m in milestones)


class DivergenceWatch:
    """Notes, on the device, the first step of an epoch whose loss or traced balancer state is not finite.

    Each step adds a few device ops and no host sync; the trainer reads the result once, at the end of the
    epoch, when it copies the trace back anyway. A diverged run so finishes its epoch before it stops.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.traced_mask: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)

    def start_epoch(self) -> None:
        self.count.zero_()
        self.first_bad.zero_()  # 0: no bad step yet; steps count from 1

    def observe(self, loss: torch.Tensor, row: torch.Tensor, traced: tuple[str, ...]) -> None:
        if self.traced_mask is None:  # which trace columns the method fills; the others are NaN by design
            self.traced_mask = torch.zeros(len(TRACE_COLUMNS), dtype=torch.bool, device=row.device)
            for name in traced:
                self.traced_mask[TRACE_COLUMNS.index(name)] = True
        finite = torch.isfinite(loss.detach()).all() & torch.isfinite(torch.where(self.traced_mask, row, 0.0)).all()
        self.count += 1
        self.first_bad = torch.where(~finite & (self.first_bad == 0), self.count, self.first_bad)

    def first_bad_step(self) -> int | None:
        """The epoch's first non-finite step (1-based), or None; a host sync."""
        step = int(self.first_bad)
        return step or None


@dataclass
class EpochResult:
    epoch: int  # 1-based: the number of epochs done
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def validated(self) -> bool:
        """Whether the epoch ran validation (every ``eval.every`` epochs and the last): ``metrics`` holds it."""
        return VAL_W_ROBUST_ACC in self.metrics


EpochCallback = Callable[["Trainer", EpochResult], None]


class Trainer:
    """One student trained by one objective; ``state_dict`` holds everything a resume needs."""

    def __init__(self, cfg: Config, data: DataBundle, teachers: Teachers | None = None,
                 device: torch.device | None = None, workers: Workers | None = None, sync_batch_norm: bool = True):
        """``workers``: this process is one of several training the run together (tune_mtard/distributed.py),
        each on its shard of every batch; ``sync_batch_norm`` then gives BatchNorm the global batch's
        statistics (docs/scale.md, "Workers")."""
        self.cfg = cfg
        self.workers = workers if workers is not None and workers.size > 1 else None
        self.device = device or resolve_device(cfg.device)
        self.perf = PerfOptions.resolve(cfg, self.device, data_bytes(data))
        self.data = data.to(self.device) if self.perf.data_on_device else data
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.student = create_model(cfg.student.arch, data.num_classes, data.in_channels,
                                    cfg.student.normalization).to(self.device)
        if self.workers is not None:
            if sync_batch_norm:
                synchronise_batch_norm(self.student)
            self.workers.broadcast_module(self.student)
        if self.perf.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.model = self._compiled(self.student) if self.perf.compile else self.student
        # Only the teachers the method distils from; any others given are left where they are.
        teachers = {role: (teachers or {}).get(role) for role in needed_teachers(cfg.method)}
        teachers = {role: None if t is None else self._frozen_teacher(t) for role, t in teachers.items()}
        self.objective: Objective = build_objective(cfg, self.model, teachers, autocast=self._autocast).to(self.device)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
        self.epoch = 0
        self.step = 0
        self.trace = torch.empty(0, len(TRACE_HEADER), dtype=torch.float64)
        self.history: list[dict[str, float]] = []
        self._watch = DivergenceWatch(self.device)

    @staticmethod
    def _compiled(student: nn.Module) -> nn.Module:
        """``torch.compile`` with static shapes: one graph per (mode, batch size), so the student in train mode
        and in eval mode (training PGD) get two each, for full batches and the epoch's smaller last one, all
        built in the first epoch; validation runs the eager student (docs/gpu.md, "torch.compile").

        Dynamo keeps at most eight graphs per function and runs eagerly past them, without an error; graphs of
        an architecture's ``forward`` built by earlier trainers in this process (teachers trained first,
        ``compare``'s runs) count too, so a compiling trainer starts from empty in-memory caches (Inductor's
        on-disk cache still serves graphs it has seen).
        """
        torch.compiler.reset()
        return torch.compile(student, dynamic=False)

    def _frozen_teacher(self, teacher: nn.Module) -> nn.Module:
        """A teacher as the hot loop wants it: on the device, in eval mode, without grad, NHWC under
        ``channels_last``; under bf16 its convolution and linear weights are stored in bf16.

        Autocast caches its casts only of weights that require grad, so a frozen fp32 teacher had every weight
        cast to bf16 again at every forward. Stored in bf16 (norm layers stay fp32, as autocast leaves them),
        the teacher gives the same outputs without those casts. That copy is the trainer's own: the caller's
        fp32 teacher stays as it was, since another trainer (``compare``) may use it in fp32.
        """
        if self.perf.bf16:
            teacher = copy.deepcopy(teacher)
        teacher.to(self.device).eval().requires_grad_(False)
        if self.perf.bf16:
            for module in teacher.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):  # the layers autocast runs in bf16
                    module.to(torch.bfloat16)
        if self.perf.channels_last:
            teacher.to(memory_format=torch.channels_last)
        return teacher

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.perf.bf16)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.perf.channels_last else x

    # -------------------------------------------------------------------------------------- training

    def fit(self, on_epoch_end: EpochCallback | None = None, progress: bool = False) -> list[dict[str, float]]:
        """Train from ``self.epoch`` to ``train.epochs``; returns the history of epoch metrics."""
        while self.epoch < self.cfg.train.epochs:
            result = self.train_epoch(progress=progress)
            if on_epoch_end is not None:
                on_epoch_end(self, result)
        return self.history

    def train_epoch(self, progress: bool = False) -> EpochResult:
        cfg = self.cfg
        epoch = self.epoch
        scale = lr_scale(cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.train.lr * scale
        self.objective.set_lr_scale(scale)

        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = self.epoch_batches(epoch)
        if progress:
            total = num_batches(len(self.data.train), cfg.data.batch_size, drop_last=False)
            batches = progress_bar(batches, total=total, desc=f"epoch {epoch + 1}/{cfg.train.epochs}")

        start = time.perf_counter()
        self.model.train()
        self._watch.start_epoch()
        rows = []
        for x, y in batches:
            if self.workers is not None and len(x) < self.workers.size:
                continue  # a last batch smaller than the worker count: no worker may be left without rows
            rows.append(self.train_step(x, y))
        epoch_rows = torch.stack(rows).to("cpu", torch.float64)
        bad_step = self._watch.first_bad_step()  # read once per epoch, with the trace rows
        if bad_step is not None:
            epoch_rows = epoch_rows[:bad_step]  # the trace up to the step that diverged
        steps = torch.arange(self.step + 1, self.step + 1 + len(epoch_rows), dtype=torch.float64)
        epoch_col = torch.full_like(steps, epoch + 1)
        self.trace = torch.cat([self.trace, torch.cat([steps[:, None], epoch_col[:, None], epoch_rows], 1)])
        self.step += len(epoch_rows)
        if bad_step is not None:
            raise Diverged(self.step, epoch + 1)
        self.epoch += 1
        epoch_time = time.perf_counter() - start

        metrics: dict[str, float] = {EPOCH: self.epoch}
        if self.validates(self.epoch):
            if self.workers is None or self.workers.is_first:  # the others train on; validation moves no RNG
                metrics.update(self.validate())
            means = epoch_rows.nanmean(0)
            for name in EPOCH_MEANS:
                metrics[name] = float(means[TRACE_COLUMNS.index(name)])
            for name in EPOCH_ENDS:
                metrics[name] = float(epoch_rows[-1, TRACE_COLUMNS.index(name)])
            metrics[LR] = cfg.train.lr * scale
            metrics[EPOCH_TIME_S] = epoch_time
            self.history.append(metrics)
        return EpochResult(self.epoch, metrics)

    def validates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) ends with validation (on rank 0 alone among workers): every
        ``eval.every`` epochs and the last."""
        return epoch % self.cfg.eval.every == 0 or epoch == self.cfg.train.epochs

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of ``epoch`` (0-based), on the device.

        Order and augmentation are a pure function of (seed, epoch), so a resumed run sees the same batches.
        """
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return iterate_batches(self.data.train, self.cfg.data.batch_size, shuffle=True, generator=generator,
                               crop_padding=self.data.crop_padding, hflip=self.data.hflip, drop_last=False,
                               device=self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns its trace row, still on the device."""
        shard = None if self.workers is None else self.workers.shard(len(x))
        if shard is not None:
            x, y = x[shard.start:shard.stop], y[shard.start:shard.stop]
        x, y = self._to_input(x), y.to(self.device, non_blocking=True)
        with training_shard(self.workers, shard):
            loss, row = self.objective.step(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        watched = loss.detach()
        if shard is not None:
            self.workers.average_gradients(self.student.parameters(), shard)
            # The loss travels with the row: every worker judges divergence on the same numbers, so all stop
            # at the same step (one worker stopping alone would leave the others waiting in an all-reduce).
            reduced = self.workers.mean_row(shard, torch.cat([row, watched.reshape(1).to(row.dtype)]))
            row, watched = reduced[:-1], reduced[-1]
        self.optimizer.step()
        self._watch.observe(watched, row, self.objective.traced)
        return row

    # ------------------------------------------------------------------------------------ validation

    def validate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the first ``eval.n_examples`` validation examples."""
        e = self.cfg.eval
        val = self.data.val.head(e.n_examples)
        x, y = val.floats().to(self.device), val.labels.to(self.device)
        # The eager student: compiled graphs for evaluation's batch sizes and grad modes would only add to the
        # compile time and the cache (docs/gpu.md, "torch.compile").
        attack = PGD(self.student, self.cfg.attack.epsilon, e.pgd_step_size, e.pgd_steps, random_start=True)
        # Validation draws its random starts from its own stream so it never shifts training's RNG.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 7919 * self.epoch)
            clean = robust_accuracy(self.student, Clean(self.student), x, y, batch_size=e.batch_size)
            robust = robust_accuracy(self.student, attack, x, y, batch_size=e.batch_size)
        return {VAL_CLEAN_ACC: clean, VAL_ROBUST_ACC: robust,
                VAL_W_ROBUST_ACC: w_robust_acc(clean, robust, e.clean_weight)}

    # ---------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "trace": self.trace.clone(),
            "history": list(self.history),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(),
                "python": random.getstate(),
            },
        }
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.objective.to(self.device)
        self.trace = state["trace"].clone()
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        _set_numpy_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------------------------------ files

    def write_trace(self, path: str | Path) -> None:
        write_trace(self.trace, path)


def _numpy_state() -> dict[str, Any]:
    # As tensors and plain numbers so the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))
