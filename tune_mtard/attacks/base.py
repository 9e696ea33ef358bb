"""What every attack shares: one call shape, ``attack(images, labels) -> adv_images`` (torchattacks style).

Every attack is an object built from the model it attacks and its settings, so evaluation is a loop over
names (:func:`tune_mtard.attacks.build_attack`). Images are float tensors in [0, 1]; epsilons and step
sizes are in the same units (``8/255``). An attack returns a tensor of the input's shape on the input's
device, runs in strict fp32 (:func:`strict_fp32`: no autocast, no TF32) whatever the caller has on (training
PGD may opt in to the caller's bf16, ``TrainPGD(keep_autocast=True)``), takes gradients with respect to the
input only (the parameters' ``.grad`` stay as they were) and leaves the model's train/eval mode alone:
callers put the model in eval mode.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.distributed import global_noise

# The reference's training attack starts from x + 0.001 * N(0, I) (docs/algorithm.md, step 1).
TRAIN_PGD_NOISE = 0.001
# Confidence of the CW loss in the TRADES / MTARD evaluation scripts' CW-inf attack.
CW_CONFIDENCE = 50.0

LossFn = Callable[[Tensor, Tensor], Tensor]


class AutoAttackSettingsError(RuntimeError):
    """The installed pyautoattack would not run the standard AutoAttack the results claim to be."""

def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter (or buffer); ``default`` (or CPU) for a model without either."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    if tensor is not None:
        return tensor.device
    return default if default is not None else torch.device("cpu")


@contextmanager
def strict_fp32(device_type: str) -> Iterator[None]:
    """fp32 arithmetic for the duration: autocast off, and TF32 off for cuDNN convolutions and CUDA matmuls.

    cuDNN runs fp32 convolutions in TF32 (10 mantissa bits) on Ampere and later cards unless told not to, so
    switching autocast off is not enough for an fp32 evaluation. The caller's settings come back afterwards.
    """
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration.

    A backward pass then computes the input's gradient only: pyautoattack's FAB calls ``backward()``, which
    would otherwise accumulate into the parameters' ``.grad``, and a compiled model's backward (AOTAutograd)
    computes a gradient for every input of its graph that requires one.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


class Attack(ABC):
    """Base class: ``__call__`` moves the batch to the model's device in fp32, ``perturb`` does the attack."""

    # True when the attack must see the whole evaluation set in one call (it batches internally).
    attacks_whole_set = False

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        device = model_device(self.model, images.device)
        x = images.detach().to(device=device, dtype=torch.float32)
        y = labels.detach().to(device)
        with strict_fp32(device.type):
            adv = self.perturb(x, y)
        return adv.detach().to(images.device)

    @abstractmethod
    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial examples for fp32 ``images`` and ``labels`` already on the model's device."""


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    # Summed as in the reference: the sign of the input gradient is that of the mean, without its underflow.
    return F.cross_entropy(logits, labels, reduction="sum")


def cw_loss(logits: Tensor, labels: Tensor, confidence: float = CW_CONFIDENCE) -> Tensor:
    """The CW-inf loss of the TRADES / MTARD evaluation scripts: ``-sum(relu(z_y - max_{j!=y} z_j + confidence))``.

    Ascending it raises the margin ``max_{j!=y} z_j - z_y`` until it passes ``confidence``.
    """
    correct = logits.gather(1, labels[:, None]).squeeze(1)  # not logits[mask]: a data-dependent shape syncs a GPU
    is_label = F.one_hot(labels, logits.shape[1]).bool()
    best_other = logits.masked_fill(is_label, float("-inf")).amax(dim=1)
    return -F.relu(correct - best_other + confidence).sum()


def standard_normal(like: Tensor) -> Tensor:
    """N(0, I) noise of ``like``'s shape, dtype and device, drawn in NCHW order.

    ``torch.randn_like`` keeps a channels_last tensor's memory format and fills it in memory order, so each
    pixel would get another draw than in NCHW and a channels_last run another random start. In a step of a
    multi-worker run, the rows of the global batch's noise that this worker trains (tune_mtard/distributed.py).
    """
    sharded = global_noise(like)
    return sharded if sharded is not None else torch.randn(like.shape, dtype=like.dtype, device=like.device)


def input_gradient(model: nn.Module, loss_fn: LossFn, images: Tensor, labels: Tensor) -> Tensor:
    """Gradient of ``loss_fn(model(images), labels)`` with respect to the images only."""
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(images), labels)
        (grad,) = torch.autograd.grad(loss, [images])
    return grad


def sign_step(x_adv: Tensor, x: Tensor, grad: Tensor, step_size: float, epsilon: float) -> Tensor:
    """``clip_[0,1](Proj_{||x_adv - x||inf <= epsilon}(x_adv + step_size * sign(grad)))``."""
    x_adv = x_adv + step_size * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon)
    return x_adv.clamp(0.0, 1.0)
