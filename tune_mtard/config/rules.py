"""The helpers every section's rules use: a failed rule is a ConfigError naming the dotted key."""

from __future__ import annotations

import posixpath

from tune_mtard.attacks import ATTACKS
from tune_mtard.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def require_name(name: str, valid: list[str], key: str, kind: str) -> None:
    require(name in valid, key, f"unknown {kind} {name!r} (valid: {', '.join(valid)})")


def check_attack_names(names: list[str], key: str) -> None:
    for i, name in enumerate(names):
        require_name(name, ATTACKS.names(), f"{key}[{i}]", "attack")


def model_name_problem(name: str) -> str | None:
    """Why MLflow's Model Registry would refuse ``name`` (its rules, mlflow.utils.validation._validate_model_name,
    MLflow 3.x), or None: checked before a run starts, since the registration comes at its end."""
    if not name.strip():
        return "is blank"
    if "/" in name or ":" in name:
        return "contains '/' or ':'"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        return "is not a plain name (it resolves to another path)"
    return None


def check_model_name(name: str, key: str, hint: str = "") -> None:
    problem = model_name_problem(name)
    require(problem is None, key, f"{name!r} {problem}: the MLflow Model Registry refuses it{hint}")
