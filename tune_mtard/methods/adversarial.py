"""Adversarial training without teachers (these are also the teachers' recipes, ``teachers.<role>.recipe``):
natural training, PGD-AT (Madry et al., ICLR 2018) and TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.methods.base import Autocast, Objective, Teachers, no_autocast
from tune_mtard.methods.registry import Setting, register_method

if TYPE_CHECKING:
    from tune_mtard.config import Config


@register_method("natural")
class Natural(Objective):
    """Standard training: cross-entropy on clean inputs."""

    def step(self, x, y):
        with self.autocast():
            logits = self.student(x)
        loss_nat = F.cross_entropy(logits.float(), y)
        return loss_nat, self.trace(x.device, loss_nat=loss_nat, w_adv=0.0, w_nat=1.0)


@register_method("pgd-at")
class PGDAT(Objective):
    """Madry et al. (ICLR 2018): cross-entropy on PGD examples."""

    def step(self, x, y):
        x_adv = self.adversarial(x, y)
        with self.autocast():
            logits = self.student(x_adv)
        loss_adv = F.cross_entropy(logits.float(), y)
        return loss_adv, self.trace(x.device, loss_adv=loss_adv, w_adv=1.0, w_nat=0.0)


@register_method("trades", settings={
    "trades_beta": Setting(6.0, lambda beta: beta >= 0, "must be >= 0"),
}, space={
    "baselines.trades_beta": {"type": "float", "low": 0.5, "high": 12.0, "log": True},
})
class TRADES(Objective):
    """Zhang et al. (ICML 2019): CE(S(x), y) + beta * KL(S(x) || S(x')), KL inner attack."""

    def __init__(self, cfg: Config, student: nn.Module, teachers: Teachers, autocast: Autocast = no_autocast):
        super().__init__(cfg, student, teachers, autocast)
        self.beta = cfg.baselines.trades_beta

    def step(self, x, y):
        self.student.eval()
        with torch.no_grad():
            p_clean = F.softmax(self.student(x).float(), dim=1)
        x_adv = self.kl_adversarial(x, p_clean)
        with self.autocast():
            s_nat, s_adv = self.student(x), self.student(x_adv)
        loss_nat = F.cross_entropy(s_nat.float(), y)
        loss_adv = F.kl_div(F.log_softmax(s_adv.float(), dim=1), F.softmax(s_nat.float(), dim=1), reduction="batchmean")
        loss = loss_nat + self.beta * loss_adv
        return loss, self.trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, w_adv=self.beta, w_nat=1.0)
