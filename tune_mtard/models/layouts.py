"""The key layouts of other repositories' checkpoints, mapped onto ours or refused (docs/configuration.md,
"Checkpoints from other repositories").

A layout is mapped only where the computation is known to be the same; where keys tell that a file was
made for a model that computes differently (a PreAct-ResNet with or without a final BN, a ResNet with
parameter-free shortcuts, a torchvision-style ResNet-18), :func:`refusal` says so in one line. Files
whose keys cannot tell (Wong et al.'s PreAct block against Rice et al.'s) need the right ``arch``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from tune_mtard.models.normalization import MEAN_KEY, STD_KEY
from tune_mtard.models.preact_resnet import PreActResNet
from tune_mtard.models.resnet import CifarResNet

# Added by nn.DataParallel / DistributedDataParallel and by torch.compile, possibly stacked.
_PER_KEY_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")
# RobustBench's normalize_model: nn.Sequential(normalize=ImageNormalizer(mean, std), model=<the network>).
_NORMALIZER_KEYS = {"normalize.mean": MEAN_KEY, "normalize.std": STD_KEY}
_WRAPPING_MODULE = "model."
# The MTARD ResNet-56 (a torchvision-style CIFAR ResNet): projection shortcut `downsample`, classifier `fc`.
_TORCHVISION_STYLE = ((re.compile(r"^(layer\d+\.\d+\.)downsample\."), r"\1shortcut."),
                      (re.compile(r"^fc\."), "linear."))
_RESNET56_STEM_WIDTH = 16


def plain_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without ``module.`` / ``_orig_mod.`` key prefixes (what ``save_checkpoint`` writes)."""
    return {_PER_KEY_PREFIXES.sub("", key): value for key, value in state.items()}


def strip_prefixes(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` without ``module.`` / ``_orig_mod.`` key prefixes and RobustBench's ``normalize`` / ``model.``
    wrapping (its ``normalize.mean`` / ``normalize.std`` become ``mu`` / ``sigma``), and what was done."""
    done = []
    stripped = plain_keys(state)
    if stripped.keys() != state.keys():
        done.append("stripped the module. / _orig_mod. key prefixes")
    normalizer = {key: value for key, value in stripped.items() if key in _NORMALIZER_KEYS}
    rest = {key: value for key, value in stripped.items() if key not in _NORMALIZER_KEYS}
    network = [key for key in rest if key not in (MEAN_KEY, STD_KEY)]  # a wrapper may hold mu / sigma itself
    if network and all(key.startswith(_WRAPPING_MODULE) for key in network):
        rest = {key.removeprefix(_WRAPPING_MODULE): value for key, value in rest.items()}
        done.append("stripped the model. key prefix")
        if normalizer:
            rest.update({_NORMALIZER_KEYS[key]: value for key, value in normalizer.items()})
            done.append("read RobustBench's normalize.mean / normalize.std as the input normalisation")
            normalizer = {}
    rest.update(normalizer)
    return rest, done


def _is_resnet56(model: nn.Module) -> bool:
    return isinstance(model, CifarResNet) and model.num_stages == 3 and model.conv1.out_channels == _RESNET56_STEM_WIDTH


def _torchvision_style(keys: set[str]) -> bool:
    return "fc.weight" in keys and "linear.weight" not in keys


def map_layout(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` with the keys of a known foreign layout of ``model``'s architecture renamed, and what was done."""
    if _is_resnet56(model) and _torchvision_style(set(state)):
        renamed = {}
        for key, value in state.items():
            for pattern, replacement in _TORCHVISION_STYLE:
                key = pattern.sub(replacement, key)
            renamed[key] = value
        return renamed, ["MTARD ResNet-56 keys: layerN.k.downsample.{0,1} -> layerN.k.shortcut.{0,1}, fc -> linear"]
    return state, []


def _has(keys: set[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def refusal(model: nn.Module, state: Mapping[str, Tensor], arch: str) -> str | None:
    """Why ``state`` was made for a model that computes differently from ``model`` (registry name ``arch``), as
    far as its keys tell; None when they do not tell."""
    keys, expected = set(state), set(model.state_dict())
    if isinstance(model, PreActResNet) and _has(keys, "layer1.") and "linear.weight" in keys:
        if model.bn is not None and not _has(keys, "bn."):
            return (f"has no final BN (bn.*): kuangliu/pytorch-cifar's PreActResNet-18, not {arch}; "
                    "load it as arch preact_resnet18_kuangliu")
        if model.bn is None and _has(keys, "bn."):
            return (f"has a final BN (bn.*), which {arch} (kuangliu/pytorch-cifar) lacks; load it as arch "
                    "preact_resnet18 (Rice et al., RobustBench) or preact_resnet18_wong (Wong et al.)")
    if isinstance(model, CifarResNet):
        if _torchvision_style(keys) and not _is_resnet56(model):
            return (f"has torchvision-style keys (downsample, fc); of those only the MTARD ResNet-56 is mapped, "
                    f"and a torchvision ResNet computes differently from {arch}")
        wants_projection = _has(expected, "layer2.0.shortcut.")
        if wants_projection and _has(keys, "layer2.0.conv1.") and not _has(keys, "layer2.0.shortcut.") \
                and not _has(keys, "layer2.0.downsample."):
            return (f"has no projection-shortcut weights: a ResNet with parameter-free (option A) shortcuts, "
                    f"which computes differently from {arch} (1x1 conv + BN projections)")
    return None
