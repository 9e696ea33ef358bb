"""``bench gpu``: every GPU figure in one go, into one JSON file (docs/gpu.md, "One command for a GPU owner").

    python -m tune_mtard.bench gpu            # writes gpu.json

In order: the fast path's checks (:mod:`tune_mtard.benchmarks.gpu_checks`, what ``tests/test_cuda.py``
runs), then ``bench step`` and ``bench epoch`` with the config's models (default ``cifar10.yaml``: ResNet-18
student, ResNet-56 and WRN-34-10 teachers, random weights) on a synthetic CIFAR-shaped dataset, with the fast
path as ``auto`` resolves it on this card and with every option off; ``bench epoch`` also with the data on
the host and with ``torch.compile``. The JSON is rewritten after every item, so an interrupted run keeps what
it measured. Imports torch and the training core only: no pytest, Ray, MLflow or Optuna.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tune_mtard.benchmarks.epoch import bench_epoch
from tune_mtard.benchmarks.gpu_checks import CheckSetup, all_checks, cifar_shaped
from tune_mtard.benchmarks.machine import machine_info
from tune_mtard.benchmarks.step import bench_step
from tune_mtard.config import Config

ALL_OFF = {"perf.bf16": False, "perf.channels_last": False, "perf.compile": False, "perf.data_on_device": False}
STEP_VARIANTS: dict[str, dict[str, Any]] = {"auto": {}, "fp32": ALL_OFF}
EPOCH_VARIANTS: dict[str, dict[str, Any]] = {
    "auto": {}, "host_data": {"perf.data_on_device": False}, "compile": {"perf.compile": True}, "fp32": ALL_OFF,
}


def gpu_info(device: torch.device) -> dict[str, Any]:
    """The machine, with the card's name, compute capability, memory and the CUDA and cuDNN versions."""
    info = machine_info(device)
    info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one item; a failure is recorded with its traceback instead of ending the run."""
    start = time.perf_counter()
    try:
        outcome: dict[str, Any] = {"passed": True, "result": fn()}
    except Exception as exc:  # noqa: BLE001 - every failure is a finding to record, then the next item runs
        outcome = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=-8)}
    outcome["seconds"] = round(time.perf_counter() - start, 2)
    return outcome


def bench_gpu(cfg: Config, setup: CheckSetup, out: Path | None, *, train_examples: int, val_examples: int = 1000,
              image_size: int = 32, epochs: int = 2, repeats: int = 5, window_s: float = 0.5,
              checks_only: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the checks, then ``bench step`` and ``bench epoch`` in each variant; returns (and writes to ``out``)
    ``{"checks": {name: {passed, seconds, result | error}}, "all_checks_passed", "step": {variant: ...},
    "epoch": {variant: ...}, "machine": ...}``."""
    cfg = cfg.run_config().with_values({"device": str(setup.device)})
    result: dict[str, Any] = {"command": "gpu", "config": cfg.name, "machine": gpu_info(setup.device),
                              "check_setup": {k: str(v) for k, v in vars(setup).items()}, "checks": {}}

    def save() -> None:
        if out is not None:
            out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    for name, check in all_checks(setup).items():
        outcome = result["checks"][name] = _attempt(check)
        log(f"check {name:40s} {'passed' if outcome['passed'] else 'FAILED'} ({outcome['seconds']} s)"
            + ("" if outcome["passed"] else f": {outcome['error'][:400]}"))
        save()
    result["all_checks_passed"] = all(c["passed"] for c in result["checks"].values())
    save()
    if checks_only:
        return result

    data = cifar_shaped(train_examples, val_examples, image_size, cfg.seed)
    for kind, variants, run in (
        ("step", STEP_VARIANTS, lambda c: bench_step(c, None, repeats, window_s, warmup=5, data=data)),
        ("epoch", EPOCH_VARIANTS, lambda c: bench_epoch(c, data, epochs, warmup_epochs=1)),
    ):
        result[kind] = {}
        for variant, values in variants.items():
            outcome = _attempt(lambda run=run, values=values: run(cfg.with_values(values)))
            result[kind][variant] = outcome["result"] if outcome["passed"] else outcome
            log(f"bench {kind} {variant:10s} " + (_summary(kind, outcome["result"]) if outcome["passed"]
                                                   else f"FAILED: {outcome['error'][:400]}"))
            save()
    return result


def _summary(kind: str, figures: dict[str, Any]) -> str:
    if kind == "step":
        ms = figures["ms_per_call"]
        return (f"perf {figures['perf']}: B-MTARD step {ms['bmtard_step']:.2f} ms, "
                f"reference {ms['reference_step']:.2f} ms, "
                f"bmtard_over_reference {figures['bmtard_over_reference']:.3f}")
    return (f"perf {figures['perf']}: {figures['steps_per_s']:.2f} steps/s, {figures['images_per_s']:.0f} images/s, "
            f"epoch {figures['epoch_s']:.2f} s (validation {figures['validate_s']:.2f} s), loader alone "
            f"{figures['loader_s']:.3f} s")
