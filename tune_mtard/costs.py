"""What one training step, one validation and one checkpoint of a run cost on a device, measured in seconds
(docs/search.md, "Planning a search").

A search's plan multiplies these by the epochs its scheduler will run. Each figure is timed on the real
models, batch, attack and validation of the config: the student's step with both teachers (random weights:
their cost does not depend on them), the validation on a slice of ``eval.n_examples`` (scaled up linearly:
every validation batch costs the same), the checkpoint a trial writes each epoch, and one step of each teacher
recipe that would be trained. Every timing runs for about ``window_s`` after ``warmup`` untimed calls, so a
CIFAR-sized model is timed in seconds, not in epochs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tune_mtard import files
from tune_mtard.config import Config
from tune_mtard.data import DataBundle, iterate_batches, num_batches
from tune_mtard.engine import Trainer
from tune_mtard.models import create_model, save_checkpoint

VALIDATION_SLICE = 64  # examples validated to time one validation (at least one eval batch of digits or CIFAR)


@dataclass
class TrainingCosts:
    """Seconds per unit of work on the device they were measured on."""

    device: str
    step_s: float  # one optimiser step of the student's method (attack, teachers, backward)
    steps_per_epoch: int
    validation_s: float  # one validation: clean and PGD accuracy on eval.n_examples
    checkpoint_s: float  # the loop state and the student's weights, written and copied once per reported epoch
    teacher_epoch_s: dict[str, float] = field(default_factory=dict)  # role -> one epoch of its recipe

    @property
    def train_epoch_s(self) -> float:
        return self.step_s * self.steps_per_epoch

    def scaled(self, speedup: float, device: str) -> "TrainingCosts":
        """The same work on a device ``speedup`` times faster at the step (validation and teachers scale alike;
        a checkpoint is written by the host)."""
        return TrainingCosts(device, self.step_s / speedup, self.steps_per_epoch, self.validation_s / speedup,
                             self.checkpoint_s, {role: s / speedup for role, s in self.teacher_epoch_s.items()})


def timed_per_call(fn: Callable[[], object], window_s: float, warmup: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``fn`` over one window of at least ``window_s`` and two calls."""
    for _ in range(warmup):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= window_s and calls >= 2:
            return elapsed / calls


def _random_teachers(cfg: Config, data: DataBundle) -> dict[str, nn.Module]:
    torch.manual_seed(cfg.seed)
    return {role: create_model(getattr(cfg.teachers, role).arch, data.num_classes, data.in_channels)
            .eval().requires_grad_(False) for role in ("clean", "robust")}


def measure_training(cfg: Config, data: DataBundle, device: torch.device, teacher_recipes: dict[str, Config],
                     threads: int, window_s: float = 1.0, warmup: int = 2) -> TrainingCosts:
    """Time ``cfg``'s step, validation and checkpoint on ``device`` with ``threads`` torch threads (a trial's),
    and one step of each of ``teacher_recipes`` (role -> the run config that would train it)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(cfg.run_config().with_values({"device": str(device)}), data, device, teacher_recipes,
                        window_s, warmup)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(cfg: Config, data: DataBundle, device: torch.device, teacher_recipes: dict[str, Config],
             window_s: float, warmup: int) -> TrainingCosts:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    trainer = Trainer(cfg, data, _random_teachers(cfg, data), device)
    step_s = _step_seconds(trainer, data, cfg.data.batch_size, window_s, warmup, sync)

    n_val = min(cfg.eval.n_examples, len(data.val))
    sliced = min(n_val, VALIDATION_SLICE)
    timing = Trainer(cfg.with_values({"eval.n_examples": sliced}), data, _random_teachers(cfg, data), device)
    validation_s = timed_per_call(timing.validate, window_s, 1, sync) * n_val / sliced

    with tempfile.TemporaryDirectory() as folder:
        def checkpoint() -> None:
            """As a trial's report: written to a folder of its own, then copied into the search's folder."""
            written, kept = Path(folder) / "written", Path(folder) / "kept"
            shutil.rmtree(kept, ignore_errors=True)
            written.mkdir(exist_ok=True)
            trainer.save(written / files.TRIAL_STATE)
            save_checkpoint(trainer.student, written / files.STUDENT)
            shutil.copytree(written, kept)
        checkpoint_s = timed_per_call(checkpoint, window_s / 2, 1, sync)

    teacher_epoch_s = {}
    for role, recipe in teacher_recipes.items():
        recipe = recipe.with_values({"device": str(device)})
        teacher_trainer = Trainer(recipe, data, device=device)
        per_step = _step_seconds(teacher_trainer, data, recipe.data.batch_size, window_s, warmup, sync)
        teacher_epoch_s[role] = per_step * num_batches(len(data.train), recipe.data.batch_size, drop_last=False)
    steps = num_batches(len(data.train), cfg.data.batch_size, drop_last=False)
    return TrainingCosts(str(device), step_s, steps, validation_s, checkpoint_s, teacher_epoch_s)


def _step_seconds(trainer: Trainer, data: DataBundle, batch_size: int, window_s: float, warmup: int,
                  sync: Callable[[], None]) -> float:
    """Seconds per training step on a full batch of the training split, rows kept as an epoch keeps them."""
    x, y = next(iterate_batches(data.train, min(batch_size, len(data.train)), shuffle=False, device=trainer.device))
    trainer.model.train()
    return timed_per_call(lambda: trainer.train_step(x, y), window_s, warmup, sync)


def validations(epochs: int, every: int, total: int) -> int:
    """How many validations a trial that runs ``epochs`` of ``total`` makes (every ``every`` and at the end)."""
    return epochs // every + (1 if epochs == total and total % every else 0)
