"""The method registry: each training objective with the teachers it needs, its own config keys, the variants
``compare`` runs and the space ``compare --tune`` searches for it."""

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
class Setting:
    """One config key a method owns, ``baselines.<name>`` (docs/configuration.md, "baselines").

    Attributes:
        default: its value unless the config sets one; its type is the key's type.
        rule: true for the values the method accepts.
        must: what the error says of any other value (``"must be >= 0"``).
    """

    default: float | int | str | bool
    rule: Callable[[Any], bool]
    must: str


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
        settings: the config keys the method owns, each ``baselines.<name>`` (:class:`Setting`).
    """

    objective: type
    teachers: tuple[str, ...] = ()
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    space: Space = field(default_factory=dict)
    variant_spaces: dict[str, Space] = field(default_factory=dict)
    settings: dict[str, Setting] = field(default_factory=dict)

    def default_space(self, variant: str) -> Space:
        """What ``compare --tune`` searches for ``variant`` unless the config's ``spaces`` says otherwise."""
        return copy.deepcopy({**SHARED_SPACE, **self.variant_spaces.get(variant, self.space)})


METHODS: Registry[MethodSpec] = Registry("method")
_settings_read = False  # once the config schema has made its ``baselines`` section, no method may add a key


def method_settings() -> dict[str, tuple[str, Setting]]:
    """Every method's own config keys: ``baselines.<name>`` -> (the method, its :class:`Setting`), in
    registration order. The config schema builds its ``baselines`` section from this once, at import."""
    global _settings_read
    _settings_read = True
    owned: dict[str, tuple[str, Setting]] = {}
    for method, spec in METHODS.items():
        for name, setting in spec.settings.items():
            owned[name] = (method, setting)
    return owned


def register_method(name: str, *, teachers: tuple[str, ...] = (), variants: dict[str, dict[str, Any]] | None = None,
                    space: Space | None = None, variant_spaces: dict[str, Space] | None = None,
                    settings: dict[str, Setting] | None = None) -> Callable[[type], type]:
    """Class decorator: ``@register_method("trades", settings={"trades_beta": Setting(6.0, ...)}, space={...})``.

    ``settings`` are the method's own config keys (``baselines.<name>``); a key of its ``space`` under
    ``baselines.`` must be one of them.
    """
    variants = dict(variants or {name: {}})
    settings = dict(settings or {})
    unknown = set(variant_spaces or {}) - set(variants)
    if unknown:
        raise ValueError(f"method {name!r}: variant_spaces names unknown variants {sorted(unknown)}")
    taken = {key: method for method, spec in METHODS.items() for key in spec.settings}
    clash = sorted(set(settings) & set(taken))
    if clash:
        raise ValueError(f"method {name!r}: baselines.{clash[0]} is already method {taken[clash[0]]!r}'s")
    if settings and _settings_read:
        raise ValueError(f"method {name!r}: registered after the config schema was built, so its settings "
                         "could not become config keys; define it in a module of tune_mtard/methods/")
    searched = {key[len("baselines."):] for sp in [space or {}, *(variant_spaces or {}).values()]
                for key in sp if key.startswith("baselines.")}
    foreign = sorted(searched - set(settings))
    if foreign:
        raise ValueError(f"method {name!r}: its space searches baselines.{foreign[0]}, which is not one of its "
                         "settings")

    def add(objective: type) -> type:
        METHODS.add(name, MethodSpec(objective, tuple(teachers), variants, dict(space or {}),
                                     dict(variant_spaces or {}), settings))
        return objective

    return add
