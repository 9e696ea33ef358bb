"""Every method's loss and gradient against an oracle written from its reference implementation
(docs/architecture.md, "How the tests are built").

For each method an oracle, written here and sharing no code with ``tune_mtard/methods/``, computes in float64
what the method's paper and reference code compute on a fixed clean batch and a fixed adversarial batch: the
loss, its gradient with respect to every student parameter, the values the trace records and, for the methods
with state (MTARD's weights, B-MTARD's weights and temperatures), the update from one step to the next. The
project's objective runs as training runs it (float32), with its attack replaced by the fixed adversarial batch;
the test also checks which attack the objective asked for and, for the KL attacks, towards which soft labels.
Two steps on two batches run for every method, so the second step sees the state the first one left.

Where the project deliberately differs from a reference, docs/methods.md says so and the oracle pins the
documented choice (MTARD's temperature: ``balance.tau_init``, the teacher's only; the reference code has none).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.methods import METHODS, build_objective
from tune_mtard.metrics import TRACE_COLUMNS
from tune_mtard.models import create_model

BATCH = 32
# float32 (the project) against float64 (the oracle). Measured: losses within 3e-6 (ARD at T = 30, whose KL is a
# small number) and most within 1e-7, gradients within 1.4e-6 of their largest entry. A wrong reduction,
# temperature or weight is a factor of at least 1e-2 away; even dropping the 1e-5 inside the reference's log
# moves a loss by about 3e-5.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5  # of the largest gradient entry
TRACE_RTOL, TRACE_ATOL = 1e-5, 1e-7
PROBS_ATOL = 1e-6
STUDENT_LOGIT_SCALE = 10.0

# The settings each oracle runs at: every term and constant of the method contributes (ARD at its defaults,
# T = 30 and alpha = 1, and at a T and alpha where the cross-entropy term counts; MTARD and B-MTARD with a
# weight learning rate and temperatures whose updates show in the second step).
SETTINGS: dict[str, dict[str, Any]] = {
    "natural": {"method": "natural"},
    "pgd-at": {"method": "pgd-at"},
    "trades": {"method": "trades", "baselines.trades_beta": 6.0},
    "ard": {"method": "ard"},
    "ard-alpha-0.7-T-4": {"method": "ard", "baselines.ard_temperature": 4.0, "baselines.ard_alpha": 0.7},
    "rslad": {"method": "rslad"},
    "mtard": {"method": "mtard", "balance.tau_init": 3.0, "balance.beta": 2.0, "balance.weight_lr": 0.4},
    "mtard-tau-1": {"method": "mtard", "balance.tau_init": 1.0, "balance.beta": 1.0, "balance.weight_lr": 0.025},
    "b-mtard": {"method": "b-mtard", "balance.tau_init": 2.0, "balance.tau_min": 1.0, "balance.tau_max": 5.0,
                "balance.tau_lr": 0.3, "balance.beta": 2.0, "balance.weight_lr": 0.4},
}


@dataclass
class Batch:
    x: Tensor
    y: Tensor
    x_adv: Tensor


@dataclass
class Models:
    """float64 copies, made right before the project's step: the student in train mode, the teachers in eval."""

    student: nn.Module
    clean: nn.Module
    robust: nn.Module


@dataclass
class Expected:
    loss: Tensor
    trace: dict[str, float]
    attack: str | None  # "pgd" (cross-entropy PGD), "kl" (KL PGD) or None
    kl_target: Tensor | None = None


@dataclass
class OracleState:
    """What the reference scripts keep between steps, as they keep it (python floats)."""

    values: dict[str, Any] = field(default_factory=dict)


# ---- the references' building blocks, in float64 -------------------------------------------------------


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """``F.cross_entropy`` (reduction 'mean'): -log softmax of the label, averaged over the batch."""
    log_q = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_q[torch.arange(len(y)), y].mean()


def softmax(logits: Tensor) -> Tensor:
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def log_softmax(logits: Tensor) -> Tensor:
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


def kl_div_terms(log_q: Tensor, p: Tensor) -> Tensor:
    """``nn.KLDivLoss(reduction='none')(log_q, p)``: ``p * (log p - log_q)``, 0 where p is 0."""
    return torch.xlogy(p, p) - p * log_q


def reference_kl_loss(log_q: Tensor, p: Tensor) -> Tensor:
    """RSLAD's, MTARD's and B-MTARD's ``kl_loss(a, b) = -a*b + torch.log(b + 1e-5)*b``, then ``torch.mean``."""
    return (-log_q * p + torch.log(p + 1e-5) * p).mean()


def number(t: Tensor) -> float:
    return float(t.detach())


def entropy_term(p: Tensor) -> float:
    return float((p * torch.log(p + 1e-5)).mean())


def sign(value: float) -> float:
    return float((value > 0) - (value < 0))


# ---- one oracle per method -----------------------------------------------------------------------------


def oracle_natural(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    loss_nat = cross_entropy(m.student(b.x), b.y)
    return Expected(loss_nat, {"loss_nat": number(loss_nat), "w_adv": 0.0, "w_nat": 1.0}, attack=None)


def oracle_pgd_at(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    """Madry et al.: ``F.cross_entropy(model(x_adv), y)``."""
    loss_adv = cross_entropy(m.student(b.x_adv), b.y)
    return Expected(loss_adv, {"loss_adv": number(loss_adv), "w_adv": 1.0, "w_nat": 0.0}, attack="pgd")


def oracle_trades(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    """yaodongyu/TRADES ``trades_loss``: ``F.cross_entropy(model(x_natural), y) + beta * (1 / batch_size) *
    nn.KLDivLoss(size_average=False)(F.log_softmax(model(x_adv)), F.softmax(model(x_natural)))``, the soft labels
    not detached; the attack maximises the same KL towards the eval-mode model's soft labels on x_natural."""
    beta = cfg.baselines.trades_beta
    m.student.eval()
    with torch.no_grad():
        target = softmax(m.student(b.x))
    m.student.train()
    logits_nat = m.student(b.x)
    loss_natural = cross_entropy(logits_nat, b.y)
    loss_robust = kl_div_terms(log_softmax(m.student(b.x_adv)), softmax(logits_nat)).sum() / len(b.x)
    loss = loss_natural + beta * loss_robust
    trace = {"loss_adv": number(loss_robust), "loss_nat": number(loss_natural), "w_adv": beta, "w_nat": 1.0}
    return Expected(loss, trace, attack="kl", kl_target=target)


def oracle_ard(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    """goldblum/AdversariallyRobustDistillation ``main.py``: ``alpha * T * T * nn.KLDivLoss()(F.log_softmax(
    outputs / T), F.softmax(teacher_net(inputs) / T)) + (1 - alpha) * nn.CrossEntropyLoss()(basic_net(inputs),
    targets)``; ``outputs`` is the student on the PGD examples, the teacher sees the clean inputs, and
    ``nn.KLDivLoss()`` averages over batch and classes."""
    temperature, alpha = cfg.baselines.ard_temperature, cfg.baselines.ard_alpha
    with torch.no_grad():
        p_teacher = softmax(m.robust(b.x) / temperature)
    kl = kl_div_terms(log_softmax(m.student(b.x_adv) / temperature), p_teacher).mean()
    ce = cross_entropy(m.student(b.x), b.y)
    loss = alpha * temperature * temperature * kl + (1.0 - alpha) * ce
    trace = {"loss_adv": number(kl), "loss_nat": number(ce), "tau_adv": temperature,
             "w_adv": alpha * temperature**2, "w_nat": 1.0 - alpha}
    return Expected(loss, trace, attack="pgd")


def oracle_rslad(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    """zibojia/RSLAD ``resnet18_rslad_cifar10.py``: ``teacher_logits = teacher(x)`` (clean) for both terms,
    ``5/6.0 * mean(kl_loss(log_softmax(adv_logits), softmax(teacher_logits))) + 1/6.0 * mean(kl_loss(
    log_softmax(nat_logits), softmax(teacher_logits)))``; ``rslad_inner_loss`` attacks towards the same soft
    labels."""
    with torch.no_grad():
        p_teacher = softmax(m.robust(b.x))
    kl_adv = reference_kl_loss(log_softmax(m.student(b.x_adv)), p_teacher)
    kl_nat = reference_kl_loss(log_softmax(m.student(b.x)), p_teacher)
    loss = 5 / 6.0 * kl_adv + 1 / 6.0 * kl_nat
    trace = {"loss_adv": number(kl_adv), "loss_nat": number(kl_nat), "w_adv": 5 / 6, "w_nat": 1 / 6}
    return Expected(loss, trace, attack="kl", kl_target=p_teacher)


def oracle_mtard(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    """zhaoshiji123/MTARD ``mtard_resnet18_cifar10.py``: the robust teacher on the PGD examples, the clean teacher
    on the clean inputs, ``kl_loss`` averaged; ``init_loss_*`` from the first step; ``weight["nat_loss"] -=
    weight_learn_rate * (weight["nat_loss"] - inv_rate_nat / (inv_rate_adv + inv_rate_nat))`` with
    ``inv_rate = (loss / init_loss) ** bert``, ``weight["adv_loss"] = 1 - weight["nat_loss"]``, before the step's
    loss. The reference has no temperature; the project's ``balance.tau_init`` divides the teachers' logits only
    (docs/methods.md), which is the reference at its default 1."""
    b_cfg, tau = cfg.balance, cfg.balance.tau_init
    s = state.values
    with torch.no_grad():
        p_adv = softmax(m.robust(b.x_adv) / tau)
        p_nat = softmax(m.clean(b.x) / tau)
    kl_adv = reference_kl_loss(log_softmax(m.student(b.x_adv)), p_adv)
    kl_nat = reference_kl_loss(log_softmax(m.student(b.x)), p_nat)
    s.setdefault("init_loss_adv", number(kl_adv))
    s.setdefault("init_loss_nat", number(kl_nat))
    inv_rate_adv = (number(kl_adv) / s["init_loss_adv"]) ** b_cfg.beta
    inv_rate_nat = (number(kl_nat) / s["init_loss_nat"]) ** b_cfg.beta
    w_nat = s.get("w_nat", 0.5)
    w_nat = w_nat - b_cfg.weight_lr * (w_nat - inv_rate_nat / (inv_rate_adv + inv_rate_nat))
    s["w_nat"] = w_nat
    loss = (1 - w_nat) * kl_adv + w_nat * kl_nat
    trace = {"loss_adv": number(kl_adv), "loss_nat": number(kl_nat), "entropy_adv": entropy_term(p_adv),
             "entropy_nat": entropy_term(p_nat), "tau_adv": tau, "tau_nat": tau, "w_adv": 1 - w_nat, "w_nat": w_nat}
    return Expected(loss, trace, attack="pgd")


def oracle_bmtard(m: Models, b: Batch, cfg, state: OracleState) -> Expected:
    """B-MTARD (Zhao, Wang & Wei, TPAMI 2024) as docs/algorithm.md, steps 2-6, writes the authors' script: tempered
    teachers (temperatures before this step's update), untempered student, ``kl_loss`` averaged, the temperatures
    moved by ``tau_lr * sign`` of the entropy ratio and clipped, the weights moved towards the normalised loss
    rates, clipped at 0 and renormalised, before the step's loss."""
    bc, s = cfg.balance, state.values
    start = min(max(bc.tau_init, bc.tau_min), bc.tau_max)
    temp_adv, temp_nat = s.get("temp_adv", start), s.get("temp_nat", start)
    with torch.no_grad():
        p_adv = softmax(m.robust(b.x_adv) / temp_adv)
        p_nat = softmax(m.clean(b.x) / temp_nat)
    kl_adv = reference_kl_loss(log_softmax(m.student(b.x_adv)), p_adv)
    kl_nat = reference_kl_loss(log_softmax(m.student(b.x)), p_nat)
    entropy_adv, entropy_nat = entropy_term(p_adv), entropy_term(p_nat)
    temp_adv = min(max(temp_adv - bc.tau_lr * sign(entropy_adv / entropy_nat - 1), bc.tau_min), bc.tau_max)
    temp_nat = min(max(temp_nat - bc.tau_lr * sign(entropy_nat / entropy_adv - 1), bc.tau_min), bc.tau_max)
    s.update(temp_adv=temp_adv, temp_nat=temp_nat)
    s.setdefault("init_loss_adv", number(kl_adv))
    s.setdefault("init_loss_nat", number(kl_nat))
    rate_adv = (number(kl_adv) / s["init_loss_adv"]) ** bc.beta
    rate_nat = (number(kl_nat) / s["init_loss_nat"]) ** bc.beta
    w_adv, w_nat = s.get("w_adv", 0.5), s.get("w_nat", 0.5)
    w_adv = max(w_adv - bc.weight_lr * (w_adv - rate_adv / (rate_adv + rate_nat)), 0.0)
    w_nat = max(w_nat - bc.weight_lr * (w_nat - rate_nat / (rate_adv + rate_nat)), 0.0)
    w_adv, w_nat = w_adv / (w_adv + w_nat), w_nat / (w_adv + w_nat)
    s.update(w_adv=w_adv, w_nat=w_nat)
    loss = w_adv * kl_adv + w_nat * kl_nat
    trace = {"loss_adv": number(kl_adv), "loss_nat": number(kl_nat), "entropy_adv": entropy_adv,
             "entropy_nat": entropy_nat, "tau_adv": temp_adv, "tau_nat": temp_nat, "w_adv": w_adv, "w_nat": w_nat}
    return Expected(loss, trace, attack="pgd")


ORACLES: dict[str, Callable[[Models, Batch, Any, OracleState], Expected]] = {
    "natural": oracle_natural, "pgd-at": oracle_pgd_at, "trades": oracle_trades, "ard": oracle_ard,
    "rslad": oracle_rslad, "mtard": oracle_mtard, "b-mtard": oracle_bmtard,
}


# ---- the project's step beside the oracle's ------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(tiny_digits) -> list[Batch]:
    """Two fixed clean batches and, for each, a fixed point of the attack's epsilon-ball (a sign pattern drawn
    once, clipped to [0, 1])."""
    x_all, y_all = tiny_digits.train.floats(), tiny_digits.train.labels
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(2):
        x, y = x_all[i * BATCH:(i + 1) * BATCH], y_all[i * BATCH:(i + 1) * BATCH]
        noise = torch.randn(x.shape, generator=generator).sign()
        out.append(Batch(x, y, torch.clamp(x + 0.1 * noise, 0.0, 1.0)))
    return out


def confident_student(arch: str, data) -> nn.Module:
    """A student of random weights whose logits are scaled up, so its soft labels are far from uniform (as a
    trained student's are) and no loss is a small difference of nearly equal numbers."""
    torch.manual_seed(0)
    student = create_model(arch, data.num_classes, data.in_channels).train()
    classifier = [m for m in student.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.mul_(STUDENT_LOGIT_SCALE)
        classifier.bias.mul_(STUDENT_LOGIT_SCALE)
    return student


def float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


@dataclass
class Gaps:
    """The largest differences between project and oracle over both steps (relative for losses and gradients)."""

    loss: float = 0.0
    grad: float = 0.0
    trace: float = 0.0


def compare_with_oracle(setting: str, tiny_config, tiny_digits, tiny_teachers, batches: list[Batch],
                        oracle_batches: list[Batch] | None = None) -> Gaps:
    """The project's objective on ``batches`` (its attack returning each batch's ``x_adv``) against the oracle of
    ``setting`` on ``oracle_batches`` (the same, unless a test wants to see the check fail); asserts and returns
    the largest gaps."""
    cfg = tiny_config.with_values(SETTINGS[setting])
    oracle = ORACLES[cfg.method]
    student = confident_student(cfg.student.arch, tiny_digits)
    objective = build_objective(cfg, student, tiny_teachers)
    calls: list[tuple[str, Tensor]] = []

    def fixed_attack(kind: str, x_adv: Tensor):
        def attack(x: Tensor, second: Tensor) -> Tensor:
            calls.append((kind, second))
            student.train()
            return x_adv.clone()
        return attack

    state, gaps = OracleState(), Gaps()
    params = list(student.parameters())
    for batch, oracle_batch in zip(batches, oracle_batches or batches, strict=True):
        models = Models(float64(student).train(), float64(tiny_teachers["clean"]).eval(),
                        float64(tiny_teachers["robust"]).eval())
        objective.adversarial = fixed_attack("pgd", batch.x_adv)
        objective.kl_adversarial = fixed_attack("kl", batch.x_adv)
        calls.clear()
        loss, row = objective.step(batch.x, batch.y)
        grads = torch.autograd.grad(loss, params)

        expected = oracle(models, Batch(oracle_batch.x.double(), batch.y, oracle_batch.x_adv.double()), cfg, state)
        expected_grads = torch.autograd.grad(expected.loss, list(models.student.parameters()))

        assert [kind for kind, _ in calls] == ([expected.attack] if expected.attack else []), calls
        if expected.attack == "kl":
            assert torch.allclose(calls[0][1].double(), expected.kl_target, rtol=0, atol=PROBS_ATOL), \
                f"{setting}: the KL attack's soft labels are not the reference's"
        elif expected.attack == "pgd":
            assert torch.equal(calls[0][1], batch.y)

        loss_gap = abs(number(loss) - number(expected.loss)) / abs(number(expected.loss))
        assert loss_gap <= LOSS_RTOL, f"{setting}: loss {number(loss)!r}, the oracle's {number(expected.loss)!r}"
        scale = max(float(g.abs().max()) for g in expected_grads)
        grad_gap = max(float((g.double() - e).abs().max()) for g, e in zip(grads, expected_grads, strict=True)) / scale
        assert grad_gap <= GRAD_RTOL, f"{setting}: gradient {grad_gap:.3g} of its largest entry from the oracle's"

        values = dict(zip(TRACE_COLUMNS, row.tolist(), strict=True))
        for name, value in values.items():
            if name in expected.trace:
                assert value == pytest.approx(expected.trace[name], rel=TRACE_RTOL, abs=TRACE_ATOL), (setting, name)
                gaps.trace = max(gaps.trace, abs(value - expected.trace[name]) / max(abs(expected.trace[name]), 1e-12))
            else:
                assert math.isnan(value), (setting, name, value)
        gaps.loss, gaps.grad = max(gaps.loss, loss_gap), max(gaps.grad, grad_gap)
    return gaps


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_each_methods_loss_gradient_and_trace_match_its_reference_oracle(setting, tiny_config, tiny_digits,
                                                                           tiny_teachers, batches):
    gaps = compare_with_oracle(setting, tiny_config, tiny_digits, tiny_teachers, batches)
    print(f"\n{setting}: largest relative gap loss {gaps.loss:.2e}, gradient {gaps.grad:.2e}, trace {gaps.trace:.2e}")


def test_every_registered_method_has_an_oracle():
    assert set(METHODS.names()) == set(ORACLES)
    assert {SETTINGS[s]["method"] for s in SETTINGS} == set(ORACLES)


def test_the_oracle_catches_a_kl_summed_over_classes_instead_of_averaged(tiny_config, tiny_digits, tiny_teachers,
                                                                          batches, monkeypatch):
    """The factor docs/methods.md documents for ``KL~`` (1 / number of classes) is one the oracle cannot miss."""
    module = sys.modules[METHODS.get("rslad").objective.__module__]
    averaged = module.soft_kl
    monkeypatch.setattr(module, "soft_kl", lambda p, log_p, s: averaged(p, log_p, s) * p.shape[1])
    with pytest.raises(AssertionError, match="rslad: loss"):
        compare_with_oracle("rslad", tiny_config, tiny_digits, tiny_teachers, batches)


def test_the_oracle_catches_the_clean_and_adversarial_inputs_swapped(tiny_config, tiny_digits, tiny_teachers,
                                                                      batches):
    """Which output goes with which input: an oracle given x' for x and x for x' disagrees with every method that
    uses both (and with PGD-AT, which must use x' alone)."""
    swapped = [Batch(b.x_adv, b.y, b.x) for b in batches]
    for setting in ("pgd-at", "trades", "ard-alpha-0.7-T-4", "rslad", "mtard", "b-mtard"):
        with pytest.raises(AssertionError, match=f"{setting}: (loss|the KL attack's soft labels)"):
            compare_with_oracle(setting, tiny_config, tiny_digits, tiny_teachers, batches, oracle_batches=swapped)


# ---- the KL attack -------------------------------------------------------------------------------------


def reference_kl_attack(model: nn.Module, x_natural: Tensor, target: Tensor, step_size: float, epsilon: float,
                        perturb_steps: int) -> Tensor:
    """The inner loop of yaodongyu/TRADES ``trades_loss`` and zibojia/RSLAD ``rslad_inner_loss`` (the model in eval
    mode): from ``x + 0.001 * randn``, sign steps on ``nn.KLDivLoss(size_average=False)(F.log_softmax(model(x_adv)),
    target)``, projected onto the epsilon-ball and clipped to [0, 1]."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), target)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("method", ["trades", "rslad"])
def test_the_kl_attack_is_the_reference_inner_loop_on_the_eval_mode_student(method, tiny_config, tiny_digits,
                                                                            tiny_teachers, batches):
    cfg = tiny_config.with_values({"method": method, "attack.steps": 5})
    student = confident_student(cfg.student.arch, tiny_digits)
    objective = build_objective(cfg, student, tiny_teachers)
    reference_student = copy.deepcopy(student).eval()
    x = batches[0].x
    target = torch.softmax(tiny_teachers["robust"](x), dim=1).detach()
    torch.manual_seed(1)
    x_adv = objective.kl_adversarial(x, target)
    assert student.training  # back in train mode
    torch.manual_seed(1)
    expected = reference_kl_attack(reference_student, x, target, cfg.attack.step_size, cfg.attack.epsilon, 5)
    assert torch.allclose(x_adv, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(x_adv, x, rtol=0, atol=cfg.attack.step_size / 2)  # it moved
    for key, value in reference_student.state_dict().items():  # eval mode: the batch norm statistics stayed
        assert torch.equal(student.state_dict()[key], value), key
