"""MTARD (Zhao et al., ECCV 2022), B-MTARD's predecessor: two teachers at one fixed temperature, loss weights
from the relative losses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.balance import LOG_EPS
from tune_mtard.distributed import global_mean
from tune_mtard.methods.base import KL_MEAN_LR_SPACE, Autocast, Objective, Teachers, no_autocast, soft_kl
from tune_mtard.methods.registry import register_method

if TYPE_CHECKING:
    from tune_mtard.config import Config


@register_method("mtard", teachers=("clean", "robust"), space={
    **KL_MEAN_LR_SPACE,
    "balance.tau_init": {"type": "float", "low": 1.0, "high": 10.0, "log": True},  # MTARD's fixed temperature
    "balance.beta": {"type": "float", "low": 0.5, "high": 3.0},
    "balance.weight_lr": {"type": "float", "low": 5.0e-3, "high": 0.1, "log": True},
})
class MTARD(Objective):
    """MTARD (Zhao et al., ECCV 2022): two teachers at a fixed temperature; ``w_nat`` follows the relative
    losses to the power beta and ``w_adv = 1 - w_nat``."""

    def __init__(self, cfg: Config, student: nn.Module, teachers: Teachers, autocast: Autocast = no_autocast):
        super().__init__(cfg, student, teachers, autocast)
        self.teacher_clean = teachers["clean"]
        self.teacher_robust = teachers["robust"]
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
        batch_loss_adv, batch_loss_nat = global_mean(loss_adv.detach(), loss_nat.detach())  # across workers
        if self.loss_adv_0 is None:
            self.loss_adv_0, self.loss_nat_0 = batch_loss_adv.clone(), batch_loss_nat.clone()
        self.w_nat = self.w_nat.to(x.device)
        r_adv = (batch_loss_adv / self.loss_adv_0) ** self.cfg.balance.beta
        r_nat = (batch_loss_nat / self.loss_nat_0) ** self.cfg.balance.beta
        self.w_nat = self.w_nat - self.lr * (self.w_nat - r_nat / (r_adv + r_nat))
        w_nat, w_adv = self.w_nat, 1 - self.w_nat
        loss = w_adv * loss_adv + w_nat * loss_nat
        entropy_adv, entropy_nat = global_mean((p_adv * log_p_adv).mean(), (p_nat * log_p_nat).mean())
        trace = self.trace(x.device, loss_adv=batch_loss_adv, loss_nat=batch_loss_nat, entropy_adv=entropy_adv,
                           entropy_nat=entropy_nat, tau_adv=self.tau, tau_nat=self.tau, w_adv=w_adv, w_nat=w_nat)
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
