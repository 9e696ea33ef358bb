"""Which methods a search trains: the base config's and, when ``method`` is searched, its choices (the
teachers a search prepares follow from them)."""

from __future__ import annotations

from tune_mtard.config import Config


def searched_methods(cfg: Config) -> set[str]:
    """The methods some trial will train: the base config's and, when ``method`` is searched, its choices."""
    dist = (cfg.space or {}).get("method")
    return {cfg.method} | set(dist.choices if dist is not None and dist.choices else [])
