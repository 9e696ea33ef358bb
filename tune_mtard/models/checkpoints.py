"""Checkpoints: state dicts saved by this project or by other repositories, loaded exactly or refused.

Files are read with ``torch.load(..., weights_only=True)``; wrapper dicts, ``module.`` / ``_orig_mod.`` /
``model.`` key prefixes and the known foreign key layouts are undone (:mod:`tune_mtard.models.layouts`),
input normalisation buffers are read as such (:mod:`tune_mtard.models.normalization`), and then the keys
must match the model exactly. What was mapped is reported, so a foreign file's loading can be checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from tune_mtard.errors import ConfigError
from tune_mtard.models.layouts import map_layout, plain_keys, refusal, strip_prefixes
from tune_mtard.models.normalization import MEAN_KEY, STD_KEY, add_normalization, normalization_of

# Other repositories save {"state_dict": ...}, {"model": ...}, {"net": ...}, sometimes one inside another.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Normalisation values that agree to this are the same (files store float32, configs write 4 decimals).
_NORMALIZATION_TOLERANCE = 1e-4
AS_SAVED = "keys as saved"


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], list[str]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such checkpoint file") from None
    except Exception as error:  # torch.load raises many types for corrupt or non-torch files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(str(path), f"not a PyTorch state dict: {reason}") from None
    done = []
    for _ in range(2):  # a wrapper inside a wrapper, e.g. {"model": {"state_dict": ...}}
        if isinstance(state, Mapping):
            key = next((key for key in _WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
            if key is not None:
                state = state[key]
                done.append(f"unwrapped {key!r}")
    if not isinstance(state, Mapping):
        raise ConfigError(str(path), f"not a PyTorch state dict: holds a {type(state).__name__}")
    if not state:
        raise ConfigError(str(path), "not a PyTorch state dict: holds an empty dict")
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        first = not_tensors[0]
        message = f"{len(not_tensors)} of its entries are not tensors (first: {first!r})"
        raise ConfigError(str(path), f"not a PyTorch state dict: {message}")
    state, stripped = strip_prefixes(state)
    return state, done + stripped


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict saved by this project or by another repository, wrappers and prefixes undone.

    Raises:
        ConfigError: keyed by ``path``, when the file is missing or does not hold a state dict.
    """
    return _read(path)[0]


def _count_keys(keys: Sequence[str], kind: str) -> str:
    return f"{len(keys)} {kind} key{'' if len(keys) == 1 else 's'} (first: {keys[0]})"


def _values(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _take_normalization(model: nn.Module, state: dict[str, Tensor], path: str) -> str | None:
    """Reconcile the file's ``mu`` / ``sigma`` with the model's declared normalisation; what was done, or None."""
    in_file = MEAN_KEY in state or STD_KEY in state
    declared = normalization_of(model)
    if not in_file:
        if declared is None:
            return None
        state[MEAN_KEY], state[STD_KEY] = model.mu.detach().clone(), model.sigma.detach().clone()
        return f"normalisation from the config: mean {_values(declared[0])}, std {_values(declared[1])}"
    if MEAN_KEY not in state or STD_KEY not in state:
        raise ConfigError(path, f"has one of the normalisation buffers {MEAN_KEY} / {STD_KEY} but not the other")
    mean, std = state[MEAN_KEY].flatten().tolist(), state[STD_KEY].flatten().tolist()
    channels = next((p.shape[1] for p in model.parameters() if p.dim() == 4), len(mean))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(path, f"its normalisation ({MEAN_KEY} {_values(mean)}, {STD_KEY} {_values(std)}) does not "
                                f"fit a model with {channels} input channels")
    if declared is not None:
        pairs = zip(mean + std, declared[0] + declared[1], strict=False)
        if not all(abs(a - b) <= _NORMALIZATION_TOLERANCE for a, b in pairs):
            raise ConfigError(path, f"normalises its input with mean {_values(mean)}, std {_values(std)} "
                                    f"({MEAN_KEY} / {STD_KEY}), but the config declares mean {_values(declared[0])}, "
                                    f"std {_values(declared[1])}: fix or drop its normalization")
    add_normalization(model, mean, std)
    state[MEAN_KEY], state[STD_KEY] = model.mu.detach().clone(), model.sigma.detach().clone()
    return f"normalisation from the file's {MEAN_KEY} / {STD_KEY}: mean {_values(mean)}, std {_values(std)}"


def load_state(model: nn.Module, state: Mapping[str, Tensor], path: str = "checkpoint",
               arch: str | None = None, done: Sequence[str] = ()) -> str:
    """Load ``state`` into ``model`` exactly, after mapping a known foreign layout; says what was mapped.

    Args:
        model: built by :func:`~tune_mtard.models.create_model` (with its declared normalisation, if any).
        state: a state dict, prefixes already stripped (:func:`load_state_dict_file`).
        path: what the error names (the file's path).
        arch: the registry name of ``model``, for the messages (default: its class name).
        done: what was already done to the file's keys.

    Returns:
        What was mapped, ``"; "``-joined, or :data:`AS_SAVED`.

    Raises:
        ConfigError: keyed by ``path``, in one line: the file was made for a model that computes differently,
            or its keys or shapes do not match.
    """
    arch = arch or type(model).__name__
    state, mapped = map_layout(model, dict(state))
    normalization = _take_normalization(model, state, path)
    refused = refusal(model, state, arch)
    if refused:
        raise ConfigError(path, refused)
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
        if result.missing_keys:
            problems.append(_count_keys(result.missing_keys, "missing"))
        if result.unexpected_keys:
            problems.append(_count_keys(result.unexpected_keys, "unexpected"))
    if problems:
        raise ConfigError(path, f"does not match the {arch} architecture: {', '.join(problems)}")
    steps = [*done, *mapped] + ([normalization] if normalization else [])
    return "; ".join(steps) or AS_SAVED


def load_mapped(model: nn.Module, path: str | os.PathLike, arch: str | None = None) -> str:
    """Load the weights in ``path`` into ``model`` (see :func:`load_state`); returns what was mapped."""
    state, done = _read(path)
    return load_state(model, state, str(path), arch, done)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, arch: str | None = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` exactly (see :func:`load_state`) and return ``model``.

    Raises:
        ConfigError: keyed by ``path``, when the file is not a state dict, was made for a model that computes
            differently, or does not match the architecture (missing or unexpected keys, different shapes);
            the message is one line.
    """
    load_mapped(model, path, arch)
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model``'s weights as a plain CPU state dict that :func:`load_checkpoint` reads back.

    ``torch.compile`` / ``DataParallel`` prefixes are stripped, so the file loads into an uncompiled
    model. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in plain_keys(model.state_dict()).items()}
    # Write then rename, so a trial killed mid-save never leaves a truncated checkpoint behind.
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
