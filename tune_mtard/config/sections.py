"""The sections of a run config (docs/configuration.md): one dataclass per section, its rules beside its fields.

Defaults are the paper's CIFAR-10 settings. Every ``check`` raises :class:`~tune_mtard.errors.ConfigError`
naming the dotted key at fault; names of datasets, architectures and methods are checked against their
registries (:mod:`tune_mtard.registry`). :class:`~tune_mtard.config.schema.Config` puts them together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Union

from tune_mtard.config.coerce import AUTO
from tune_mtard.config.rules import check_attack_names, require, require_name
from tune_mtard.data import DATASETS
from tune_mtard.data.folders import CROPS
from tune_mtard.methods import METHODS
from tune_mtard.methods.registry import method_settings
from tune_mtard.models import available_models


def _archs() -> list[str]:
    return available_models()


def dataset_channels(dataset: str) -> int:
    return DATASETS.get(dataset).channels


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str = "./data"
    download: bool = False
    val_fraction: float = 0.1
    batch_size: int = 128
    image_size: int = 224  # imagefolder: the side images are cropped to (docs/configuration.md, "Image folders")
    crop: str = "resized"  # imagefolder: resized (ImageNet's random resized crop) or padded (a 4-pixel crop)
    loader_workers: int = 2  # imagefolder: processes that decode and augment (0: the training process)

    def check(self) -> None:
        require_name(self.dataset, DATASETS.names(), "data.dataset", "dataset")
        require(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction:g}")
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        require(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        require_name(self.crop, list(CROPS), "data.crop", "crop")
        require(self.loader_workers >= 0, "data.loader_workers", "must be >= 0 (0: decode in the training process)")


@dataclass
class NormalizationConfig:
    """The mean and std (one value per channel) a model applies to its [0, 1] input; empty lists: none."""

    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def check(self, key: str, channels: int) -> None:
        require(len(self.mean) == len(self.std), f"{key}.std", f"needs as many values as {key}.mean "
                                                                f"({len(self.mean)}), got {len(self.std)}")
        require(len(self.mean) in (0, channels), f"{key}.mean",
                f"needs one value per input channel ({channels}), got {len(self.mean)}")
        require(all(v > 0 for v in self.std), f"{key}.std", f"values must be > 0, got {self.std}")


@dataclass
class StudentConfig:
    arch: str = "resnet18"
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)

    def check(self) -> None:
        require_name(self.arch, _archs(), "student.arch", "arch")


@dataclass
class TeacherConfig:
    """One teacher: its file, or ``checkpoint: auto`` and the recipe that trains it once (docs/methods.md)."""

    arch: str = "resnet56"
    checkpoint: str = AUTO
    sha256: str = ""  # pins the file: train checks it and never retrains (an exported best config sets it)
    recipe: str = "natural"  # a method that needs no teacher: natural, pgd-at or trades
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2.0e-4
    batch_size: int = 128
    trades_beta: float = 6.0
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)  # what its file was trained on

    def check(self, key: str, check_files: bool) -> None:
        require_name(self.arch, _archs(), f"{key}.arch", "arch")
        recipes = [name for name, spec in METHODS.items() if not spec.teachers]
        require_name(self.recipe, recipes, f"{key}.recipe", "recipe")
        require(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        require(self.lr > 0, f"{key}.lr", "must be > 0")
        require(0 <= self.momentum < 1, f"{key}.momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        require(self.trades_beta >= 0, f"{key}.trades_beta", "must be >= 0")
        require(self.sha256 == "" or (len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256)),
                f"{key}.sha256", "must be empty or the 64 hex digits of a sha256")
        require(bool(self.checkpoint), f"{key}.checkpoint", "must be a path or auto")
        if check_files and self.checkpoint != AUTO:
            path = Path(self.checkpoint).expanduser()
            require(path.is_file(), f"{key}.checkpoint", f"file not found: {path.resolve()} (train it with "
                                                         "python -m tune_mtard.teachers, or set checkpoint: auto)")


def _clean_teacher() -> TeacherConfig:
    return TeacherConfig(arch="resnet56", checkpoint="teachers/cifar10-resnet56-natural.pt")


def _robust_teacher() -> TeacherConfig:
    return TeacherConfig(arch="wrn34_10", checkpoint="teachers/cifar10-wrn34_10-trades.pt", recipe="trades")


@dataclass
class TeachersConfig:
    clean: TeacherConfig = field(default_factory=_clean_teacher)
    robust: TeacherConfig = field(default_factory=_robust_teacher)
    cache_dir: str = "./teachers/auto"  # where `checkpoint: auto` teachers are trained once and kept

    def check(self, check_files: bool) -> None:
        self.clean.check("teachers.clean", check_files)
        self.robust.check("teachers.robust", check_files)


@dataclass
class AttackConfig:
    """The training attack (docs/algorithm.md, step 1); ``epsilon`` is also the evaluation budget."""

    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10

    def check(self) -> None:
        require(self.epsilon >= 0, "attack.epsilon", f"must be >= 0, got {self.epsilon:g}")
        require(self.step_size > 0, "attack.step_size", f"must be > 0, got {self.step_size:g}")
        require(self.steps >= 0, "attack.steps", "must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2.0e-4
    lr_milestones: list[float] = field(default_factory=lambda: [0.7167, 0.8667, 0.95])  # fractions of epochs
    lr_gamma: float = 0.1
    workers: int = 1  # data-parallel workers of a run or trial, each on its shard of every batch (docs/scale.md)
    sync_batch_norm: bool = True  # with workers > 1: BatchNorm normalises by the global batch's statistics

    def check(self) -> None:
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
        require(self.workers >= 1, "train.workers", f"must be >= 1, got {self.workers}")
        require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr:g}")
        require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(all(0 < m <= 1 for m in self.lr_milestones), "train.lr_milestones",
                "fractions of train.epochs must be in (0, 1]")
        require(self.lr_milestones == sorted(self.lr_milestones), "train.lr_milestones", "must be increasing")
        require(0 < self.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]")


@dataclass
class BalanceConfig:
    """Entropy-Based Balance and Normalization Loss Balance (docs/algorithm.md, steps 4 and 5)."""

    entropy: bool = True
    loss: bool = True
    beta: float = 1.0
    tau_init: float = 1.0
    tau_min: float = 1.0
    tau_max: float = 10.0
    tau_lr: float = 0.001
    weight_lr: float = 0.025

    def check(self) -> None:
        require(self.beta > 0, "balance.beta", f"must be > 0, got {self.beta:g}")
        require(self.tau_min > 0, "balance.tau_min", f"must be > 0, got {self.tau_min:g}")
        require(self.tau_max > 0, "balance.tau_max", f"must be > 0, got {self.tau_max:g}")
        require(self.tau_min <= self.tau_max, "balance.tau_min",
                f"({self.tau_min:g}) must be <= balance.tau_max ({self.tau_max:g})")
        require(self.tau_init > 0, "balance.tau_init", f"must be > 0, got {self.tau_init:g}")
        require(self.tau_lr >= 0, "balance.tau_lr", f"must be >= 0, got {self.tau_lr:g}")
        require(0 <= self.weight_lr <= 1, "balance.weight_lr", f"must be in [0, 1], got {self.weight_lr:g}")


def _baselines_section() -> type:
    """The ``baselines`` section: the config keys the methods own, each declared beside its method's class
    (``register_method(..., settings=...)``, tune_mtard/methods/registry.py) with its default and rule."""
    owned = method_settings()

    def check(self) -> None:
        for name, (_, setting) in owned.items():
            require(setting.rule(getattr(self, name)), f"baselines.{name}", setting.must)

    fields = [(name, type(setting.default), field(default=setting.default)) for name, (_, setting) in owned.items()]
    return make_dataclass("BaselinesConfig", fields, namespace={
        "check": check, "__module__": __name__,
        "__doc__": "Settings of the methods that have their own (docs/methods.md): "
                   + ", ".join(f"{name} ({method})" for name, (method, _) in owned.items()) + ".",
    })


BaselinesConfig = _baselines_section()


@dataclass
class DiagnosticsConfig:
    """Thresholds of the balance diagnostics of each trial (docs/sensitivity.md, "Balance diagnostics")."""

    gap_narrowing: float = 0.5  # the entropy gap has narrowed once it is <= this fraction of its first epoch's
    gap_tolerance: float = 0.05  # a gap <= this fraction of the larger |entropy| counts as closed
    dominant_weight: float = 0.9  # loss_dominates: one loss weight above this at every step of the epoch

    def check(self) -> None:
        d = "diagnostics"
        require(0 < self.gap_narrowing <= 1, f"{d}.gap_narrowing", f"must be in (0, 1], got {self.gap_narrowing:g}")
        require(0 <= self.gap_tolerance < 1, f"{d}.gap_tolerance", f"must be in [0, 1), got {self.gap_tolerance:g}")
        require(0.5 < self.dominant_weight < 1, f"{d}.dominant_weight",
                f"must be in (0.5, 1) (the two weights sum to 1), got {self.dominant_weight:g}")


@dataclass
class EvalConfig:
    every: int = 1  # epochs between validation evaluations
    n_examples: int = 1000  # validation examples per evaluation
    pgd_steps: int = 20
    pgd_step_size: float = 2 / 255
    clean_weight: float = 0.5  # W-Robust Acc = clean_weight * clean + (1 - clean_weight) * robust
    final_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])
    final_n_examples: int = 0  # 0: the whole test split
    batch_size: int = 256

    def check(self) -> None:
        require(self.every >= 1, "eval.every", "must be >= 1")
        require(self.n_examples >= 1, "eval.n_examples", "must be >= 1")
        require(self.pgd_steps >= 1, "eval.pgd_steps", "must be >= 1")
        require(self.pgd_step_size > 0, "eval.pgd_step_size", "must be > 0")
        require(0 <= self.clean_weight <= 1, "eval.clean_weight", f"must be in [0, 1], got {self.clean_weight:g}")
        require(self.final_n_examples >= 0, "eval.final_n_examples", "must be >= 0 (0: the whole test split)")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        check_attack_names(self.final_attacks, "eval.final_attacks")


@dataclass
class PerfConfig:
    """GPU fast path (docs/performance.md). ``auto`` turns an option on for CUDA and off on the CPU."""

    bf16: Union[bool, str] = AUTO
    channels_last: Union[bool, str] = AUTO
    compile: bool = False
    # CPU threads for torch (0: torch's default). A search runs each trial with search.resources.cpu
    # threads and writes that number into best_config.yaml: float sums, and so results, depend on it.
    threads: int = 0
    data_on_device: Union[bool, str] = AUTO

    def check(self) -> None:
        require(self.threads >= 0, "perf.threads", "must be >= 0 (0: torch's default)")


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "cifar10-bmtard"

    def check(self) -> None:
        require(bool(self.experiment), "mlflow.experiment", "must not be empty")
        # A file store makes the name a folder of its artifact root: it must stay inside that root.
        require(not self.experiment.startswith("/") and ".." not in re.split(r"[/\\]", self.experiment),
                "mlflow.experiment", f"{self.experiment!r} must not start with '/' or have a '..' part")
        require(bool(self.tracking_uri), "mlflow.tracking_uri", "must not be empty")


