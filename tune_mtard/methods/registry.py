"""The method registry: each training objective with the teachers it needs, the variants ``compare`` runs and
the space ``compare --tune`` searches for it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from tune_mtard.registry import Registry

Space = dict[str, dict[str, Any]]  # dotted config key -> distribution, as a ``space`` section writes it

# The keys every method's tuned comparison searches: the optimiser's, which every method has
# (docs/methods.md, "Tuned comparisons"). A method's own space adds its keys and may move these ranges.
SHARED_SPACE: Space = {
    "train.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
    "train.weight_decay": {"type": "float", "low": 5.0e-5, "high": 1.0e-3, "log": True},
}


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
        space: the method's own keys that ``compare --tune`` searches, beside :data:`SHARED_SPACE`
            (a key of both takes the method's range).
        variant_spaces: a variant's own keys where they are not the method's (an ablation does not
            search the keys of the balancer it switches off).
    """

    objective: type
    teachers: tuple[str, ...] = ()
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    space: Space = field(default_factory=dict)
    variant_spaces: dict[str, Space] = field(default_factory=dict)

    def default_space(self, variant: str) -> Space:
        """What ``compare --tune`` searches for ``variant`` unless the config's ``spaces`` says otherwise."""
        return copy.deepcopy({**SHARED_SPACE, **self.variant_spaces.get(variant, self.space)})


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, *, teachers: tuple[str, ...] = (), variants: dict[str, dict[str, Any]] | None = None,
                    space: Space | None = None, variant_spaces: dict[str, Space] | None = None
                    ) -> Callable[[type], type]:
    """Class decorator: ``@register_method("b-mtard", teachers=("clean", "robust"), space={...})``."""
    variants = dict(variants or {name: {}})
    unknown = set(variant_spaces or {}) - set(variants)
    if unknown:
        raise ValueError(f"method {name!r}: variant_spaces names unknown variants {sorted(unknown)}")

    def add(objective: type) -> type:
        METHODS.add(name, MethodSpec(objective, tuple(teachers), variants, dict(space or {}),
                                     dict(variant_spaces or {})))
        return objective

    return add
