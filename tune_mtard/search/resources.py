"""What a trial asks of the machine or the cluster (``search.resources``), checked before anything starts: a
trial that no node can hold would wait in Ray's queue forever (docs/search.md)."""

from __future__ import annotations

import os

from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.search.compat import largest_node


def check_resources(cfg: Config) -> None:
    """Every trial asks ``search.resources`` of one node: some node of the cluster must have that much."""
    cpu, gpu = largest_node()
    r = cfg.search.resources
    if r.cpu > cpu or r.gpu > gpu:
        raise ConfigError("search.resources", f"a trial asks for {r.cpu:g} CPU and {r.gpu:g} GPU, but the largest "
                                              f"node of the Ray cluster has {cpu:g} CPU and {gpu:g} GPU")


def check_local_resources(cfg: Config) -> None:
    import torch

    r = cfg.search.resources
    cpu, gpu = os.cpu_count() or 1, torch.cuda.device_count()
    if r.cpu > cpu or r.gpu > gpu:
        raise ConfigError("search.resources", f"a trial asks for {r.cpu:g} CPU and {r.gpu:g} GPU, but this machine "
                                              f"has {cpu} CPU and {gpu} GPU (pass --address to use a Ray cluster)")
