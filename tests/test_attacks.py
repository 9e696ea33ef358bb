"""Attacks and accuracy under attack, on tiny models over 1x8x8 inputs (no datasets, no training)."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tune_mtard.attacks import ATTACKS, FGSM, PGD, AutoAttackSettingsError, CWInf, TrainPGD, build_attack
from tune_mtard.attacks.autoattack import AutoAttack, Square
from tune_mtard.evaluation import evaluate_attacks, robust_accuracy, transfer_accuracy, w_robust_acc

NUM_CLASSES = 10
EPSILON = 0.04  # APGD-CE and APGD-T each break some points of the prototype model, not all


def prototypes(num_classes: int) -> torch.Tensor:
    """Class prototypes close enough together that an Linf ball of radius ~0.05 crosses between them."""
    generator = torch.Generator().manual_seed(123)
    return 0.4 + 0.2 * torch.rand(num_classes, 1, 8, 8, generator=generator)


def examples(n: int, num_classes: int = NUM_CLASSES, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=generator)
    noise = 0.05 * torch.randn(n, 1, 8, 8, generator=generator)
    return (prototypes(num_classes)[labels] + noise).clamp(0, 1), labels


class Quantize(nn.Module):
    """Rounds inputs to a grid: the gradient is zero everywhere, so only black-box attacks get through."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels


def prototype_model(num_classes: int = NUM_CLASSES, quantize_levels: int | None = None) -> nn.Module:
    """Nearest-prototype classifier as one linear layer: logit_k = 2 x.p_k - |p_k|^2."""
    linear = nn.Linear(64, num_classes)
    flat = prototypes(num_classes).flatten(1)
    with torch.no_grad():
        linear.weight.copy_(2 * flat)
        linear.bias.copy_(-(flat * flat).sum(dim=1))
    layers = [Quantize(quantize_levels)] if quantize_levels else []
    return nn.Sequential(*layers, nn.Flatten(), linear).eval()


def mlp(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)).eval()


def linf(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_valid_adversarial(adv: torch.Tensor, images: torch.Tensor, epsilon: float) -> None:
    assert adv.shape == images.shape
    assert adv.device == images.device
    assert adv.dtype == torch.float32
    assert linf(adv, images) <= epsilon + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


# ---------------------------------------------------------------- every attack


CHEAP_ATTACKS = [name for name in ATTACKS if name != "aa"]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", CHEAP_ATTACKS)
def test_attack_stays_in_eps_ball_and_leaves_model_mode_and_grads_alone(name, training):
    model = mlp().train(training)
    images, labels = examples(16)
    adv = build_attack(name, model, epsilon=EPSILON, num_classes=NUM_CLASSES)(images, labels)
    assert_valid_adversarial(adv, images, EPSILON)
    assert model.training is training
    assert all(p.grad is None for p in model.parameters())


def test_train_pgd_stays_in_eps_ball_and_leaves_model_mode_and_grads_alone():
    model = mlp()
    images, labels = examples(16)
    adv = TrainPGD(model, epsilon=EPSILON, step_size=0.01, steps=5)(images, labels)
    assert_valid_adversarial(adv, images, EPSILON)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_existing_parameter_grads_are_left_exactly_as_they_were():
    model = mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    images, labels = examples(16)
    for name in CHEAP_ATTACKS:
        build_attack(name, model, epsilon=EPSILON, num_classes=NUM_CLASSES)(images, labels)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


@pytest.mark.parametrize("name", ["fgsm", "pgd20", "cw"])
def test_attacks_run_in_fp32_under_the_callers_autocast(name):
    model = mlp()
    images, labels = examples(8)
    attack = build_attack(name, model, epsilon=EPSILON, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    expected = attack(images, labels)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = attack(images, labels)
    assert adv.dtype == torch.float32
    assert torch.equal(adv, expected)


class PrecisionRecorder(nn.Module):
    """A linear model that records the TF32 settings (cuDNN convolutions, CUDA matmuls) of every forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, NUM_CLASSES)
        self.seen: set[tuple[str, str]] = set()

    def forward(self, x):
        self.seen.add((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return self.linear(x.flatten(1))


@pytest.fixture
def tf32_on():
    """TF32 allowed for convolutions and matmuls, as a caller (or cuDNN's default for convolutions) may have it."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    yield
    conv.fp32_precision, matmul.fp32_precision = before


@pytest.mark.parametrize("name", ["clean", "fgsm", "pgd20", "cw"])
def test_evaluation_runs_with_tf32_off_and_gives_the_callers_setting_back(name, tf32_on):
    model = PrecisionRecorder().eval()
    images, labels = examples(8)
    robust_accuracy(model, build_attack(name, model, epsilon=EPSILON, num_classes=NUM_CLASSES), images, labels)
    build_attack(name, model, epsilon=EPSILON, num_classes=NUM_CLASSES)(images, labels)
    assert model.seen == {("ieee", "ieee")}
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("tf32", "tf32")


def test_cw_loss_is_the_margin_formula_without_a_data_dependent_shape():
    """The label's logit is gathered, not picked by a boolean mask, whose output size a GPU must sync to learn:
    the loss runs on the meta device, where no shape can depend on values."""
    from tune_mtard.attacks.base import cw_loss

    logits, labels = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 4, 2, 2, 1, 3])
    expected = -sum(max(0.0, float(row[y] - max(v for j, v in enumerate(row) if j != y) + 50.0))
                    for row, y in zip(logits, labels, strict=False))
    assert float(cw_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)
    assert cw_loss(logits.to("meta"), labels.to("meta")).shape == ()


def test_attacks_work_inside_no_grad():
    model = mlp()
    images, labels = examples(8)
    with torch.no_grad():
        adv = PGD(model, EPSILON, 0.01, 5)(images, labels)
    assert linf(adv, images) > 0


# ---------------------------------------------------------------- TrainPGD: docs/algorithm.md, step 1


def test_train_pgd_follows_spec_step_1_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(64, NUM_CLASSES)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    images, labels = examples(6)
    epsilon, step_size = 8 / 255, 2 / 255

    torch.manual_seed(7)
    adv = TrainPGD(model, epsilon, step_size, steps=2)(images, labels)

    torch.manual_seed(7)
    x_adv = images + 0.001 * torch.randn_like(images)
    for _ in range(2):
        # d CE / d x for a linear model: (softmax(W x + b) - onehot(y)) W
        probs = F.softmax(x_adv.flatten(1) @ linear.weight.T + linear.bias, dim=1)
        grad = ((probs - F.one_hot(labels, NUM_CLASSES)) @ linear.weight).reshape(images.shape)
        x_adv = x_adv + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, images - epsilon), images + epsilon).clamp(0, 1)

    assert torch.equal(adv, x_adv.detach())


def test_train_pgd_with_zero_steps_returns_the_clean_images():
    images, labels = examples(4)
    adv = TrainPGD(mlp(), EPSILON, 0.01, steps=0)(images, labels)
    assert torch.equal(adv, images)


# ---------------------------------------------------------------- accuracy sanity


def test_pgd20_accuracy_is_at_most_clean_accuracy():
    model = prototype_model()
    images, labels = examples(64)
    results = evaluate_attacks(model, images, labels, ["clean", "fgsm", "pgd20", "cw"], epsilon=0.05, num_classes=10)
    assert results["pgd20_acc"] <= results["clean_acc"]
    assert results["pgd20_acc"] < 1.0  # the attack really bites at this epsilon
    assert all(0.0 <= value <= 1.0 for value in results.values())


@pytest.mark.parametrize("name", ["fgsm", "pgd20", "cw"])
def test_zero_epsilon_gives_clean_accuracy(name):
    model = prototype_model()
    images, labels = examples(64)
    attack = build_attack(name, model, epsilon=0.0, num_classes=NUM_CLASSES)
    assert torch.equal(attack(images, labels), images)
    results = evaluate_attacks(model, images, labels, ["clean", name], epsilon=0.0, num_classes=10)
    assert results[f"{name}_acc"] == results["clean_acc"]


def test_cw_default_step_size_is_a_quarter_of_epsilon():
    assert CWInf(mlp(), 8 / 255).step_size == pytest.approx(2 / 255)
    assert CWInf(mlp(), 16 / 255).step_size == pytest.approx(4 / 255)


def test_fgsm_takes_one_step_of_size_epsilon():
    images, labels = examples(8)
    images = images.clamp(0.1, 0.9)  # away from the box so clipping does not shorten the step
    adv = FGSM(mlp(), 0.05)(images, labels)
    assert torch.allclose((adv - images).abs(), torch.full_like(images, 0.05), atol=1e-6)


def test_build_attack_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid names: clean, fgsm, pgd20, cw, aa, square"):
        build_attack("pgd7", mlp(), epsilon=EPSILON, num_classes=NUM_CLASSES)


def test_evaluate_attacks_checks_every_name_before_running_any():
    images, labels = examples(4)
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        evaluate_attacks(mlp(), images, labels, ["clean", "nope"], epsilon=EPSILON, num_classes=10)


def test_robust_accuracy_evaluates_in_eval_mode_and_restores_the_mode():
    class ModeRecorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, NUM_CLASSES)
            self.seen_training: set[bool] = set()

        def forward(self, x):
            self.seen_training.add(self.training)
            return self.linear(x.flatten(1))

    model = ModeRecorder().train()
    images, labels = examples(10)
    accuracy = robust_accuracy(model, build_attack("pgd20", model, epsilon=EPSILON), images, labels, batch_size=3)
    assert 0.0 <= accuracy <= 1.0
    assert model.seen_training == {False}
    assert model.training


def test_w_robust_acc_weights_clean_and_robust_accuracy():
    assert w_robust_acc(0.8, 0.4, clean_weight=0.5) == pytest.approx(0.6)
    assert w_robust_acc(0.8, 0.4, clean_weight=0.25) == pytest.approx(0.5)


def test_transfer_from_the_model_itself_equals_white_box_accuracy():
    model = prototype_model()
    images, labels = examples(32)
    torch.manual_seed(0)
    white_box = evaluate_attacks(model, images, labels, ["pgd20"], epsilon=0.05, num_classes=10)["pgd20_acc"]
    torch.manual_seed(0)
    assert transfer_accuracy(model, model, "pgd20", images, labels, epsilon=0.05) == white_box


def test_transfer_accuracy_puts_both_models_in_eval_mode_and_restores_them():
    target, source = mlp(seed=1).train(), mlp(seed=2).train()
    images, labels = examples(8)
    accuracy = transfer_accuracy(target, source, "cw", images, labels, epsilon=EPSILON)
    assert 0.0 <= accuracy <= 1.0
    assert target.training and source.training
    with pytest.raises(ValueError, match="valid names: fgsm, pgd20, cw"):
        transfer_accuracy(target, source, "aa", images, labels, epsilon=EPSILON)


def test_square_leaves_the_callers_random_stream_alone():
    images, labels = examples(8)
    attack = Square(prototype_model(), 0.05, n_queries=20)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    attack(images, labels)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- AutoAttack


@pytest.fixture(scope="module", params=["prototype", "gradient-masked"])
def autoattack_run(request):
    """One standard AutoAttack run over 16 examples (a few seconds each), with pyautoattack's own log.

    On the 10-class prototype model APGD-CE and APGD-T each break some points; on the gradient-masked
    5-class one (4 target classes, which also keeps it cheap) every white-box stage fails and only
    Square gets through. All four stages run in both.
    """
    if request.param == "prototype":
        num_classes, epsilon = NUM_CLASSES, EPSILON
        model = prototype_model(num_classes)
    else:
        num_classes, epsilon = 5, 0.05
        model = prototype_model(num_classes, quantize_levels=10)
    images, labels = examples(16, num_classes)

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("auto-attack")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        torch.manual_seed(0)
        rng_expected = torch.rand(3)
        torch.manual_seed(0)
        attack = AutoAttack(model, epsilon, num_classes=num_classes, batch_size=8)
        adv = attack(images, labels)
        rng_after = torch.rand(3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    with torch.no_grad():
        aa_acc = model(adv).argmax(1).eq(labels).float().mean().item()
    pgd20 = evaluate_attacks(model, images, labels, ["pgd20"], epsilon=epsilon, num_classes=num_classes)
    logged = {
        stage.lower(): float(percent) / 100
        for stage, percent in re.findall(r"robust accuracy after (\S+): ([\d.]+)%", "\n".join(records))
    }
    return SimpleNamespace(
        model=model,
        epsilon=epsilon,
        images=images,
        adv=adv,
        attack=attack,
        aa_acc=aa_acc,
        pgd20_acc=pgd20["pgd20_acc"],
        logged=logged,
        rng_kept=torch.equal(rng_after, rng_expected),
    )


def test_autoattack_accuracy_is_at_most_pgd20_accuracy(autoattack_run):
    assert autoattack_run.aa_acc <= autoattack_run.pgd20_acc
    assert autoattack_run.aa_acc < 1.0


def test_autoattack_stage_accuracies_are_non_increasing_and_end_at_aa_accuracy(autoattack_run):
    per_stage = autoattack_run.attack.per_attack_accuracy
    assert list(per_stage) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    values = list(per_stage.values())
    assert values == sorted(values, reverse=True)
    assert values[-1] == autoattack_run.aa_acc


def test_autoattack_stage_accuracies_are_the_ones_pyautoattack_reports(autoattack_run):
    per_stage = autoattack_run.attack.per_attack_accuracy
    assert set(autoattack_run.logged) == set(per_stage)
    for stage, accuracy in per_stage.items():
        assert round(accuracy, 4) == pytest.approx(autoattack_run.logged[stage], abs=1e-9)


def test_autoattack_stays_in_eps_ball_and_leaves_model_rng_and_grads_alone(autoattack_run):
    assert_valid_adversarial(autoattack_run.adv, autoattack_run.images, autoattack_run.epsilon)
    assert not autoattack_run.model.training
    assert all(p.grad is None for p in autoattack_run.model.parameters())
    assert all(p.requires_grad for p in autoattack_run.model.parameters())
    assert autoattack_run.rng_kept


def test_evaluate_attacks_reports_aa_and_each_of_its_stages():
    images, labels = examples(16)
    results = evaluate_attacks(prototype_model(), images, labels, ["clean", "aa"], epsilon=0.05, num_classes=10)
    assert set(results) == {
        "clean_acc",
        "aa_acc",
        "aa_apgd_ce_acc",
        "aa_apgd_t_acc",
        "aa_fab_t_acc",
        "aa_square_acc",
    }
    assert results["aa_square_acc"] == results["aa_acc"] <= results["aa_apgd_ce_acc"] <= results["clean_acc"]


def test_autoattack_uses_fewer_target_classes_on_a_five_class_dataset_and_says_so():
    # the gradient-masked autoattack_run runs such a configuration end to end
    model = prototype_model(num_classes=5)
    attack = AutoAttack(model, 0.05, num_classes=5)
    assert attack.notes == ["APGD-T and FAB-T use 4 target classes (dataset has 5 classes)"]
    assert attack.adversary.apgd_targeted.n_target_classes == 4
    assert attack.adversary.fab.n_target_classes == 4
    assert AutoAttack(prototype_model(), 0.05, num_classes=10).notes == []


def test_autoattack_refuses_fewer_than_four_classes():
    with pytest.raises(ValueError, match="at least 4 classes"):
        AutoAttack(prototype_model(num_classes=3), 0.05, num_classes=3)


def test_autoattack_settings_check_catches_too_few_square_queries():
    attack = AutoAttack(prototype_model(), 8 / 255, num_classes=NUM_CLASSES)
    attack.check_standard_settings()
    attack.adversary.square.n_queries = 100
    with pytest.raises(AutoAttackSettingsError, match="square.n_queries is 100, expected 5000"):
        attack.check_standard_settings()


def test_autoattack_settings_check_catches_a_dropped_stage():
    attack = AutoAttack(prototype_model(), 8 / 255, num_classes=NUM_CLASSES)
    attack.adversary.attacks_to_run.remove("fab-t")
    with pytest.raises(AutoAttackSettingsError, match="attacks_to_run"):
        attack.check_standard_settings()
    images, labels = examples(4)
    with pytest.raises(AutoAttackSettingsError):
        attack(images, labels)


def test_autoattack_settings_check_catches_a_changed_epsilon_or_target_count():
    attack = AutoAttack(prototype_model(), 8 / 255, num_classes=NUM_CLASSES)
    attack.adversary.apgd.eps = 16 / 255
    attack.adversary.fab.n_target_classes = 3
    with pytest.raises(AutoAttackSettingsError) as error:
        attack.check_standard_settings()
    assert "fab.n_target_classes is 3, expected 9" in str(error.value)
    assert f"apgd.eps is {16 / 255!r}, expected {8 / 255!r}" in str(error.value)


def test_autoattack_refuses_a_model_in_train_mode():
    model = prototype_model().train()
    images, labels = examples(4)
    with pytest.raises(AutoAttackSettingsError, match="eval mode"):
        AutoAttack(model, 0.05, num_classes=NUM_CLASSES)(images, labels)
    assert model.training
