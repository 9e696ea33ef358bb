"""Adversarial attacks, all with one call shape: ``attack(images, labels) -> adv_images``.

``ATTACKS`` names every attack an evaluation can run (``eval.final_attacks``, ``evaluate --attacks``);
:func:`build_attack` builds one by name. ``base`` holds the shared interface, ``gradient`` the white-box
attacks (training PGD, PGD, CW-inf, FGSM) and ``autoattack`` the two that need pyautoattack (standard
AutoAttack and Square), imported only when one of them is built.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tune_mtard.attacks.base import (
    Attack,
    AutoAttackSettingsError,
    frozen_parameters,
    model_device,
    standard_normal,
    strict_fp32,
)
from tune_mtard.attacks.gradient import FGSM, PGD, Clean, CWInf, TrainPGD
from tune_mtard.registry import Registry

AttackFactory = Callable[..., Attack]
ATTACKS: Registry[AttackFactory] = Registry("attack")
_TITLES: dict[str, str] = {}  # filled by register_attack beside each factory


def register_attack(name: str, *, title: str) -> Callable[[AttackFactory], AttackFactory]:
    """Decorator: ``factory(model, *, epsilon, ...)`` becomes the attack ``name``, shown as ``title`` in tables."""

    def add(factory: AttackFactory) -> AttackFactory:
        ATTACKS.add(name, factory)
        _TITLES[name] = title
        return factory

    return add


def attack_title(name: str) -> str:
    """How a results table names the attack ``name`` (``pgd20`` -> ``PGD-20``)."""
    ATTACKS.get(name)
    return _TITLES[name]


def _from_autoattack_module(name: str) -> type:
    try:
        # pyautoattack, an optional extra, loads only when AutoAttack or Square runs
        from tune_mtard.attacks import autoattack
    except ImportError as exc:
        raise ImportError(f"attack {name} needs the pyautoattack package (pip install pyautoattack): {exc}") from exc
    return getattr(autoattack, name)


@register_attack("clean", title="Clean")
def _clean(model: nn.Module, **_) -> Attack:
    return Clean(model)


@register_attack("fgsm", title="FGSM")
def _fgsm(model: nn.Module, *, epsilon: float, **_) -> Attack:
    return FGSM(model, epsilon)


@register_attack("pgd20", title="PGD-20")
def _pgd(model: nn.Module, *, epsilon: float, pgd_step_size: float, pgd_steps: int, **_) -> Attack:
    return PGD(model, epsilon, pgd_step_size, pgd_steps, random_start=True)


@register_attack("cw", title="CW-inf")
def _cw(model: nn.Module, *, epsilon: float, **_) -> Attack:
    return CWInf(model, epsilon)


@register_attack("aa", title="AutoAttack")
def _autoattack(model: nn.Module, *, epsilon: float, num_classes: int | None, batch_size: int, **_) -> Attack:
    AutoAttack = _from_autoattack_module("AutoAttack")

    if num_classes is None:
        raise ValueError("attack 'aa' needs num_classes")
    return AutoAttack(model, epsilon, num_classes, batch_size=batch_size)


@register_attack("square", title="Square")
def _square(model: nn.Module, *, epsilon: float, square_queries: int, **_) -> Attack:
    Square = _from_autoattack_module("Square")

    return Square(model, epsilon, n_queries=square_queries)


def build_attack(
    name: str,
    model: nn.Module,
    *,
    epsilon: float,
    num_classes: int | None = None,
    pgd_step_size: float = 2 / 255,
    pgd_steps: int = 20,
    batch_size: int = 256,
    square_queries: int = 100,
) -> Attack:
    """The attack called ``name`` (one of ``ATTACKS``) against ``model``.

    ``pgd20`` is PGD with ``pgd_steps`` steps of ``pgd_step_size`` and a random start; ``aa`` is standard
    AutoAttack and needs ``num_classes``; ``square`` is Square Attack with ``square_queries`` queries.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r} (valid names: {', '.join(ATTACKS)})")
    return ATTACKS.get(name)(model, epsilon=epsilon, num_classes=num_classes, pgd_step_size=pgd_step_size,
                             pgd_steps=pgd_steps, batch_size=batch_size, square_queries=square_queries)


__all__ = ["ATTACKS", "Attack", "AutoAttackSettingsError", "CWInf", "Clean", "FGSM", "PGD", "TrainPGD",
           "attack_title", "build_attack", "frozen_parameters", "model_device", "register_attack", "standard_normal",
           "strict_fp32"]
