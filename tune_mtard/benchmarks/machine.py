"""What every benchmark shares: the machine the figures come from, and a timer of repeated windows."""

from __future__ import annotations

import os
import platform as platform_module
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from tune_mtard.config import Config
from tune_mtard.data import DataBundle
from tune_mtard.perf import PerfOptions


def machine_info(device: torch.device | None = None,
                 load_before: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Where the figures come from: CPU model, cores, torch threads, load average (and ``load_before``, the
    load average when the benchmark started), GPU."""
    cpu = platform_module.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "gpu": None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if load_before is not None:
        info["load_avg_before"] = [round(v, 2) for v in load_before]
    return info


def machine_line(m: dict[str, Any]) -> str:
    """The machine a benchmark ran on, and the load average before and after it, as every benchmark prints it."""
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, GPU {m['gpu']}, "
            f"load {m['load_avg_before']} -> {m['load_avg_1_5_15']}")


def training_setup(cfg: Config, data: DataBundle, device: torch.device, perf: PerfOptions) -> dict[str, Any]:
    """What the training benchmarks (step, epoch) time: the data, models, batch, attack and fast path."""
    return {"config": cfg.name, "dataset": data.name, "student": cfg.student.arch,
            "teachers": {"clean": cfg.teachers.clean.arch, "robust": cfg.teachers.robust.arch},
            "batch_size": cfg.data.batch_size, "attack_steps": cfg.attack.steps, "device": str(device),
            "perf": asdict(perf)}


def training_setup_line(result: dict[str, Any]) -> str:
    """A training benchmark's models, batch, attack, device and fast path, as step and epoch print them."""
    return (f"student {result['student']}, teachers {result['teachers']['clean']} / {result['teachers']['robust']}, "
            f"batch {result['batch_size']}, {result['attack_steps']}-step PGD, {result['device']}, "
            f"perf {result['perf']}")


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class StepTimer:
    """Times named callables in rounds: each round runs every callable for its own window of calls."""

    def __init__(self, device: torch.device, window_s: float, warmup: int):
        self.sync = synchronizer(device)
        self.window_s = window_s
        self.warmup = warmup
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {}

    def calibrate(self, name: str, fn: Callable[[], Any]) -> None:
        """Warm up and choose the window so one window of ``name`` lasts about ``window_s``."""
        per_call = []
        for _ in range(self.warmup):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            per_call.append(time.perf_counter() - start)
        self.calls[name] = max(3, min(100_000, round(self.window_s / max(statistics.median(per_call), 1e-7))))
        self.seconds[name] = []

    def window(self, name: str, fn: Callable[[], Any]) -> float:
        """One timed window; what ``fn`` returns is kept and stacked to the host at the end, as an epoch is."""
        n = self.calls[name]
        kept = []
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            kept.append(fn())
        rows = [r for r in kept if isinstance(r, torch.Tensor)]
        if rows:
            torch.stack(rows).cpu()
        self.sync()
        per_call = (time.perf_counter() - start) / n
        self.seconds[name].append(per_call)
        return per_call
