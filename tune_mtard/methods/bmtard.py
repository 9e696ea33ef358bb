"""B-MTARD (Zhao, Wang & Wei, TPAMI 2024): :meth:`BMTARD.step` reads like docs/algorithm.md, steps 1-6, in
that order and with those names. The ablations switch off Entropy-Based Balance (``balance.entropy``)
and/or Normalization Loss Balance (``balance.loss``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.balance import LOG_EPS, EntropyBalance, LossBalance
from tune_mtard.distributed import global_mean
from tune_mtard.methods.base import KL_MEAN_LR_SPACE, Autocast, Objective, Teachers, no_autocast, soft_kl
from tune_mtard.methods.registry import register_method

if TYPE_CHECKING:
    from tune_mtard.config import Config

# What compare --tune searches of each balancer (docs/methods.md, "Tuned comparisons"): the ranges of the digits
# space. An ablation that switches a balancer off does not search its keys, which would change nothing.
ENTROPY_BALANCE_SPACE = {
    "balance.tau_min": {"type": "float", "low": 0.5, "high": 2.0},
    "balance.tau_max": {"type": "float", "low": 2.0, "high": 20.0},
    "balance.tau_lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
}
LOSS_BALANCE_SPACE = {
    "balance.beta": {"type": "float", "low": 0.5, "high": 3.0},
    "balance.weight_lr": {"type": "float", "low": 5.0e-3, "high": 0.1, "log": True},
}


@register_method("b-mtard", teachers=("clean", "robust"), variants={
    # `b-mtard` runs with both balancers on, whatever the base config says, so that its row and the
    # ablations' rows in a comparison mean what their names say.
    "b-mtard": {"balance.entropy": True, "balance.loss": True},
    "b-mtard-no-ebb": {"balance.entropy": False, "balance.loss": True},
    "b-mtard-no-nlb": {"balance.entropy": True, "balance.loss": False},
    "b-mtard-none": {"balance.entropy": False, "balance.loss": False},
}, space={**KL_MEAN_LR_SPACE, **ENTROPY_BALANCE_SPACE, **LOSS_BALANCE_SPACE}, variant_spaces={
    "b-mtard-no-ebb": {**KL_MEAN_LR_SPACE, **LOSS_BALANCE_SPACE},
    "b-mtard-no-nlb": {**KL_MEAN_LR_SPACE, **ENTROPY_BALANCE_SPACE},
    "b-mtard-none": KL_MEAN_LR_SPACE,
})
class BMTARD(Objective):
    """Balanced Multi-Teacher Adversarial Robustness Distillation (docs/algorithm.md, steps 1-6)."""

    def __init__(self, cfg: Config, student: nn.Module, teachers: Teachers, autocast: Autocast = no_autocast):
        super().__init__(cfg, student, teachers, autocast)
        b = cfg.balance
        self.teacher_clean = teachers["clean"]
        self.teacher_robust = teachers["robust"]
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
        # 4. Entropy-Based Balance (the balancers' inputs are the global batch's when several workers train it)
        entropy_adv, entropy_nat = global_mean((p_adv * log_p_adv).mean(), (p_nat * log_p_nat).mean())
        if b.entropy:
            tau_adv, tau_nat = self.entropy_balance.update(entropy_adv, entropy_nat)
        # 5. Normalization Loss Balance
        batch_loss_adv, batch_loss_nat = global_mean(loss_adv.detach(), loss_nat.detach())
        if b.loss:
            w_adv, w_nat = self.loss_balance.update(batch_loss_adv, batch_loss_nat)
        else:
            w_adv, w_nat = self.loss_balance.w_adv, self.loss_balance.w_nat
        # 6. the weighted loss, with this step's weights as constants
        loss = w_adv.to(loss_adv.device) * loss_adv + w_nat.to(loss_nat.device) * loss_nat
        trace = self.trace(x.device, loss_adv=batch_loss_adv, loss_nat=batch_loss_nat, entropy_adv=entropy_adv,
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
