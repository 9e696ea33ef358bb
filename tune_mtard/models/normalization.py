"""Input normalisation inside a model, so its inputs stay in [0, 1] and attacks work in pixel space.

A model trained on ``(x - mean) / std`` (Rice et al., Wong et al., RobustBench entries that normalise)
gets the buffers ``mu`` and ``sigma`` (shape ``1 x C x 1 x 1``, RobustBench's names) and a forward
pre-hook that normalises its input. The buffers are part of the state dict, so a student saved with
normalisation loads back with it, and a file that carries them says how its model normalises
(docs/configuration.md, "Checkpoints from other repositories").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

MEAN_KEY, STD_KEY = "mu", "sigma"


def _normalize_input(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    x, *rest = args
    return ((x - module.mu) / module.sigma, *rest)


def has_normalization(model: nn.Module) -> bool:
    return MEAN_KEY in model._buffers and STD_KEY in model._buffers


def normalization_of(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """The ``(mean, std)`` ``model`` normalises its input with, or None."""
    if not has_normalization(model):
        return None
    return model.mu.flatten().tolist(), model.sigma.flatten().tolist()


def add_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``model`` compute ``model((x - mean) / std)`` on its input ``x``; returns ``model``.

    ``mean`` and ``std`` have one value per input channel. A model that already normalises gets the new values.
    """
    mu = torch.as_tensor([float(v) for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
    sigma = torch.as_tensor([float(v) for v in std], dtype=torch.float32).view(1, -1, 1, 1)
    if mu.shape != sigma.shape or mu.numel() == 0:
        raise ValueError(f"mean and std need the same number (>= 1) of values, got {list(mean)} and {list(std)}")
    if has_normalization(model):
        model.mu, model.sigma = mu, sigma
        return model
    model.register_buffer(MEAN_KEY, mu)
    model.register_buffer(STD_KEY, sigma)
    model.register_forward_pre_hook(_normalize_input)
    return model
