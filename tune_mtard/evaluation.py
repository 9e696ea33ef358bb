"""Accuracy under attack: clean, white-box (FGSM, PGD, CW-inf, AutoAttack), black-box (Square, transfer).

Accuracies are fractions in [0, 1]. Models are put in eval mode for the duration of an evaluation and
given back in the mode they came in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tune_mtard.attacks import Attack, Clean, build_attack, model_device, strict_fp32
from tune_mtard.config import Config
from tune_mtard.data import DataBundle
from tune_mtard.metrics import TEST_N_EXAMPLES, TEST_W_ROBUST_ACC, w_robust_acc

TRANSFER_ATTACKS = ("fgsm", "pgd20", "cw")


def progress_bar(iterable: Iterable, total: int | None = None, desc: str = "", disable: bool = False) -> Iterable:
    """A tqdm progress bar over ``iterable`` when tqdm is installed (it is optional for the training core)."""
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every model in eval mode for the duration; each gets its own mode back afterwards."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes, strict=True):
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
    (AutoAttack) is called once on all of it. Predictions and attacks run in strict fp32 (no autocast, no TF32).
    """
    n = labels.shape[0]
    if n == 0:
        raise ValueError("no examples to evaluate")
    device = model_device(model, images.device)
    with eval_mode(model, attack.model), strict_fp32(device.type):
        if attack.attacks_whole_set:
            images = attack(images, labels)
        attack_each_batch = not (attack.attacks_whole_set or isinstance(attack, Clean))
        correct = torch.zeros((), dtype=torch.long, device=device)
        for start in progress_bar(range(0, n, batch_size), desc=desc, disable=not progress):
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
        if hasattr(attack, "per_attack_accuracy"):  # AutoAttack: the robust accuracy after each of its stages
            for stage, accuracy in attack.per_attack_accuracy.items():
                results[f"{name}_{stage.replace('-', '_')}_acc"] = accuracy
    return results


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


def final_test_metrics(cfg: Config, model: nn.Module, data: DataBundle, device: torch.device,
                       progress: bool = False) -> dict[str, float]:
    """The final test evaluation of a run: ``test_<attack>_acc`` for ``clean`` and each of ``eval.final_attacks``
    on the first ``eval.final_n_examples`` test examples (all when 0), ``test_w_robust_acc_<attack>`` for each
    robust one, and ``test_n_examples``. The attacks' random starts come from ``cfg.seed``."""
    e = cfg.eval
    test = data.test.head(e.final_n_examples) if e.final_n_examples else data.test
    x, y = test.floats().to(device), test.labels.to(device)
    names = list(dict.fromkeys(["clean"] + list(e.final_attacks)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        accs = evaluate_attacks(model, x, y, names, epsilon=cfg.attack.epsilon, num_classes=data.num_classes,
                                batch_size=e.batch_size, pgd_step_size=e.pgd_step_size, progress=progress)
    metrics = {f"test_{key}": value for key, value in accs.items()}
    for name in names:
        if name != "clean":
            metrics[TEST_W_ROBUST_ACC.format(name)] = w_robust_acc(accs["clean_acc"], accs[f"{name}_acc"],
                                                                  e.clean_weight)
    metrics[TEST_N_EXAMPLES] = len(test)
    return metrics
