"""Checkpoints: state dicts saved by this project or by other repositories, loaded strictly.

Files are read with ``torch.load(..., weights_only=True)``; ``state_dict`` / ``model`` / ``net`` wrappers
and ``module.`` / ``_orig_mod.`` key prefixes from other repositories are undone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from tune_mtard.errors import ConfigError

# Other repositories save {"state_dict": ...}, {"model": ...} or {"net": ...}, sometimes one inside another.
_WRAPPER_KEYS = ("state_dict", "model", "net")
# Added by nn.DataParallel / DistributedDataParallel and by torch.compile, possibly stacked.
_KEY_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")


def _plain_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_KEY_PREFIXES.sub("", key): value for key, value in state.items()}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict saved by this project or by another repository.

    Loads with ``weights_only=True`` onto the CPU, unwraps ``state_dict`` / ``model`` / ``net``
    wrappers (up to two levels deep) and strips ``module.`` and ``_orig_mod.`` key prefixes.

    Raises:
        ConfigError: keyed by ``path``, when the file is missing or does not hold a state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such checkpoint file") from None
    except Exception as error:  # torch.load raises many types for corrupt or non-torch files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(str(path), f"not a PyTorch state dict: {reason}") from None
    for _ in range(2):  # a wrapper inside a wrapper, e.g. {"model": {"state_dict": ...}}
        if isinstance(state, Mapping):
            wrapped = next((state[key] for key in _WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
            if wrapped is not None:
                state = wrapped
    if not isinstance(state, Mapping):
        raise ConfigError(str(path), f"not a PyTorch state dict: holds a {type(state).__name__}")
    if not state:
        raise ConfigError(str(path), "not a PyTorch state dict: holds an empty dict")
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        first = not_tensors[0]
        message = f"{len(not_tensors)} of its entries are not tensors (first: {first!r})"
        raise ConfigError(str(path), f"not a PyTorch state dict: {message}")
    return _plain_state_dict(state)


def _count_keys(keys: Sequence[str], kind: str) -> str:
    return f"{len(keys)} {kind} key{'' if len(keys) == 1 else 's'} (first: {keys[0]})"


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly and return ``model``.

    Raises:
        ConfigError: keyed by ``path``, when the file is not a state dict or does not match the
            architecture (missing or unexpected keys, different shapes); the message is one line.
    """
    state = load_state_dict_file(path)
    expected = model.state_dict()
    mismatched = [
        f"{key} {list(state[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [_count_keys(mismatched, "wrongly shaped")] if mismatched else []
    if not problems:
        # strict=False so the key differences can be reported in one line; any difference still fails.
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
        if missing:
            problems.append(_count_keys(missing, "missing"))
        if unexpected:
            problems.append(_count_keys(unexpected, "unexpected"))
    if problems:
        architecture = type(model).__name__
        raise ConfigError(str(path), f"does not match the {architecture} architecture: {', '.join(problems)}")
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model``'s weights as a plain CPU state dict that :func:`load_checkpoint` reads back.

    ``torch.compile`` / ``DataParallel`` prefixes are stripped, so the file loads into an uncompiled
    model. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in _plain_state_dict(model.state_dict()).items()}
    # Write then rename, so a trial killed mid-save never leaves a truncated checkpoint behind.
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
