"""White-box gradient attacks: the training PGD (docs/algorithm.md, step 1), evaluation PGD, CW-inf and FGSM."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from tune_mtard.attacks.base import (
    CW_CONFIDENCE,
    TRAIN_PGD_NOISE,
    Attack,
    cross_entropy_sum,
    cw_loss,
    frozen_parameters,
    input_gradient,
    model_device,
    sign_step,
    standard_normal,
)


class Clean(Attack):
    """The identity: clean accuracy through the same interface."""

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        return images.clone()


class TrainPGD(Attack):
    """The training attack of docs/algorithm.md, step 1.

    ``x' = x + 0.001 * N(0, I)`` (global RNG), then ``steps`` times
    ``x' <- clip_[0,1](Proj_{||x'-x||inf <= epsilon}(x' + step_size * sign(grad CE(S(x'), y))))``.
    As in the reference, the noisy start is not clipped before the first step. ``steps=0`` gives ``x``.

    ``keep_autocast=True`` lets the model's forward and backward run under the caller's autocast (bf16
    training on a GPU) instead of fp32; the examples themselves stay fp32. Only training opts in:
    evaluation attacks always run in fp32.

    ``freeze_parameters=True`` stops the parameters requiring grad during the attack, for a compiled model:
    its backward (AOTAutograd's) computes a gradient for every graph input that requires one, weights
    included, which ``autograd.grad`` then discards. Eager autograd computes the input's gradient only by
    itself, and there freezing would make bf16 autocast cast the weights again at every iteration (it
    caches casts only of tensors that require grad), so eager training leaves it off.
    """

    def __init__(self, model: nn.Module, epsilon: float, step_size: float, steps: int, keep_autocast: bool = False,
                 freeze_parameters: bool = False):
        super().__init__(model)
        self.epsilon = float(epsilon)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.keep_autocast = keep_autocast
        self.freeze_parameters = freeze_parameters

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        if not self.keep_autocast:
            return super().__call__(images, labels)
        device = model_device(self.model, images.device)
        x = images.detach().to(device=device, dtype=torch.float32)
        adv = self.perturb(x, labels.detach().to(device))
        return adv.detach().to(images.device)

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        if self.steps == 0:
            return images.clone()
        x_adv = images + TRAIN_PGD_NOISE * standard_normal(images)
        with frozen_parameters(self.model) if self.freeze_parameters else contextlib.nullcontext():
            for _ in range(self.steps):
                grad = input_gradient(self.model, cross_entropy_sum, x_adv, labels)
                x_adv = sign_step(x_adv, images, grad, self.step_size, self.epsilon)
        return x_adv


class PGD(Attack):
    """Evaluation PGD (Madry et al.) on the cross-entropy: uniform start in the eps-ball, sign steps."""

    def __init__(self, model: nn.Module, epsilon: float, step_size: float, steps: int, random_start: bool = True):
        super().__init__(model)
        self.epsilon = float(epsilon)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = random_start

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy_sum(logits, labels)

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        x_adv = images.clone()
        if self.random_start:
            # Drawn in NCHW order, as standard_normal: the same start whatever the images' memory format.
            noise = torch.empty(images.shape, dtype=images.dtype, device=images.device).uniform_(-self.epsilon,
                                                                                                 self.epsilon)
            x_adv = (x_adv + noise).clamp(0.0, 1.0)
        for _ in range(self.steps):
            grad = input_gradient(self.model, self.loss, x_adv, labels)
            x_adv = sign_step(x_adv, images, grad, self.step_size, self.epsilon)
        return x_adv


class CWInf(PGD):
    """CW-inf: PGD on the CW margin loss (``cw_loss``), as in the TRADES / MTARD evaluation scripts.

    The default step size is 2/255 at epsilon 8/255 and scales with epsilon (``epsilon / 4``).
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float,
        steps: int = 30,
        step_size: float | None = None,
        confidence: float = CW_CONFIDENCE,
        random_start: bool = True,
    ):
        step_size = epsilon / 4 if step_size is None else step_size
        super().__init__(model, epsilon, step_size, steps, random_start)
        self.confidence = float(confidence)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cw_loss(logits, labels, self.confidence)


class FGSM(Attack):
    """One signed-gradient step of size epsilon on the cross-entropy (Goodfellow et al.)."""

    def __init__(self, model: nn.Module, epsilon: float):
        super().__init__(model)
        self.epsilon = float(epsilon)

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        grad = input_gradient(self.model, cross_entropy_sum, images, labels)
        return sign_step(images, images, grad, self.epsilon, self.epsilon)
