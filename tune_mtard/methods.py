"""Training objectives, one per ``method``: each turns a clean batch into this step's loss.

B-MTARD (:class:`BMTARD`) reads like SPEC section 4, steps 1-6, in that order and with those names.
The other methods share its call shape, its PGD and its trace columns so that ``compare`` runs them
all through the same loop; a column a method does not have is NaN in its trace.

Every ``step`` returns ``(loss, trace)`` where ``trace`` is a 0-d-per-entry tensor of
``loss_adv, loss_nat, entropy_adv, entropy_nat, tau_adv, tau_nat, w_adv, w_nat`` kept on the device.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.attacks import TrainPGD
from tune_mtard.balance import LOG_EPS, EntropyBalance, LossBalance
from tune_mtard.config import Config, Method

TRACE_COLUMNS = ("loss_adv", "loss_nat", "entropy_adv", "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat")

Autocast = Callable[[], contextlib.AbstractContextManager]


def _no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def soft_kl(p: torch.Tensor, log_p: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """The reference's distillation loss: mean over batch and classes of ``p * (log p - log_softmax(s))``."""
    return (p * (log_p - F.log_softmax(student_logits.float(), dim=1))).mean()


_CONSTANTS: dict[tuple[torch.device, str], torch.Tensor] = {}


def _constant(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor made once per device: a python float copied to a GPU every step would sync the host."""
    key = (device, float(value).hex())
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(float(value), dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def _trace(device: torch.device, **values: Any) -> torch.Tensor:
    row = [values.get(name, math.nan) for name in TRACE_COLUMNS]
    return torch.stack([v.detach().to(device, torch.float32).reshape(()) if isinstance(v, torch.Tensor)
                        else _constant(v, device) for v in row])


class Objective:
    """What every method provides to the loop."""

    def __init__(self, cfg: Config, student: nn.Module, autocast: Autocast = _no_autocast):
        self.cfg = cfg
        self.student = student
        self.autocast = autocast
        # Training PGD runs under the objective's autocast (bf16 when perf.bf16); evaluation attacks stay fp32.
        self.pgd = TrainPGD(student, cfg.attack.epsilon, cfg.attack.step_size, cfg.attack.steps,
                            keep_autocast=True)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step 1: PGD on the student in eval mode, then back to train mode."""
        self.student.eval()
        with self.autocast():
            x_adv = self.pgd(x, y)
        self.student.train()
        return x_adv

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def set_lr_scale(self, scale: float) -> None:
        """Learning-rate milestones also decay the balancing learning rates (SPEC step 7)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def to(self, device: torch.device) -> "Objective":
        return self


class BMTARD(Objective):
    """Balanced Multi-Teacher Adversarial Robustness Distillation (SPEC section 4)."""

    def __init__(self, cfg: Config, student: nn.Module, teacher_clean: nn.Module, teacher_robust: nn.Module,
                 autocast: Autocast = _no_autocast):
        super().__init__(cfg, student, autocast)
        b = cfg.balance
        self.teacher_clean = teacher_clean
        self.teacher_robust = teacher_robust
        self.entropy_balance = EntropyBalance(lr=b.tau_lr, tau_min=b.tau_min, tau_max=b.tau_max, tau_init=b.tau_init)
        if not b.entropy:
            self.entropy_balance.tau_adv = torch.tensor(float(b.tau_init))
            self.entropy_balance.tau_nat = torch.tensor(float(b.tau_init))
        self.loss_balance = LossBalance(lr=b.weight_lr, beta=b.beta)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.cfg.balance
        # 1. adversarial examples on the student (eval mode)
        x_adv = self.adversarial(x, y)
        # 2. student in train mode; teachers in eval mode without grad
        with self.autocast():
            s_adv = self.student(x_adv)
            s_nat = self.student(x)
            with torch.no_grad():
                t_adv = self.teacher_robust(x_adv)
                t_nat = self.teacher_clean(x)
        # 3. tempered teacher soft labels (temperatures before this step's update); untempered student
        tau_adv, tau_nat = self.entropy_balance.tau_adv, self.entropy_balance.tau_nat
        p_adv = F.softmax(t_adv.float() / tau_adv, dim=1)
        p_nat = F.softmax(t_nat.float() / tau_nat, dim=1)
        log_p_adv = torch.log(p_adv + LOG_EPS)
        log_p_nat = torch.log(p_nat + LOG_EPS)
        loss_adv = soft_kl(p_adv, log_p_adv, s_adv)
        loss_nat = soft_kl(p_nat, log_p_nat, s_nat)
        # 4. Entropy-Based Balance
        entropy_adv = (p_adv * log_p_adv).mean()
        entropy_nat = (p_nat * log_p_nat).mean()
        if b.entropy:
            tau_adv, tau_nat = self.entropy_balance.update(entropy_adv, entropy_nat)
        # 5. Normalization Loss Balance
        if b.loss:
            w_adv, w_nat = self.loss_balance.update(loss_adv.detach(), loss_nat.detach())
        else:
            w_adv, w_nat = self.loss_balance.w_adv, self.loss_balance.w_nat
        # 6. the weighted loss, with this step's weights as constants
        loss = w_adv.to(loss_adv.device) * loss_adv + w_nat.to(loss_nat.device) * loss_nat
        trace = _trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, entropy_adv=entropy_adv,
                       entropy_nat=entropy_nat, tau_adv=tau_adv, tau_nat=tau_nat, w_adv=w_adv, w_nat=w_nat)
        return loss, trace

    def set_lr_scale(self, scale: float) -> None:
        self.entropy_balance.lr = self.cfg.balance.tau_lr * scale
        self.loss_balance.lr = self.cfg.balance.weight_lr * scale

    def state_dict(self) -> dict[str, Any]:
        return {"entropy_balance": self.entropy_balance.state_dict(), "loss_balance": self.loss_balance.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entropy_balance.load_state_dict(state["entropy_balance"])
        self.loss_balance.load_state_dict(state["loss_balance"])

    def to(self, device: torch.device) -> "BMTARD":
        self.entropy_balance.to(device)
        self.loss_balance.to(device)
        return self


class MTARD(Objective):
    """MTARD (Zhao et al., ECCV 2022): two teachers at a fixed temperature; ``w_nat`` follows the relative
    losses to the power beta and ``w_adv = 1 - w_nat``."""

    def __init__(self, cfg: Config, student: nn.Module, teacher_clean: nn.Module, teacher_robust: nn.Module,
                 autocast: Autocast = _no_autocast):
        super().__init__(cfg, student, autocast)
        self.teacher_clean = teacher_clean
        self.teacher_robust = teacher_robust
        self.tau = float(cfg.balance.tau_init)
        self.lr = cfg.balance.weight_lr
        self.w_nat = torch.tensor(0.5)
        self.loss_adv_0: torch.Tensor | None = None
        self.loss_nat_0: torch.Tensor | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.adversarial(x, y)
        with self.autocast():
            s_adv, s_nat = self.student(x_adv), self.student(x)
            with torch.no_grad():
                t_adv, t_nat = self.teacher_robust(x_adv), self.teacher_clean(x)
        p_adv = F.softmax(t_adv.float() / self.tau, dim=1)
        p_nat = F.softmax(t_nat.float() / self.tau, dim=1)
        log_p_adv, log_p_nat = torch.log(p_adv + LOG_EPS), torch.log(p_nat + LOG_EPS)
        loss_adv = soft_kl(p_adv, log_p_adv, s_adv)
        loss_nat = soft_kl(p_nat, log_p_nat, s_nat)
        if self.loss_adv_0 is None:
            self.loss_adv_0, self.loss_nat_0 = loss_adv.detach().clone(), loss_nat.detach().clone()
        self.w_nat = self.w_nat.to(x.device)
        r_adv = (loss_adv.detach() / self.loss_adv_0) ** self.cfg.balance.beta
        r_nat = (loss_nat.detach() / self.loss_nat_0) ** self.cfg.balance.beta
        self.w_nat = self.w_nat - self.lr * (self.w_nat - r_nat / (r_adv + r_nat))
        w_nat, w_adv = self.w_nat, 1 - self.w_nat
        loss = w_adv * loss_adv + w_nat * loss_nat
        trace = _trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, entropy_adv=(p_adv * log_p_adv).mean(),
                       entropy_nat=(p_nat * log_p_nat).mean(), tau_adv=self.tau, tau_nat=self.tau,
                       w_adv=w_adv, w_nat=w_nat)
        return loss, trace

    def set_lr_scale(self, scale: float) -> None:
        self.lr = self.cfg.balance.weight_lr * scale

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "w_nat": float(self.w_nat),
            "loss_adv_0": None if self.loss_adv_0 is None else float(self.loss_adv_0),
            "loss_nat_0": None if self.loss_nat_0 is None else float(self.loss_nat_0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state["lr"])
        self.w_nat = torch.tensor(float(state["w_nat"]))
        self.loss_adv_0 = self.loss_nat_0 = None
        if state["loss_adv_0"] is not None:
            self.loss_adv_0 = torch.tensor(float(state["loss_adv_0"]))
            self.loss_nat_0 = torch.tensor(float(state["loss_nat_0"]))

    def to(self, device: torch.device) -> "MTARD":
        self.w_nat = self.w_nat.to(device)
        if self.loss_adv_0 is not None:
            self.loss_adv_0, self.loss_nat_0 = self.loss_adv_0.to(device), self.loss_nat_0.to(device)
        return self


class Natural(Objective):
    """Standard training: cross-entropy on clean inputs."""

    def step(self, x, y):
        with self.autocast():
            logits = self.student(x)
        loss_nat = F.cross_entropy(logits.float(), y)
        return loss_nat, _trace(x.device, loss_nat=loss_nat, w_adv=0.0, w_nat=1.0)


class PGDAT(Objective):
    """Madry et al. (ICLR 2018): cross-entropy on PGD examples."""

    def step(self, x, y):
        x_adv = self.adversarial(x, y)
        with self.autocast():
            logits = self.student(x_adv)
        loss_adv = F.cross_entropy(logits.float(), y)
        return loss_adv, _trace(x.device, loss_adv=loss_adv, w_adv=1.0, w_nat=0.0)


def _kl_attack(student: nn.Module, x: torch.Tensor, target_probs: torch.Tensor, epsilon: float,
               step_size: float, steps: int) -> torch.Tensor:
    """PGD that maximises KL(target || student(x')) from x + 0.001 N(0, I) (TRADES' and RSLAD's inner attack)."""
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.autocast(x.device.type, enabled=False):
            loss = F.kl_div(F.log_softmax(student(x_adv).float(), dim=1), target_probs, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
    return x_adv.detach()


class TRADES(Objective):
    """Zhang et al. (ICML 2019): CE(S(x), y) + beta * KL(S(x) || S(x')), KL inner attack."""

    def __init__(self, cfg: Config, student: nn.Module, autocast: Autocast = _no_autocast, beta: float | None = None):
        super().__init__(cfg, student, autocast)
        self.beta = cfg.baselines.trades_beta if beta is None else beta

    def step(self, x, y):
        a = self.cfg.attack
        self.student.eval()
        with torch.no_grad():
            p_clean = F.softmax(self.student(x).float(), dim=1)
        x_adv = _kl_attack(self.student, x, p_clean, a.epsilon, a.step_size, a.steps)
        self.student.train()
        with self.autocast():
            s_nat, s_adv = self.student(x), self.student(x_adv)
        loss_nat = F.cross_entropy(s_nat.float(), y)
        loss_adv = F.kl_div(F.log_softmax(s_adv.float(), dim=1), F.softmax(s_nat.float(), dim=1), reduction="batchmean")
        loss = loss_nat + self.beta * loss_adv
        return loss, _trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, w_adv=self.beta, w_nat=1.0)


class ARD(Objective):
    """Goldblum et al. (AAAI 2020): robust teacher's tempered soft labels on clean inputs for the
    student's tempered adversarial outputs, alpha*T^2*KL(T_T(x) || S_T(x')) + (1-alpha)*CE(S(x), y).

    The KL is averaged over batch and classes, as the reference's ``nn.KLDivLoss()`` (reduction
    'mean') does: its T = 30, alpha = 1 and learning rate were set for that scale.
    """

    def __init__(self, cfg: Config, student: nn.Module, teacher_robust: nn.Module, autocast: Autocast = _no_autocast):
        super().__init__(cfg, student, autocast)
        self.teacher_robust = teacher_robust

    def step(self, x, y):
        temperature, alpha = self.cfg.baselines.ard_temperature, self.cfg.baselines.ard_alpha
        x_adv = self.adversarial(x, y)
        with self.autocast():
            s_adv, s_nat = self.student(x_adv), self.student(x)
            with torch.no_grad():
                t_nat = self.teacher_robust(x)
        p_teacher = F.softmax(t_nat.float() / temperature, dim=1)
        loss_adv = F.kl_div(F.log_softmax(s_adv.float() / temperature, dim=1), p_teacher, reduction="none").mean()
        loss_nat = F.cross_entropy(s_nat.float(), y)
        w_adv, w_nat = alpha * temperature**2, 1.0 - alpha
        loss = w_adv * loss_adv + w_nat * loss_nat
        return loss, _trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, tau_adv=temperature,
                            w_adv=w_adv, w_nat=w_nat)


class RSLAD(Objective):
    """Zi et al. (ICCV 2021): the robust teacher's soft labels on clean inputs for both terms,
    5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)), with a KL inner attack against those labels.

    Each KL is the reference's ``kl_loss`` averaged over batch and classes (:func:`soft_kl`), the
    reduction MTARD and B-MTARD inherited from it.
    """

    def __init__(self, cfg: Config, student: nn.Module, teacher_robust: nn.Module, autocast: Autocast = _no_autocast):
        super().__init__(cfg, student, autocast)
        self.teacher_robust = teacher_robust

    def step(self, x, y):
        a = self.cfg.attack
        with torch.no_grad(), self.autocast():
            t_nat = self.teacher_robust(x)
        p_teacher = F.softmax(t_nat.float(), dim=1)
        log_p_teacher = torch.log(p_teacher + LOG_EPS)
        self.student.eval()
        x_adv = _kl_attack(self.student, x, p_teacher, a.epsilon, a.step_size, a.steps)
        self.student.train()
        with self.autocast():
            s_adv, s_nat = self.student(x_adv), self.student(x)
        loss_adv = soft_kl(p_teacher, log_p_teacher, s_adv)
        loss_nat = soft_kl(p_teacher, log_p_teacher, s_nat)
        loss = 5 / 6 * loss_adv + 1 / 6 * loss_nat
        return loss, _trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, w_adv=5 / 6, w_nat=1 / 6)


NEEDS_TEACHERS = {Method.BMTARD: ("clean", "robust"), Method.MTARD: ("clean", "robust"),
                  Method.ARD: ("robust",), Method.RSLAD: ("robust",)}


def build_objective(cfg: Config, student: nn.Module, teacher_clean: nn.Module | None,
                    teacher_robust: nn.Module | None, autocast: Autocast = _no_autocast) -> Objective:
    """The objective for ``cfg.method``."""
    method = cfg.method
    if method is Method.BMTARD:
        return BMTARD(cfg, student, teacher_clean, teacher_robust, autocast)
    if method is Method.MTARD:
        return MTARD(cfg, student, teacher_clean, teacher_robust, autocast)
    if method is Method.ARD:
        return ARD(cfg, student, teacher_robust, autocast)
    if method is Method.RSLAD:
        return RSLAD(cfg, student, teacher_robust, autocast)
    if method is Method.TRADES:
        return TRADES(cfg, student, autocast)
    if method is Method.PGD_AT:
        return PGDAT(cfg, student, autocast)
    return Natural(cfg, student, autocast)
