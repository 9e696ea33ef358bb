"""AutoAttack (standard version) and the Square black-box attack, through ``pyautoattack``.

The only module that imports pyautoattack: the training core and every other attack run without it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pyautoattack
import torch
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from tune_mtard.attacks.base import Attack, AutoAttackSettingsError, frozen_parameters, model_device

# The standard version of AutoAttack (Croce & Hein, 2020), as its README and _set_version define it.
AUTOATTACK_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_TARGET_CLASSES = 9
AUTOATTACK_SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8


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
