"""Adversarial attacks, all with one call shape: ``attack(images, labels) -> adv_images``.

Every attack is an object built from the model it attacks and its settings (torchattacks style), so
evaluation is a loop over names (``build_attack``). Images are float tensors in [0, 1]; epsilons and
step sizes are in the same units (``8/255``). An attack returns a tensor of the input's shape on the
input's device, runs in fp32 whatever autocast the caller has on (training PGD may opt in to the caller's
bf16, ``TrainPGD(keep_autocast=True)``), takes gradients with respect to the input only (the parameters'
``.grad`` stay as they were) and leaves the model's train/eval mode alone: callers put the model in eval mode.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pyautoattack
import torch
import torch.nn.functional as F
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from tune_mtard.config import ATTACKS as ATTACK_NAMES  # defined where configs are checked, without torch

# The standard version of AutoAttack (Croce & Hein, 2020), as its README and _set_version define it.
AUTOATTACK_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_TARGET_CLASSES = 9
AUTOATTACK_SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8

# The reference's training attack starts from x + 0.001 * N(0, I) (SPEC section 4, step 1).
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
        with torch.autocast(device.type, enabled=False):
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
    is_label = F.one_hot(labels, logits.shape[1]).bool()
    correct = logits[is_label]
    best_other = logits.masked_fill(is_label, float("-inf")).amax(dim=1)
    return -F.relu(correct - best_other + confidence).sum()


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


class Clean(Attack):
    """The identity: clean accuracy through the same interface."""

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        return images.clone()


class TrainPGD(Attack):
    """The training attack of SPEC section 4, step 1.

    ``x' = x + 0.001 * N(0, I)`` (global RNG), then ``steps`` times
    ``x' <- clip_[0,1](Proj_{||x'-x||inf <= epsilon}(x' + step_size * sign(grad CE(S(x'), y))))``.
    As in the reference, the noisy start is not clipped before the first step. ``steps=0`` gives ``x``.

    ``keep_autocast=True`` lets the model's forward and backward run under the caller's autocast (bf16
    training on a GPU) instead of fp32; the examples themselves stay fp32. Only training opts in:
    evaluation attacks always run in fp32.
    """

    def __init__(self, model: nn.Module, epsilon: float, step_size: float, steps: int, keep_autocast: bool = False):
        super().__init__(model)
        self.epsilon = float(epsilon)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.keep_autocast = keep_autocast

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
        x_adv = images + TRAIN_PGD_NOISE * torch.randn_like(images)
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
            noise = torch.empty_like(images).uniform_(-self.epsilon, self.epsilon)
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


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration.

    pyautoattack's FAB calls ``backward()``, which would otherwise accumulate into the parameters' ``.grad``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def caller_rng_kept(device: torch.device) -> AbstractContextManager:
    """pyautoattack reseeds the global RNGs on every call; this gives the caller its streams back afterwards."""
    cuda_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda_devices)


class _StageRecordingAutoAttack(pyautoattack.AutoAttack):
    """pyautoattack's AutoAttack, also counting how many points each stage turns non-robust.

    ``run_standard_evaluation`` keeps its per-stage robust accuracies in a local variable. Rather than
    re-implementing its loop, each stage's ``perturb`` is wrapped to remember which stage (and which
    labels) it just ran, and ``get_logits``, which the loop calls exactly once on every stage's output
    to decide which points fell, counts them with the loop's own logits.
    """

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self.fooled: dict[str, int] = {}
        self._just_ran: tuple[str, Tensor] | None = None
        for attack in (self.apgd, self.apgd_targeted, self.fab, self.square):
            attack.perturb = self._recording(attack, attack.perturb)

    def _stage_of(self, attack: object) -> str:
        if attack is self.apgd:
            return "apgd-ce" if self.apgd.loss == "ce" else "apgd-dlr"
        if attack is self.apgd_targeted:
            return "apgd-t"
        if attack is self.fab:
            return "fab-t" if self.fab.targeted else "fab"
        return "square"

    def _recording(self, attack: object, perturb: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def recording_perturb(x: Tensor, y: Tensor, *args, **kwargs) -> Tensor:
            adv = perturb(x, y, *args, **kwargs)
            self._just_ran = (self._stage_of(attack), y)
            return adv

        return recording_perturb

    def get_logits(self, x: Tensor) -> Tensor:
        logits = super().get_logits(x)
        if self._just_ran is not None:
            stage, y = self._just_ran
            self._just_ran = None
            fooled = ~y.eq(logits.max(dim=1)[1])  # the loop's own test of which points fell
            self.fooled[stage] = self.fooled.get(stage, 0) + int(fooled.sum())
        return logits

    def reset_counts(self) -> None:
        self.fooled = {}
        self._just_ran = None

    def counted_every_stage(self) -> bool:
        """False when a stage's output went uncounted (the package's loop no longer works as assumed)."""
        return self._just_ran is None


class AutoAttack(Attack):
    """Standard AutoAttack (Linf): APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries).

    Wraps ``pyautoattack`` (fra31/auto-attack). Each stage attacks only the points still robust, so
    after a call ``per_attack_accuracy`` maps each stage to the robust accuracy after it (cumulative, as
    AutoAttack reports it); the last one is the AutoAttack accuracy. Datasets with fewer than 10 classes
    get ``num_classes - 1`` target classes, recorded in ``notes``. The model must be in eval mode.
    Call it once on the whole evaluation set: it batches internally (``batch_size``).
    ``seed`` fixes pyautoattack's seed so runs repeat; the caller's RNG streams are left as they were.
    """

    attacks_whole_set = True

    def __init__(
        self,
        model: nn.Module,
        epsilon: float,
        num_classes: int,
        version: str = "standard",
        batch_size: int = 256,
        seed: int = 0,
    ):
        if version != "standard":
            raise ValueError(f"AutoAttack version {version!r} is not supported (only 'standard')")
        if num_classes < 4:
            raise ValueError(f"AutoAttack's APGD-T needs at least 4 classes; the dataset has {num_classes}")
        super().__init__(model)
        self.epsilon = float(epsilon)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.n_target_classes = min(AUTOATTACK_TARGET_CLASSES, self.num_classes - 1)
        self.notes: list[str] = []
        if self.n_target_classes < AUTOATTACK_TARGET_CLASSES:
            self.notes.append(
                f"APGD-T and FAB-T use {self.n_target_classes} target classes (dataset has {self.num_classes} classes)"
            )
        self.adversary = _StageRecordingAutoAttack(
            model, device=model_device(model), eps=self.epsilon, norm="Linf", seed=seed, version=version
        )
        self.adversary.apgd_targeted.n_target_classes = self.n_target_classes
        self.adversary.fab.n_target_classes = self.n_target_classes
        self.per_attack_accuracy: dict[str, float] = {}
        self.check_standard_settings()

    def expected_settings(self) -> dict[str, object]:
        """Dotted attribute paths of the pyautoattack object and the values the standard version needs."""
        expected: dict[str, object] = {
            "version": "standard",
            "attacks_to_run": list(AUTOATTACK_STAGES),
            "norm": "Linf",
            "epsilon": self.epsilon,
            "apgd.n_restarts": 1,
            "apgd.n_iter": 100,
            "apgd.eot_iter": 1,
            "apgd_targeted.n_restarts": 1,
            "apgd_targeted.n_iter": 100,
            "apgd_targeted.n_target_classes": self.n_target_classes,
            "fab.n_restarts": 1,
            "fab.n_iter": 100,
            "fab.n_target_classes": self.n_target_classes,
            "square.n_queries": AUTOATTACK_SQUARE_QUERIES,
            "square.p_init": SQUARE_P_INIT,
            "square.n_restarts": 1,
        }
        for attack in ("apgd", "apgd_targeted", "fab", "square"):
            expected[f"{attack}.norm"] = "Linf"
            expected[f"{attack}.eps"] = self.epsilon
        return expected

    def check_standard_settings(self) -> None:
        """Raise ``AutoAttackSettingsError`` unless the pyautoattack object is set up to run standard AutoAttack."""
        missing = object()
        wrong = []
        for path, want in self.expected_settings().items():
            value: object = self.adversary
            for name in path.split("."):
                value = getattr(value, name, missing)
            if value is missing:
                wrong.append(f"{path} is missing")
            elif value != want:
                wrong.append(f"{path} is {value!r}, expected {want!r}")
        if wrong:
            raise AutoAttackSettingsError("pyautoattack is not set up for standard AutoAttack: " + "; ".join(wrong))

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        if self.model.training:
            raise AutoAttackSettingsError("AutoAttack needs the model in eval mode (call model.eval() first)")
        self.check_standard_settings()
        self.adversary.reset_counts()
        with frozen_parameters(self.model), caller_rng_kept(images.device):
            adv, predictions = self.adversary.run_standard_evaluation(images, labels, batch_size=self.batch_size)
        if not self.adversary.counted_every_stage():
            raise AutoAttackSettingsError("pyautoattack's evaluation loop changed: cannot count per-stage accuracies")
        # The loop's robust flags are exactly ``predictions == labels``; each stage's count is added back
        # going backwards from the end to get the robust accuracy after every stage.
        n = labels.shape[0]
        robust = int(predictions.eq(labels).sum())
        accuracy_after = {}
        for stage in reversed(AUTOATTACK_STAGES):
            accuracy_after[stage] = robust / n
            robust += self.adversary.fooled.get(stage, 0)
        self.per_attack_accuracy = {stage: accuracy_after[stage] for stage in AUTOATTACK_STAGES}
        return adv


class Square(Attack):
    """Square Attack (Andriushchenko et al.), score-based black-box, Linf, with a query budget.

    Uses pyautoattack's ``SquareAttack`` with AutoAttack's ``p_init = 0.8`` and one restart. Unlike
    AutoAttack's fixed 5000-query run, the schedule of square sizes is rescaled to ``n_queries``
    (the package's default), so small budgets still shrink the squares.
    """

    def __init__(self, model: nn.Module, epsilon: float, n_queries: int = 100, seed: int = 0):
        super().__init__(model)
        self.epsilon = float(epsilon)
        self.n_queries = int(n_queries)
        self.square = SquareAttack(
            model,
            norm="Linf",
            n_queries=self.n_queries,
            eps=self.epsilon,
            p_init=SQUARE_P_INIT,
            n_restarts=1,
            seed=seed,
            verbose=False,
            resc_schedule=True,
            device=model_device(model),
        )

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad(), caller_rng_kept(images.device):
            return self.square.perturb(images, labels)


def build_attack(
    name: str,
    model: nn.Module,
    *,
    epsilon: float,
    num_classes: int | None = None,
    pgd_step_size: float = 2 / 255,
    pgd_steps: int = 20,
    batch_size: int = 256,
    square_queries: int = 100,
) -> Attack:
    """The attack called ``name`` (one of ``ATTACK_NAMES``) against ``model``.

    ``pgd20`` is PGD with ``pgd_steps`` steps of ``pgd_step_size`` and a random start; ``aa`` is standard
    AutoAttack and needs ``num_classes``; ``square`` is Square Attack with ``square_queries`` queries.
    """
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r} (valid names: {', '.join(ATTACK_NAMES)})")
    if name == "clean":
        return Clean(model)
    if name == "fgsm":
        return FGSM(model, epsilon)
    if name == "pgd20":
        return PGD(model, epsilon, pgd_step_size, pgd_steps, random_start=True)
    if name == "cw":
        return CWInf(model, epsilon)
    if name == "square":
        return Square(model, epsilon, n_queries=square_queries)
    if num_classes is None:
        raise ValueError("attack 'aa' needs num_classes")
    return AutoAttack(model, epsilon, num_classes, batch_size=batch_size)
