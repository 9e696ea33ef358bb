"""The helpers every section's rules use: a failed rule is a ConfigError naming the dotted key."""

from __future__ import annotations

from tune_mtard.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def require_name(name: str, valid: list[str], key: str, kind: str) -> None:
    require(name in valid, key, f"unknown {kind} {name!r} (valid: {', '.join(valid)})")


def check_attack_names(names: list[str], key: str) -> None:
    from tune_mtard.attacks import ATTACKS

    for i, name in enumerate(names):
        require_name(name, ATTACKS.names(), f"{key}[{i}]", "attack")
