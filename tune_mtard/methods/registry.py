"""The method registry: each training objective with the teachers it needs and the variants ``compare`` runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tune_mtard.registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        objective: the :class:`~tune_mtard.methods.base.Objective` subclass, built as
            ``objective(cfg, student, teachers, autocast)``.
        teachers: the teacher roles it distils from (``clean``, ``robust``); empty for methods that a
            teacher can also be trained with (``teachers.<role>.recipe``).
        variants: the names ``compare --methods`` accepts for it, each with the config keys it sets
            (ablations are variants); by default the method's own name, setting nothing else.
    """

    objective: type
    teachers: tuple[str, ...] = ()
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, *, teachers: tuple[str, ...] = (),
                    variants: dict[str, dict[str, Any]] | None = None) -> Callable[[type], type]:
    """Class decorator: ``@register_method("b-mtard", teachers=("clean", "robust"))``."""

    def add(objective: type) -> type:
        METHODS.add(name, MethodSpec(objective, tuple(teachers), dict(variants or {name: {}})))
        return objective

    return add
