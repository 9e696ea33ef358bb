"""What every training objective shares: the call shape, the training PGD, the distillation loss and the
trace row.

Every ``step(x, y)`` returns ``(loss, trace)`` where ``trace`` holds the step's
:data:`~tune_mtard.metrics.TRACE_COLUMNS` as one float32 tensor kept on the device; a column a method
does not have is NaN.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.attacks import TrainPGD, frozen_parameters, standard_normal
from tune_mtard.metrics import TRACE_COLUMNS

if TYPE_CHECKING:
    from tune_mtard.config import Config

Autocast = Callable[[], contextlib.AbstractContextManager]
Teachers = dict[str, nn.Module]  # role ("clean", "robust") -> frozen teacher in eval mode


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


# train.lr as compare --tune searches it for the methods whose loss is KL~ alone (rslad, mtard, b-mtard): KL~ is
# averaged over classes as well as the batch, which makes its gradients about an order of magnitude smaller
# than cross-entropy's, so the range is as wide as SHARED_SPACE's (a factor of 20) and five times higher
# (docs/methods.md, "Tuned comparisons").
KL_MEAN_LR_SPACE = {"train.lr": {"type": "float", "low": 0.05, "high": 1.0, "log": True}}


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


def trace_row(device: torch.device, **values: Any) -> torch.Tensor:
    """The step's trace row in :data:`TRACE_COLUMNS` order: tensors and numbers given, NaN for the rest."""
    row = [values.get(name, math.nan) for name in TRACE_COLUMNS]
    return torch.stack([v.detach().to(device, torch.float32).reshape(()) if isinstance(v, torch.Tensor)
                        else _constant(v, device) for v in row])


def kl_attack(student: nn.Module, x: torch.Tensor, target_probs: torch.Tensor, epsilon: float,
              step_size: float, steps: int, freeze_parameters: bool = False) -> torch.Tensor:
    """PGD that maximises KL(target || student(x')) from x + 0.001 N(0, I) (TRADES' and RSLAD's inner attack).

    ``freeze_parameters``: as :class:`~tune_mtard.attacks.TrainPGD`'s, for a compiled student."""
    x_adv = x.detach() + 0.001 * standard_normal(x)
    with frozen_parameters(student) if freeze_parameters else contextlib.nullcontext():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.autocast(x.device.type, enabled=False):
                loss = F.kl_div(F.log_softmax(student(x_adv).float(), dim=1), target_probs, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
    return x_adv.detach()


class Objective:
    """What every method provides to the loop. ``teachers`` holds the roles its registry entry names."""

    def __init__(self, cfg: Config, student: nn.Module, teachers: Teachers, autocast: Autocast = no_autocast):
        self.cfg = cfg
        self.student = student
        self.autocast = autocast
        self.traced: tuple[str, ...] = ()  # the trace columns this method fills (the others are NaN by design)
        # Training PGD runs under the objective's autocast (bf16 when perf.bf16); evaluation attacks stay fp32.
        # A compiled student's attack backward computes input gradients only if the weights are frozen meanwhile.
        self.freeze_in_attacks = bool(cfg.perf.compile)
        self.pgd = TrainPGD(student, cfg.attack.epsilon, cfg.attack.step_size, cfg.attack.steps,
                            keep_autocast=True, freeze_parameters=self.freeze_in_attacks)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step 1: PGD on the student in eval mode, then back to train mode."""
        self.student.eval()
        with self.autocast():
            x_adv = self.pgd(x, y)
        self.student.train()
        return x_adv

    def kl_adversarial(self, x: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        """TRADES' and RSLAD's inner attack (:func:`kl_attack` towards ``target_probs``) on the student in eval
        mode, then back to train mode."""
        a = self.cfg.attack
        self.student.eval()
        x_adv = kl_attack(self.student, x, target_probs, a.epsilon, a.step_size, a.steps, self.freeze_in_attacks)
        self.student.train()
        return x_adv

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def trace(self, device: torch.device, **values: Any) -> torch.Tensor:
        """This step's trace row (:func:`trace_row`); remembers which columns the method fills."""
        self.traced = tuple(name for name in TRACE_COLUMNS if name in values)
        return trace_row(device, **values)

    def set_lr_scale(self, scale: float) -> None:
        """Learning-rate milestones also decay the balancing learning rates (docs/algorithm.md, step 7)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def to(self, device: torch.device) -> Objective:
        return self
