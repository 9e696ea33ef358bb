"""B-MTARD as the authors' training script writes it, the reference ``bench step`` compares the engine with."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.config import Config


def reference_kl(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The authors' ``kl_loss(a, b) = -a*b + log(b + 1e-5)*b``, averaged over batch and classes."""
    return (-log_q * p + torch.log(p + 1e-5) * p).mean()


class ReferenceStep:
    """B-MTARD as the authors' training script writes it: fp32, NCHW, separate passes, temperatures and
    weights held as python floats and updated from ``.item()`` values every step (a host sync per update).

    It computes what docs/algorithm.md gives (up to float rounding), so the benchmark compares like with like.
    """

    def __init__(self, cfg: Config, student: nn.Module, teacher_clean: nn.Module, teacher_robust: nn.Module):
        b, t = cfg.balance, cfg.train
        self.cfg = cfg
        self.student = student
        self.teacher_clean = teacher_clean.eval()
        self.teacher_robust = teacher_robust.eval()
        self.optimizer = torch.optim.SGD(student.parameters(), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        self.temp_adv = self.temp_nat = min(max(b.tau_init, b.tau_min), b.tau_max)
        self.weight = {"adv_loss": 0.5, "nat_loss": 0.5}
        self.init_loss_adv: float | None = None
        self.init_loss_nat: float | None = None

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.cfg.attack
        self.student.eval()
        x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device).detach()
        for _ in range(a.steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_ce = F.cross_entropy(self.student(x_adv), y, reduction="sum")
            grad = torch.autograd.grad(loss_ce, [x_adv])[0]
            x_adv = x_adv.detach() + a.step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - a.epsilon), x + a.epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        self.student.train()
        return x_adv

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        b = self.cfg.balance
        self.student.train()
        self.optimizer.zero_grad()
        x_adv = self.attack(x, y)
        student_adv_logits = self.student(x_adv)
        student_nat_logits = self.student(x)
        with torch.no_grad():
            teacher_adv_logits = self.teacher_robust(x_adv)
            teacher_nat_logits = self.teacher_clean(x)
        p_adv = F.softmax(teacher_adv_logits / self.temp_adv, dim=1)
        p_nat = F.softmax(teacher_nat_logits / self.temp_nat, dim=1)
        kl_loss_adv = reference_kl(F.log_softmax(student_adv_logits, dim=1), p_adv)
        kl_loss_nat = reference_kl(F.log_softmax(student_nat_logits, dim=1), p_nat)

        entropy_adv = (p_adv * torch.log(p_adv + 1e-5)).mean().item()
        entropy_nat = (p_nat * torch.log(p_nat + 1e-5)).mean().item()
        if b.entropy:
            self.temp_adv -= b.tau_lr * _sign(entropy_adv / entropy_nat - 1)
            self.temp_nat -= b.tau_lr * _sign(entropy_nat / entropy_adv - 1)
            self.temp_adv = min(max(self.temp_adv, b.tau_min), b.tau_max)
            self.temp_nat = min(max(self.temp_nat, b.tau_min), b.tau_max)

        loss_adv, loss_nat = kl_loss_adv.item(), kl_loss_nat.item()
        if self.init_loss_adv is None:
            self.init_loss_adv, self.init_loss_nat = loss_adv, loss_nat
        if b.loss:
            rate_adv = (loss_adv / self.init_loss_adv) ** b.beta
            rate_nat = (loss_nat / self.init_loss_nat) ** b.beta
            w_adv = self.weight["adv_loss"] - b.weight_lr * (self.weight["adv_loss"] - rate_adv / (rate_adv + rate_nat))
            w_nat = self.weight["nat_loss"] - b.weight_lr * (self.weight["nat_loss"] - rate_nat / (rate_adv + rate_nat))
            w_adv, w_nat = max(w_adv, 0.0), max(w_nat, 0.0)
            self.weight = {"adv_loss": w_adv / (w_adv + w_nat), "nat_loss": w_nat / (w_adv + w_nat)}

        total_loss = self.weight["adv_loss"] * kl_loss_adv + self.weight["nat_loss"] * kl_loss_nat
        total_loss.backward()
        self.optimizer.step()
        return {"loss_adv": loss_adv, "loss_nat": loss_nat, "entropy_adv": entropy_adv, "entropy_nat": entropy_nat,
                "tau_adv": self.temp_adv, "tau_nat": self.temp_nat, "w_adv": self.weight["adv_loss"],
                "w_nat": self.weight["nat_loss"]}


def _sign(value: float) -> float:
    return float((value > 0) - (value < 0))
