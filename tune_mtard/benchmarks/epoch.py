"""``bench epoch``: whole training epochs as a run calls them (``Trainer.train_epoch``: the loader, every step,
the end-of-epoch copy of the trace, validation), in steps/s and images/s (docs/gpu.md).

``bench step`` times ``train_step`` on one fixed batch already on the device, so it cannot see the loader;
this times epochs, and beside each one the loader alone on the same epoch's batches, so the loader's share
of an epoch shows. The first ``warmup_epochs`` are run untimed (``torch.compile``, cuDNN and allocator
warm-up). Teachers have random weights: their cost does not depend on them. Imports torch and the training
core only.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from tune_mtard.benchmarks.machine import machine_info, machine_line, synchronizer, training_setup, training_setup_line
from tune_mtard.benchmarks.step import random_teachers
from tune_mtard.config import Config
from tune_mtard.data import DataBundle, num_batches
from tune_mtard.engine import Trainer
from tune_mtard.metrics import EPOCH_TIME_S
from tune_mtard.perf import resolve_device


def bench_epoch(cfg: Config, data: DataBundle, epochs: int, warmup_epochs: int) -> dict[str, Any]:
    """Time ``epochs`` epochs after ``warmup_epochs`` untimed ones; every epoch validates (``eval.every: 1``)."""
    cfg = cfg.run_config().with_values({"train.epochs": warmup_epochs + epochs, "eval.every": 1,
                                        "train.lr_milestones": []})
    device = resolve_device(cfg.device)
    trainer = Trainer(cfg, data, random_teachers(cfg, data), device)
    sync = synchronizer(device)
    load_before = os.getloadavg()
    for _ in range(warmup_epochs):
        trainer.train_epoch()

    timed: dict[str, list[float]] = {"epoch_s": [], "train_s": [], "validate_s": [], "loader_s": []}
    for _ in range(epochs):
        sync()
        start = time.perf_counter()
        for _batch in trainer.epoch_batches(trainer.epoch):
            pass
        sync()
        timed["loader_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        result = trainer.train_epoch()
        sync()
        epoch_s = time.perf_counter() - start
        timed["epoch_s"].append(epoch_s)
        timed["train_s"].append(result.metrics[EPOCH_TIME_S])
        timed["validate_s"].append(epoch_s - result.metrics[EPOCH_TIME_S])

    median = {name: statistics.median(values) for name, values in timed.items()}
    steps = num_batches(len(data.train), cfg.data.batch_size, drop_last=False)
    images = len(data.train)
    return {
        "command": "epoch",
        **training_setup(cfg, data, device, trainer.perf), "method": cfg.method,
        "train_examples": images, "steps_per_epoch": steps,
        "val_examples": min(cfg.eval.n_examples, len(data.val)), "val_pgd_steps": cfg.eval.pgd_steps,
        "epochs": epochs, "warmup_epochs": warmup_epochs,
        **{f"{name}_all": [round(v, 4) for v in values] for name, values in timed.items()},
        **median,
        "steps_per_s": steps / median["train_s"],
        "images_per_s": images / median["train_s"],
        "images_per_s_with_validation": images / median["epoch_s"],
        "ms_per_step": 1000 * median["train_s"] / steps,
        "loader_share": median["loader_s"] / median["train_s"],
        "machine": machine_info(device, load_before),
    }


def print_epoch(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"epoch benchmark: {result['dataset']}, {result['method']}, {training_setup_line(result)}")
    print(machine_line(m))
    print(f"{result['train_examples']} training images in {result['steps_per_epoch']} steps, validation on "
          f"{result['val_examples']} images (clean + PGD-{result['val_pgd_steps']}); median of {result['epochs']} "
          f"epochs after {result['warmup_epochs']} untimed")
    print(f"  epoch (train + validation)   {result['epoch_s']:9.3f} s")
    print(f"  train loop (loader + steps)  {result['train_s']:9.3f} s   {result['steps_per_s']:9.2f} steps/s   "
          f"{result['images_per_s']:9.1f} images/s   {result['ms_per_step']:8.2f} ms/step")
    print(f"  validation                   {result['validate_s']:9.3f} s")
    print(f"  loader alone                 {result['loader_s']:9.3f} s   ({100 * result['loader_share']:.1f}% of the "
          f"train loop)")
    print(f"  images/s with validation     {result['images_per_s_with_validation']:9.1f}")
