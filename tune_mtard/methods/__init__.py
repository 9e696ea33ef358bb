"""Training objectives, one per ``method``: each turns a clean batch into this step's loss (docs/methods.md).

Every method runs in the same loop (:mod:`tune_mtard.engine`) with the same call shape, PGD and trace
columns, so ``compare`` runs them all alike. ``METHODS`` is the one list of them: adding a method is one
class decorated with :func:`register_method`, in a module of this package (every module of it is imported
with the package, in name order, so a method in a new file is known with no other file touched).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from torch import nn

from tune_mtard.methods.base import Autocast, Objective, Teachers, no_autocast, trace_row
from tune_mtard.methods.registry import METHODS, SHARED_SPACE, MethodSpec, Setting, Space, register_method

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # each method module registers its own
    importlib.import_module(f"{__name__}.{_module}")

if TYPE_CHECKING:
    from tune_mtard.config import Config


def needed_teachers(method: str) -> tuple[str, ...]:
    """The teacher roles ``method`` distils from."""
    return METHODS.get(method).teachers


def variants() -> dict[str, dict[str, Any]]:
    """What each name ``compare --methods`` accepts sets on the base config (``method`` included): every
    registered method and its variants (the B-MTARD ablations are variants of b-mtard)."""
    return {variant: {"method": method, **settings}
            for method, spec in METHODS.items() for variant, settings in spec.variants.items()}


def default_space(variant: str) -> Space:
    """The space ``compare --tune`` searches for a method or variant by default (docs/methods.md, "Tuned
    comparisons")."""
    return METHODS.get(variants()[variant]["method"]).default_space(variant)


def build_objective(cfg: Config, student: nn.Module, teachers: Teachers,
                    autocast: Autocast = no_autocast) -> Objective:
    """The objective of ``cfg.method``; ``teachers`` must hold every role it needs."""
    spec = METHODS.get(cfg.method)
    missing = [role for role in spec.teachers if teachers.get(role) is None]
    if missing:
        raise ValueError(f"method {cfg.method!r} needs the {' and '.join(missing)} teacher")
    return spec.objective(cfg, student, teachers, autocast)


__all__ = ["METHODS", "SHARED_SPACE", "MethodSpec", "Objective", "Setting", "Space", "Teachers", "build_objective",
           "default_space", "needed_teachers", "register_method", "trace_row", "variants"]
