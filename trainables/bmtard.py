"""The Ray Tune trainable: the thin adapter between Ray Tune and the training loop.

Build the trial's config (the search's base config with the sampled dotted keys), the teachers (their
weights arrive through Ray's object store, so no worker trains or reads them from disk) and a
:class:`~tune_mtard.engine.Trainer`; continue from the trial's last checkpoint when Ray restarts it;
after every validation epoch, ``tune.report`` the metrics with a checkpoint of the whole loop state.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from tune_mtard.config import Config
from tune_mtard.data import DataBundle
from tune_mtard.engine import EpochResult, Trainer
from tune_mtard.models import create_model, save_checkpoint

STATE_FILE = "state.pt"
STUDENT_FILE = "student.pt"


def trial_config(base: Config, sampled: dict[str, Any]) -> Config:
    """The run config of one trial: the base run config with the sampled dotted keys set."""
    return base.run_config().with_values(sampled)


def _teacher(arch: str | None, weights: dict[str, torch.Tensor] | None, data: DataBundle) -> torch.nn.Module | None:
    if weights is None or arch is None:
        return None
    model = create_model(arch, data.num_classes, data.in_channels)
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)


def train_bmtard(sampled: dict[str, Any], *, base: Config, data: DataBundle,
                 teachers: dict[str, tuple[str, dict[str, torch.Tensor]]]) -> None:
    """One trial. ``teachers`` maps role to ``(arch, state dict)``; ``data`` is the whole dataset."""
    cfg = trial_config(base, sampled)
    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(cpus)
    clean = _teacher(*teachers.get("clean", (None, None)), data)
    robust = _teacher(*teachers.get("robust", (None, None)), data)
    trainer = Trainer(cfg, data, clean, robust)

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(Path(folder) / STATE_FILE)

    node_id = ray.get_runtime_context().get_node_id()

    def report(t: Trainer, result: EpochResult) -> None:
        if len(result.metrics) <= 1:  # not a validation epoch: nothing to report
            return
        with tempfile.TemporaryDirectory() as folder:
            t.save(Path(folder) / STATE_FILE)
            save_checkpoint(t.student, Path(folder) / STUDENT_FILE)
            metrics = dict(result.metrics, node_id=node_id)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    trainer.fit(report)
