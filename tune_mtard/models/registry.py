"""The architecture registry: every model is built by name through :func:`create_model`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from tune_mtard.models.normalization import add_normalization
from tune_mtard.registry import Registry

ModelFactory = Callable[[int, int], nn.Module]


class InputNormalization(Protocol):
    """The mean and std a model normalises its input with (the config's ``normalization``); empty: none."""

    mean: Sequence[float]
    std: Sequence[float]

MODELS: Registry[ModelFactory] = Registry("model")


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register ``fn(num_classes, in_channels) -> nn.Module`` under its function name."""
    return MODELS.add(fn.__name__, fn)


def available_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int, in_channels: int = 3,
                 normalization: InputNormalization | None = None) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        name: registry name, one of :func:`available_models`.
        num_classes: number of output logits.
        in_channels: channels of the input images (3 for colour, 1 for digits).
        normalization: mean and std (one value per channel) the model applies to its [0, 1] input first;
            None or empty: none (docs/configuration.md, "Checkpoints from other repositories").

    Raises:
        KeyError: ``name`` is not registered; the message lists the registered names.
    """
    model = MODELS.get(name)(num_classes, in_channels)
    if normalization is not None and len(normalization.mean):
        add_normalization(model, normalization.mean, normalization.std)
    return model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """The 3x3, padding-1, bias-free convolution every architecture here is built from."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
