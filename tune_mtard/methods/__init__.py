"""Training objectives, one per ``method``: each turns a clean batch into this step's loss (docs/methods.md).

Every method runs in the same loop (:mod:`tune_mtard.engine`) with the same call shape, PGD and trace
columns, so ``compare`` runs them all alike. ``METHODS`` is the one list of them: adding a method is one
class decorated with :func:`register_method`, in a module imported below.
"""

from __future__ import annotations

from torch import nn

from tune_mtard.config import Config
from tune_mtard.methods import adversarial, distillation, mtard, bmtard  # noqa: F401 (they register, in this order)
from tune_mtard.methods.base import Autocast, Objective, Teachers, no_autocast, trace_row
from tune_mtard.methods.registry import METHODS, MethodSpec, register_method


def needed_teachers(method: str) -> tuple[str, ...]:
    """The teacher roles ``method`` distils from."""
    return METHODS.get(method).teachers


def build_objective(cfg: Config, student: nn.Module, teachers: Teachers,
                    autocast: Autocast = no_autocast) -> Objective:
    """The objective of ``cfg.method``; ``teachers`` must hold every role it needs."""
    spec = METHODS.get(cfg.method)
    missing = [role for role in spec.teachers if teachers.get(role) is None]
    if missing:
        raise ValueError(f"method {cfg.method!r} needs the {' and '.join(missing)} teacher")
    return spec.objective(cfg, student, teachers, autocast)


__all__ = ["METHODS", "MethodSpec", "Objective", "Teachers", "build_objective", "needed_teachers",
           "register_method", "trace_row"]
