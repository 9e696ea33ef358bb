"""Distillation from the robust teacher alone: ARD (Goldblum et al., AAAI 2020) and RSLAD (Zi et al., ICCV 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.balance import LOG_EPS
from tune_mtard.methods.base import KL_MEAN_LR_SPACE, Autocast, Objective, Teachers, no_autocast, soft_kl
from tune_mtard.methods.registry import Setting, register_method

if TYPE_CHECKING:
    from tune_mtard.config import Config


@register_method("ard", teachers=("robust",), settings={
    "ard_temperature": Setting(30.0, lambda t: t > 0, "must be > 0"),
    "ard_alpha": Setting(1.0, lambda alpha: 0 <= alpha <= 1, "must be in [0, 1]"),
}, space={
    "baselines.ard_temperature": {"type": "float", "low": 1.0, "high": 50.0, "log": True},
    "baselines.ard_alpha": {"type": "float", "low": 0.5, "high": 1.0},
})
class ARD(Objective):
    """Goldblum et al. (AAAI 2020): robust teacher's tempered soft labels on clean inputs for the
    student's tempered adversarial outputs, alpha*T^2*KL(T_T(x) || S_T(x')) + (1-alpha)*CE(S(x), y).

    The KL is averaged over batch and classes, as the reference's ``nn.KLDivLoss()`` (reduction
    'mean') does: its T = 30, alpha = 1 and learning rate were set for that scale.
    """

    def __init__(self, cfg: Config, student: nn.Module, teachers: Teachers, autocast: Autocast = no_autocast):
        super().__init__(cfg, student, teachers, autocast)
        self.teacher_robust = teachers["robust"]

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
        return loss, self.trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, tau_adv=temperature,
                            w_adv=w_adv, w_nat=w_nat)


@register_method("rslad", teachers=("robust",), space=KL_MEAN_LR_SPACE)
class RSLAD(Objective):
    """Zi et al. (ICCV 2021): the robust teacher's soft labels on clean inputs for both terms,
    5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)), with a KL inner attack against those labels.

    Each KL is the reference's ``kl_loss`` averaged over batch and classes (:func:`soft_kl`), the
    reduction MTARD and B-MTARD inherited from it.
    """

    def __init__(self, cfg: Config, student: nn.Module, teachers: Teachers, autocast: Autocast = no_autocast):
        super().__init__(cfg, student, teachers, autocast)
        self.teacher_robust = teachers["robust"]

    def step(self, x, y):
        with torch.no_grad(), self.autocast():
            t_nat = self.teacher_robust(x)
        p_teacher = F.softmax(t_nat.float(), dim=1)
        log_p_teacher = torch.log(p_teacher + LOG_EPS)
        x_adv = self.kl_adversarial(x, p_teacher)
        with self.autocast():
            s_adv, s_nat = self.student(x_adv), self.student(x)
        loss_adv = soft_kl(p_teacher, log_p_teacher, s_adv)
        loss_nat = soft_kl(p_teacher, log_p_teacher, s_nat)
        loss = 5 / 6 * loss_adv + 1 / 6 * loss_nat
        return loss, self.trace(x.device, loss_adv=loss_adv, loss_nat=loss_nat, w_adv=5 / 6, w_nat=1 / 6)
