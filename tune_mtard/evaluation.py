"""Accuracy under attack: clean, white-box (FGSM, PGD, CW-inf, AutoAttack), black-box (Square, transfer).

Accuracies are fractions in [0, 1]. Models are put in eval mode for the duration of an evaluation and
given back in the mode they came in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import Attack, AutoAttack, Clean, build_attack, model_device

TRANSFER_ATTACKS = ("fgsm", "pgd20", "cw")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every model in eval mode for the duration; each gets its own mode back afterwards."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def robust_accuracy(
    model: nn.Module,
    attack: Attack,
    images: Tensor,
    labels: Tensor,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "",
) -> float:
    """Fraction of ``images`` (floats in [0, 1]) that ``model`` still classifies as ``labels`` under ``attack``.

    ``model`` and the attack's own model (another one for transfer attacks) are in eval mode throughout.
    Batches of ``batch_size`` go to the model's device; an attack that sees the whole set at once
    (AutoAttack) is called once on all of it. Predictions are made in fp32.
    """
    n = labels.shape[0]
    if n == 0:
        raise ValueError("no examples to evaluate")
    device = model_device(model, images.device)
    with eval_mode(model, attack.model), torch.autocast(device.type, enabled=False):
        if attack.attacks_whole_set:
            images = attack(images, labels)
        attack_each_batch = not (attack.attacks_whole_set or isinstance(attack, Clean))
        correct = torch.zeros((), dtype=torch.long, device=device)
        for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            if attack_each_batch:
                x = attack(x, y)
            with torch.no_grad():
                correct += model(x.float()).argmax(dim=1).eq(y).sum()
    return correct.item() / n


def evaluate_attacks(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack_names: Sequence[str],
    *,
    epsilon: float,
    num_classes: int,
    batch_size: int = 256,
    pgd_step_size: float = 2 / 255,
    pgd_steps: int = 20,
    square_queries: int = 100,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy under each named attack, keyed ``<name>_acc`` (``clean_acc``, ``pgd20_acc``, ``aa_acc``, ...).

    AutoAttack also reports the robust accuracy after each of its stages, ``aa_apgd_ce_acc``,
    ``aa_apgd_t_acc``, ``aa_fab_t_acc`` and ``aa_square_acc`` (the last equals ``aa_acc``).
    All names are checked before any attack runs.
    """
    attacks = {
        name: build_attack(
            name,
            model,
            epsilon=epsilon,
            num_classes=num_classes,
            pgd_step_size=pgd_step_size,
            pgd_steps=pgd_steps,
            batch_size=batch_size,
            square_queries=square_queries,
        )
        for name in attack_names
    }
    results: dict[str, float] = {}
    for name, attack in attacks.items():
        results[f"{name}_acc"] = robust_accuracy(model, attack, images, labels, batch_size, progress, desc=name)
        if isinstance(attack, AutoAttack):
            for stage, accuracy in attack.per_attack_accuracy.items():
                results[f"{name}_{stage.replace('-', '_')}_acc"] = accuracy
    return results


def w_robust_acc(clean: float, robust: float, clean_weight: float) -> float:
    """W-Robust Acc = ``clean_weight * clean + (1 - clean_weight) * robust``."""
    return clean_weight * clean + (1.0 - clean_weight) * robust


def transfer_accuracy(
    model: nn.Module,
    source_model: nn.Module,
    attack_name: str,
    images: Tensor,
    labels: Tensor,
    *,
    epsilon: float,
    batch_size: int = 256,
    pgd_step_size: float = 2 / 255,
    pgd_steps: int = 20,
    progress: bool = False,
) -> float:
    """Black-box transfer: accuracy of ``model`` on adversarial examples crafted on ``source_model``.

    ``attack_name`` is one of ``TRANSFER_ATTACKS`` (``pgd20`` and ``cw`` as in the MTARD paper).
    """
    if attack_name not in TRANSFER_ATTACKS:
        raise ValueError(f"unknown transfer attack {attack_name!r} (valid names: {', '.join(TRANSFER_ATTACKS)})")
    attack = build_attack(
        attack_name, source_model, epsilon=epsilon, pgd_step_size=pgd_step_size, pgd_steps=pgd_steps
    )
    return robust_accuracy(model, attack, images, labels, batch_size, progress, desc=f"transfer {attack_name}")
