"""What a trial asks of the machine or the cluster (``search.resources``), checked before anything starts: a
trial that no node can hold would wait in Ray's queue forever (docs/search.md)."""

from __future__ import annotations

import os

from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.search.compat import largest_node
from tune_mtard.search.workers import DRIVER_CPU as WORKERS_DRIVER_CPU


def check_resources(cfg: Config) -> None:
    """Every trial asks ``search.resources`` of one node: some node of the cluster must have that much."""
    cpu, gpu = largest_node()
    r = cfg.search.resources
    if r.cpu > cpu or r.gpu > gpu:
        raise ConfigError("search.resources", f"a trial asks for {r.cpu:g} CPU and {r.gpu:g} GPU, but the largest "
                                              f"node of the Ray cluster has {cpu:g} CPU and {gpu:g} GPU")
    if cfg.train.workers > 1:  # workers may span nodes: the cluster as a whole must hold one trial
        import ray

        total = ray.cluster_resources()
        check_workers_fit(cfg, float(total.get("CPU", 0)), float(total.get("GPU", 0)), "the Ray cluster")


def trial_resources(cfg: Config) -> dict[str, float]:
    """What Ray Tune reserves for a trial: ``search.resources``; with ``train.workers`` > 1 next to nothing, as
    the trial only waits for its Ray Train workers, which reserve ``search.resources`` each (docs/scale.md)."""
    r = cfg.search.resources
    return {"cpu": r.cpu, "gpu": r.gpu} if cfg.train.workers == 1 else {"cpu": WORKERS_DRIVER_CPU}


def check_workers_fit(cfg: Config, cpu: float, gpu: float, where: str) -> None:
    """A trial's ``train.workers`` workers of ``search.resources`` each, and the trial itself, fit in ``where``."""
    n, r = cfg.train.workers, cfg.search.resources
    need_cpu = n * r.cpu + WORKERS_DRIVER_CPU
    if n > 1 and (need_cpu > cpu + 1e-9 or n * r.gpu > gpu + 1e-9):
        raise ConfigError("train.workers", f"{n} workers of {r.cpu:g} CPU and {r.gpu:g} GPU each (search.resources) "
                                           f"and the trial's {WORKERS_DRIVER_CPU:g} CPU need {need_cpu:g} CPU and "
                                           f"{n * r.gpu:g} GPU, but {where} has {cpu:g} CPU and {gpu:g} GPU")


def check_local_resources(cfg: Config) -> None:
    import torch

    r = cfg.search.resources
    cpu, gpu = os.cpu_count() or 1, torch.cuda.device_count()
    if r.cpu > cpu or r.gpu > gpu:
        raise ConfigError("search.resources", f"a trial asks for {r.cpu:g} CPU and {r.gpu:g} GPU, but this machine "
                                              f"has {cpu} CPU and {gpu} GPU (pass --address to use a Ray cluster)")
    check_workers_fit(cfg, cpu, gpu, "this machine")
