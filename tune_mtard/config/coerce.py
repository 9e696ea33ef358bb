"""YAML values to typed dataclass fields: the one place that turns loose input into typed values.

A maintained library (pydantic, dacite) would do this too, but the training core must import with torch,
numpy, pyyaml and scikit-learn alone (docs/performance.md, "A core with light dependencies"), so the
coercion the schema needs is kept here, small: numbers (fractions ``a/b`` parsed, never evaluated),
booleans, strings, ``true | false | auto``, lists, nested sections and unknown keys.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from tune_mtard.errors import ConfigError

AUTO = "auto"

_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


def parse_number(value: Any, key: str) -> float:
    """A float from a YAML number or an ``a/b`` fraction string (parsed, never evaluated)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            denominator = float(match.group(2))
            if denominator == 0:
                raise ConfigError(key, f"division by zero in {value!r}")
            return float(match.group(1)) / denominator
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(key, f"expected a number or a fraction a/b, got {value!r}")


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as the type ``annotation`` names, or :class:`ConfigError` naming ``key``."""
    if _is_union(annotation):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None and type(None) in get_args(annotation):
            return None
        if bool in args and str in args:  # true, false or auto
            if isinstance(value, bool) or value == AUTO:
                return value
            raise ConfigError(key, f"expected true, false or auto, got {value!r}")
        return coerce(value, args[0], key)
    origin = get_origin(annotation)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = get_args(annotation)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return value
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        return parse_number(value, key)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """An instance of dataclass ``cls`` from ``raw``; keys it lacks keep their defaults, unknown keys are errors."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(dotted, f"unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = coerce(raw[f.name], hints[f.name], dotted)
    return cls(**kwargs)


def field_type(cls: type, name: str) -> Any:
    """The dataclass type of field ``name`` of ``cls`` (``Optional[X]`` -> ``X``), or the annotation itself."""
    hint = get_type_hints(cls)[name]
    args = [a for a in get_args(hint) if a is not type(None)] if _is_union(hint) else []
    return args[0] if len(args) == 1 else hint


def to_plain(obj: Any) -> Any:
    """Dataclasses, lists and dicts as plain YAML-ready values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys (``{"balance": {"beta": 1}}`` -> ``{"balance.beta": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
