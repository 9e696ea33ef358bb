"""The two balancing algorithms of B-MTARD (docs/algorithm.md, steps 4 and 5).

Both balancers are plain objects. Their state lives in tensors on whatever device the
inputs come from, so a training loop on a GPU can call ``update`` every step without a
host sync; floats work too (for checks by hand and for the reference step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Number = float | torch.Tensor

# The reference adds this inside the log of the teacher's soft labels (docs/algorithm.md, step 3).
LOG_EPS = 1e-5


def mean_plogp(logits: torch.Tensor, tau: Number) -> torch.Tensor:
    """Mean over batch and classes of ``p * log(p + 1e-5)`` with ``p = softmax(logits / tau)``.

    This is the (negative, scaled) entropy that Entropy-Based Balance compares between teachers.
    """
    p = F.softmax(logits / tau, dim=1)
    return (p * torch.log(p + LOG_EPS)).mean()


def _as_tensor(value: Number, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32)
    device = like.device if like is not None else None
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class EntropyBalance:
    """Entropy-Based Balance: adapts the teachers' temperatures so their soft labels carry equal entropy.

    ``tau_adv <- clip(tau_adv - lr * sign(e_adv / e_nat - 1), tau_min, tau_max)`` and symmetrically for
    ``tau_nat``. The teacher whose soft labels carry more entropy (the more negative ``e``) is cooled
    and the other warmed, by ``lr`` per step, until their entropies meet.
    """

    def __init__(self, lr: float, tau_min: float, tau_max: float, tau_init: float):
        if tau_min > tau_max:
            raise ValueError(f"tau_min ({tau_min}) > tau_max ({tau_max})")
        self.lr = float(lr)
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        start = min(max(float(tau_init), self.tau_min), self.tau_max)
        self.tau_adv = torch.tensor(start)
        self.tau_nat = torch.tensor(start)

    def update(self, e_adv: Number, e_nat: Number) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from this step's entropies (measured at the current temperatures); returns the new pair."""
        e_adv = _as_tensor(e_adv)
        e_nat = _as_tensor(e_nat, like=e_adv)
        self.to(e_adv.device)
        step_adv = self.lr * torch.sign(e_adv / e_nat - 1)
        step_nat = self.lr * torch.sign(e_nat / e_adv - 1)
        self.tau_adv = torch.clamp(self.tau_adv - step_adv, self.tau_min, self.tau_max)
        self.tau_nat = torch.clamp(self.tau_nat - step_nat, self.tau_min, self.tau_max)
        return self.tau_adv, self.tau_nat

    def to(self, device: torch.device | str) -> "EntropyBalance":
        self.tau_adv = self.tau_adv.to(device)
        self.tau_nat = self.tau_nat.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "tau_min": self.tau_min,
            "tau_max": self.tau_max,
            "tau_adv": float(self.tau_adv),
            "tau_nat": float(self.tau_nat),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.tau_adv.device
        self.lr = float(state["lr"])
        self.tau_min = float(state["tau_min"])
        self.tau_max = float(state["tau_max"])
        self.tau_adv = torch.tensor(float(state["tau_adv"]), device=device)
        self.tau_nat = torch.tensor(float(state["tau_nat"]), device=device)


class LossBalance:
    """Normalization Loss Balance: moves the loss weights towards each teacher's relative progress.

    ``r_i = (L_i(t) / L_i(0)) ** beta``, ``target_i = r_i / (r_adv + r_nat)``,
    ``w_i <- w_i - lr * (w_i - target_i)``, clipped at 0 and renormalised to sum 1. ``L_i(0)`` is the
    first loss this balancer ever saw; it is part of the state so a resumed run keeps it.
    """

    def __init__(self, lr: float, beta: float):
        self.lr = float(lr)
        self.beta = float(beta)
        self.w_adv = torch.tensor(0.5)
        self.w_nat = torch.tensor(0.5)
        self.loss_adv_0: torch.Tensor | None = None
        self.loss_nat_0: torch.Tensor | None = None

    def update(self, loss_adv: Number, loss_nat: Number) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from this step's (detached) losses; returns the new ``(w_adv, w_nat)``."""
        loss_adv = _as_tensor(loss_adv)
        loss_nat = _as_tensor(loss_nat, like=loss_adv)
        self.to(loss_adv.device)
        if self.loss_adv_0 is None or self.loss_nat_0 is None:
            self.loss_adv_0, self.loss_nat_0 = loss_adv.clone(), loss_nat.clone()
        r_adv = (loss_adv / self.loss_adv_0) ** self.beta
        r_nat = (loss_nat / self.loss_nat_0) ** self.beta
        target_adv = r_adv / (r_adv + r_nat)
        target_nat = r_nat / (r_adv + r_nat)
        w_adv = torch.clamp(self.w_adv - self.lr * (self.w_adv - target_adv), min=0.0)
        w_nat = torch.clamp(self.w_nat - self.lr * (self.w_nat - target_nat), min=0.0)
        total = w_adv + w_nat
        self.w_adv = w_adv / total
        self.w_nat = w_nat / total
        return self.w_adv, self.w_nat

    def to(self, device: torch.device | str) -> "LossBalance":
        self.w_adv = self.w_adv.to(device)
        self.w_nat = self.w_nat.to(device)
        if self.loss_adv_0 is not None and self.loss_nat_0 is not None:
            self.loss_adv_0 = self.loss_adv_0.to(device)
            self.loss_nat_0 = self.loss_nat_0.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "beta": self.beta,
            "w_adv": float(self.w_adv),
            "w_nat": float(self.w_nat),
            "loss_adv_0": None if self.loss_adv_0 is None else float(self.loss_adv_0),
            "loss_nat_0": None if self.loss_nat_0 is None else float(self.loss_nat_0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.w_adv.device
        self.lr = float(state["lr"])
        self.beta = float(state["beta"])
        self.w_adv = torch.tensor(float(state["w_adv"]), device=device)
        self.w_nat = torch.tensor(float(state["w_nat"]), device=device)
        self.loss_adv_0 = self.loss_nat_0 = None
        if state.get("loss_adv_0") is not None:
            self.loss_adv_0 = torch.tensor(float(state["loss_adv_0"]), device=device)
            self.loss_nat_0 = torch.tensor(float(state["loss_nat_0"]), device=device)
