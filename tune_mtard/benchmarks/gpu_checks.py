"""The GPU fast path's checks (docs/gpu.md): plain functions that ``bench gpu`` runs and ``tests/test_cuda.py``
calls, so a GPU owner needs neither pytest nor the orchestration stack.

Each check trains B-MTARD on a synthetic CIFAR-shaped dataset (random uint8 images with CIFAR's crop and
flip; the checks are about the loop, not about learning) with a ResNet-18 student and small teachers of
random weights, returns what it measured, and raises :class:`CheckFailed` when the fast path breaks its
promise. On a CPU every check runs too (the sync check then checks nothing): the tests run them small there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from tune_mtard.attacks import PGD
from tune_mtard.config import Config
from tune_mtard.data import DataBundle, Split, iterate_batches
from tune_mtard.engine import EpochResult, Trainer
from tune_mtard.evaluation import eval_mode
from tune_mtard.metrics import TRACE_COLUMNS
from tune_mtard.models import create_model
from tune_mtard.perf import PerfOptions

PERF_OPTIONS = ("bf16", "channels_last", "compile", "data_on_device")
# "fp32": every option off (the data then stays on the host and goes through the pinned-memory path); "all":
# every option on, compile included (compiling is the slow part of the checks, so it is compiled once).
SYNC_CHECK_OPTIONS = ("fp32", "bf16", "channels_last", "data_on_device", "all")
LOSSES = [2 + TRACE_COLUMNS.index(name) for name in ("loss_adv", "loss_nat")]  # trace columns after step, epoch
# bf16 keeps 8 mantissa bits in every conv/linear output; its PGD examples can differ in the odd pixel.
BF16_FIRST_STEP_RTOL = 0.05
BF16_EPOCH_MEAN_RTOL = 0.10
# channels_last changes only the order of float sums (cuDNN picks other algorithms), in strict fp32: the first
# step agrees to float precision; then PGD's sign steps turn last-bit differences into whole step_size moves of
# the odd pixel, and SGD carries them on.
CHANNELS_LAST_FIRST_STEP_RTOL = 1e-3
CHANNELS_LAST_EPOCH_RTOL = 1e-2
# Compiled and eager bf16 runs: Inductor fuses differently, each rounding to bf16 in other places.
COMPILE_RTOL = 0.05
TEACHER_LOGIT_SCALE = 20.0


def cifar_shaped(train_examples: int, val_examples: int, image_size: int = 32, seed: int = 0) -> DataBundle:
    """Random uint8 RGB images with random labels of ten classes, and CIFAR's augmentation (crop 4, flip): what a
    loop costs and computes does not depend on the pixels, and no dataset needs to be on the machine."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
        return Split(images, torch.randint(0, 10, (n,), generator=generator))

    return DataBundle(name="cifar-shaped", train=split(train_examples), val=split(val_examples),
                      test=split(val_examples), num_classes=10, in_channels=3, image_size=image_size,
                      crop_padding=4, hflip=True)


class CheckFailed(AssertionError):
    """The GPU fast path did not keep a promise; the message says which and by how much."""


@dataclass(frozen=True)
class CheckSetup:
    """What the checks train: a CIFAR-shaped dataset of ``train_examples`` (four full batches and a smaller
    last one by default, so the last-batch path runs), a student and two teachers of random weights."""

    device: torch.device
    student: str = "resnet18"
    clean_teacher: str = "resnet56"
    robust_teacher: str = "preact_resnet18"
    image_size: int = 32
    train_examples: int = 576
    val_examples: int = 128
    batch_size: int = 128
    attack_steps: int = 3
    seed: int = 0

    def config(self, **perf: bool) -> Config:
        """The run config with every ``perf`` option off except those given."""
        values: dict[str, Any] = {
            "name": "gpu-checks", "seed": self.seed, "device": str(self.device), "method": "b-mtard",
            "data.batch_size": self.batch_size, "student.arch": self.student,
            "teachers.clean.arch": self.clean_teacher, "teachers.robust.arch": self.robust_teacher,
            "attack.steps": self.attack_steps, "train.epochs": 3, "train.lr": 0.01, "train.lr_milestones": [],
            "eval.n_examples": self.val_examples, "eval.pgd_steps": 2, "eval.batch_size": self.val_examples,
        }
        values.update({f"perf.{name}": bool(perf.get(name, False)) for name in PERF_OPTIONS})
        return Config().with_values(values)

    def data(self) -> DataBundle:
        return cifar_shaped(self.train_examples, self.val_examples, self.image_size, self.seed)

    def teachers(self) -> dict[str, nn.Module]:
        """Random teachers whose logits are scaled up so their soft labels are confident, as trained teachers'
        are: near-uniform soft labels would make the distillation losses small differences of nearly equal
        numbers, whose relative error says nothing about the fast path."""
        torch.manual_seed(self.seed + 1)
        teachers = {"clean": create_model(self.clean_teacher, 10, 3),
                    "robust": create_model(self.robust_teacher, 10, 3)}
        for teacher in teachers.values():
            classifier = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                classifier.weight.mul_(TEACHER_LOGIT_SCALE)
                classifier.bias.mul_(TEACHER_LOGIT_SCALE)
        return teachers

    def trainer(self, **perf: bool) -> Trainer:
        """A trainer with these ``perf`` options; the same initial weights and batches whatever they are."""
        return Trainer(self.config(**perf), self.data(), self.teachers(), self.device)


@contextmanager
def sync_debug_errors(device: torch.device) -> Iterator[None]:
    """Any call that makes the host wait for the GPU raises, for the duration (nothing on a CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """Deterministic cuDNN algorithms (and no autotuning), so the same computation twice gives the same bits."""
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


@contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 allowed, or not, for cuDNN convolutions and CUDA matmuls, for the duration."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32" if allowed else "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


@contextmanager
def reproducible_fp32() -> Iterator[None]:
    """Deterministic cuDNN and TF32 off: runs that differ only in memory layout or data placement compare in fp32."""
    with deterministic_cudnn(), tf32(allowed=False):
        yield


def train_epoch_checking_syncs(trainer: Trainer) -> EpochResult:
    """``trainer.train_epoch()`` with the loader and every step inside :func:`sync_debug_errors`; the copy of the
    epoch's trace to the host and validation, which wait for the GPU by design, run after it."""
    epoch_batches = trainer.epoch_batches

    def checked(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = epoch_batches(epoch)
        with sync_debug_errors(trainer.device):
            yield from batches

    trainer.epoch_batches = checked  # type: ignore[method-assign]
    try:
        return trainer.train_epoch()
    finally:
        del trainer.epoch_batches
        if trainer.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def _losses(trainer: Trainer) -> torch.Tensor:
    return trainer.trace[:, LOSSES]


def _relative_gap(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((value - reference).abs() / reference.abs().clamp_min(1e-12)).max())


# ---------------------------------------------------------------------------------------------- checks


def check_no_host_sync(setup: CheckSetup, option: str) -> dict[str, Any]:
    """An epoch with ``option`` on (one of :data:`SYNC_CHECK_OPTIONS`) never makes the host wait for the GPU
    between its first batch and its last step; an untimed epoch first compiles and warms up."""
    if option not in SYNC_CHECK_OPTIONS:
        raise ValueError(f"unknown option {option!r} (valid: {', '.join(SYNC_CHECK_OPTIONS)})")
    perf = {name: option in (name, "all") for name in PERF_OPTIONS}
    trainer = setup.trainer(**perf)
    start = time.perf_counter()
    trainer.train_epoch()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    train_epoch_checking_syncs(trainer)
    return {"option": option, "perf": dataclasses.asdict(trainer.perf), "sync_checked": setup.device.type == "cuda",
            "steps_checked": int((trainer.trace[:, 1] == trainer.epoch).sum()), "warmup_epoch_s": warmup_s,
            "checked_epoch_s": time.perf_counter() - start}


def check_bf16_close_to_fp32(setup: CheckSetup) -> dict[str, Any]:
    """bf16 autocast gives the first step's losses within 5% of fp32 and an epoch's mean losses within 10%."""
    runs = {}
    for bf16 in (False, True):
        trainer = setup.trainer(bf16=bf16)
        trainer.train_epoch()
        runs[bf16] = _losses(trainer)
    if not torch.isfinite(runs[True]).all():
        raise CheckFailed(f"bf16 losses are not finite: {runs[True].tolist()}")
    first = _relative_gap(runs[True][0], runs[False][0])
    mean = _relative_gap(runs[True].mean(0), runs[False].mean(0))
    result = {"first_step_relative_gap": first, "epoch_mean_relative_gap": mean,
              "fp32_epoch_mean_losses": runs[False].mean(0).tolist(),
              "bf16_epoch_mean_losses": runs[True].mean(0).tolist()}
    if first > BF16_FIRST_STEP_RTOL or mean > BF16_EPOCH_MEAN_RTOL:
        raise CheckFailed(f"bf16 losses too far from fp32 (first step {first:.3g} > {BF16_FIRST_STEP_RTOL} or "
                          f"epoch mean {mean:.3g} > {BF16_EPOCH_MEAN_RTOL}): {result}")
    return result


def check_teachers_stored_for_the_fast_path(setup: CheckSetup) -> dict[str, Any]:
    """Under bf16 and channels_last the teachers' convolution and linear weights are bf16 and NHWC, and they give
    exactly what the fp32 teachers give when autocast casts them at every forward."""
    trainer = setup.trainer(bf16=True, channels_last=True)
    given = setup.teachers()
    x, _ = next(trainer.epoch_batches(0))
    x = trainer._to_input(x)
    result = {}
    with reproducible_fp32():
        for role, teacher in (("clean", trainer.objective.teacher_clean), ("robust", trainer.objective.teacher_robust)):
            convs = [m.weight for m in teacher.modules() if isinstance(m, nn.Conv2d)]
            dtypes = {str(w.dtype) for w in convs}
            nhwc = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.dim() == 4)
            reference = given[role].to(setup.device).eval().to(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
                identical = torch.equal(teacher(x), reference(x))
            result[role] = {"conv_weight_dtypes": sorted(dtypes), "channels_last": nhwc, "outputs_identical": identical}
            if dtypes != {"torch.bfloat16"} or not nhwc or not identical:
                raise CheckFailed(f"teacher {role} is not stored for the fast path: {result[role]}")
    return result


def check_channels_last_matches_nchw(setup: CheckSetup) -> dict[str, Any]:
    """In strict fp32, an epoch in channels_last gives NCHW's trace: its first step within a relative 1e-3, every
    step within 1e-2."""
    traces = {}
    with reproducible_fp32():
        for channels_last in (False, True):
            trainer = setup.trainer(channels_last=channels_last)
            trainer.train_epoch()
            traces[channels_last] = trainer.trace[:, 2:]
    first = _relative_gap(traces[True][0], traces[False][0])
    epoch = _relative_gap(traces[True], traces[False])
    result = {"first_step_relative_gap": first, "epoch_relative_gap": epoch}
    if first > CHANNELS_LAST_FIRST_STEP_RTOL or epoch > CHANNELS_LAST_EPOCH_RTOL:
        raise CheckFailed(f"channels_last trace differs from NCHW (first step > {CHANNELS_LAST_FIRST_STEP_RTOL} or "
                          f"any step > {CHANNELS_LAST_EPOCH_RTOL}, relative): {result}")
    return result


def check_data_on_device_is_bit_identical(setup: CheckSetup) -> dict[str, Any]:
    """The loader yields the same bits from a split on the host (pinned copies) and on the device, and an epoch
    with the data on the device gives the same trace, bit for bit, as one with it on the host. Also reports where
    each run's training images lived (on a CPU both on the host: the check then compares a path with itself)."""
    data = setup.data()
    kwargs = {"shuffle": True, "crop_padding": data.crop_padding, "hflip": data.hflip}
    from_host = iterate_batches(data.train, setup.batch_size, generator=torch.Generator().manual_seed(1),
                                device=setup.device, **kwargs)
    from_device = iterate_batches(data.train.to(setup.device), setup.batch_size,
                                  generator=torch.Generator().manual_seed(1), **kwargs)
    batches_identical = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                            for a, b in zip(from_host, from_device, strict=True))
    traces, images = {}, {}
    with reproducible_fp32():
        for on_device in (False, True):
            trainer = setup.trainer(data_on_device=on_device)
            trainer.train_epoch()
            traces[on_device], images[on_device] = trainer.trace, trainer.data.train.images
    result = {"batches_identical": batches_identical, "traces_identical": torch.equal(traces[True], traces[False]),
              "trace_max_abs_gap": float((traces[True] - traces[False]).abs().max()),
              "images_of_each_run": {"host": f"{images[False].device.type} {images[False].dtype}",
                                     "device": f"{images[True].device.type} {images[True].dtype}"}}
    if not (result["batches_identical"] and result["traces_identical"]):
        raise CheckFailed(f"data on the device changes the run: {result}")
    return result


def check_evaluation_ignores_tf32(setup: CheckSetup) -> dict[str, Any]:
    """Validation and its PGD examples are the same, bit for bit, whether the caller allows TF32 or not: evaluation
    runs in strict fp32. Also reports whether TF32 changes the student's raw logits on this card, i.e. whether
    the check could have failed here (TF32 exists on Ampere and later)."""
    trainer = setup.trainer()
    val = setup.data().val
    x, y = val.floats().to(setup.device), val.labels.to(setup.device)
    attack = PGD(trainer.student, trainer.cfg.attack.epsilon, trainer.cfg.eval.pgd_step_size,
                 trainer.cfg.eval.pgd_steps)
    metrics, examples, logits = {}, {}, {}
    for allowed in (True, False):
        with tf32(allowed), deterministic_cudnn(), eval_mode(trainer.student):
            metrics[allowed] = trainer.validate()
            torch.manual_seed(0)
            examples[allowed] = attack(x, y)
            with torch.no_grad():
                logits[allowed] = trainer.student(x)
    result = {"validation_with_tf32_allowed": metrics[True], "validation_with_tf32_off": metrics[False],
              "pgd_examples_identical": torch.equal(examples[True], examples[False]),
              "tf32_changes_raw_logits": not torch.equal(logits[True], logits[False])}
    if metrics[True] != metrics[False] or not result["pgd_examples_identical"]:
        raise CheckFailed(f"evaluation depends on the caller's TF32 setting: {result}")
    return result


def check_compile_steady_state(setup: CheckSetup, epochs: int = 3) -> dict[str, Any]:
    """With every option on, ``torch.compile`` builds its graphs in the first epoch and none after (four: train and
    eval mode, full and last batch), within Dynamo's cache limit, and the first epoch's mean losses are within 5%
    of the same run's eager."""
    from torch._dynamo.utils import counters

    eager = setup.trainer(bf16=True, channels_last=True, data_on_device=True)
    eager.train_epoch()
    trainer = setup.trainer(**{name: True for name in PERF_OPTIONS})
    counters.clear()
    graphs = []
    for _ in range(epochs):
        trainer.train_epoch()
        graphs.append(counters["stats"]["unique_graphs"])
    limit = torch._dynamo.config.recompile_limit
    gap = _relative_gap(_losses(trainer)[trainer.trace[:, 1] == 1].mean(0), _losses(eager).mean(0))
    result = {"graphs_after_each_epoch": graphs, "recompile_limit": limit, "first_epoch_loss_relative_gap": gap}
    if any(g != graphs[0] for g in graphs) or graphs[0] >= limit:
        raise CheckFailed(f"torch.compile kept building graphs after the first epoch or reached its limit: {result}")
    if gap > COMPILE_RTOL:
        raise CheckFailed(f"compiled losses differ from eager by {gap:.3g} (relative) > {COMPILE_RTOL}")
    return result


def check_bf16_auto_matches_the_card(setup: CheckSetup) -> dict[str, Any]:
    """``perf.bf16: auto`` is on exactly when the card has native bf16 (compute capability 8 or more)."""
    cfg = Config().with_values({"device": str(setup.device)})
    perf = PerfOptions.resolve(cfg, setup.device)
    native = setup.device.type == "cuda" and torch.cuda.get_device_properties(setup.device).major >= 8
    result = {"bf16_auto": perf.bf16, "native_bf16": native}
    if perf.bf16 != native:
        raise CheckFailed(f"bf16: auto resolved to {perf.bf16} on a card with native bf16 {native}")
    return result


def all_checks(setup: CheckSetup) -> dict[str, Any]:
    """Every check by name, as a zero-argument callable, in the order ``bench gpu`` runs them."""
    checks: dict[str, Any] = {f"no_host_sync[{option}]": (lambda option=option: check_no_host_sync(setup, option))
                              for option in SYNC_CHECK_OPTIONS}
    checks.update({
        "bf16_close_to_fp32": lambda: check_bf16_close_to_fp32(setup),
        "teachers_stored_for_the_fast_path": lambda: check_teachers_stored_for_the_fast_path(setup),
        "channels_last_matches_nchw": lambda: check_channels_last_matches_nchw(setup),
        "data_on_device_is_bit_identical": lambda: check_data_on_device_is_bit_identical(setup),
        "evaluation_ignores_tf32": lambda: check_evaluation_ignores_tf32(setup),
        "compile_steady_state": lambda: check_compile_steady_state(setup),
        "bf16_auto_matches_the_card": lambda: check_bf16_auto_matches_the_card(setup),
    })
    return checks
