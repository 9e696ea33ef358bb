"""The Optuna samplers a search can use, by name (``search.sampler.type``; docs/search.md, "Samplers").

Each sampler is one decorated builder, in this package: ``@register_sampler("name")`` on a function that
takes the ``search.sampler`` section and the seed and returns an Optuna sampler. Every module of this
package is imported with the package, so a sampler added in a new file here is known to
config validation, the search and the docs with no other file touched.

A search never pickles its sampler (Optuna does not promise that samplers pickle: NSGA-II stopped in
optuna 5.1): the searcher keeps the ``search.sampler`` section and builds the sampler again from it when
Ray Tune restores a search (tune_mtard/search/searcher.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tune_mtard.registry import Registry

if TYPE_CHECKING:
    from tune_mtard.config.search import SamplerConfig


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: how to build it and whether it handles several objectives."""

    name: str
    build: Callable[[SamplerConfig, int], Any]  # (search.sampler, seed) -> optuna.samplers.BaseSampler
    multi_objective: bool
    summary: str


SAMPLERS: Registry[SamplerSpec] = Registry("sampler")
_loaded = False


def register_sampler(name: str, *, multi_objective: bool, summary: str):
    """Decorator: ``build(sampler_config, seed)`` becomes the sampler ``name`` (``search.sampler.type: name``)."""

    def add(build: Callable[[SamplerConfig, int], Any]) -> Callable[[SamplerConfig, int], Any]:
        SAMPLERS.add(name, SamplerSpec(name, build, multi_objective, summary))
        return build

    return add


def samplers() -> Registry[SamplerSpec]:
    """The registry, with every sampler module of this package imported (each registers its own)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
    return SAMPLERS


def build_sampler(config: SamplerConfig, seed: int | None = None):
    """The Optuna sampler ``config`` names, seeded with ``seed`` (default: ``config.seed``)."""
    return samplers().get(config.type).build(config, config.seed if seed is None else seed)


samplers()  # SAMPLERS holds every sampler once this package is imported
