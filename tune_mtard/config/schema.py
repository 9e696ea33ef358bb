"""The config schema (docs/configuration.md): one dataclass per section, its rules beside its fields.

Defaults are the paper's CIFAR-10 settings. Every ``check`` raises :class:`~tune_mtard.errors.ConfigError`
naming the dotted key at fault. Names of datasets, architectures, methods and attacks are checked against
their registries (:mod:`tune_mtard.registry`). ``from_dict`` builds a Config from the parsed YAML (and
``with_values`` one from another), ``to_yaml`` writes one back: here, beside the class whose methods use them.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from tune_mtard.config.coerce import AUTO, build, field_type, flatten, to_plain
from tune_mtard.config.rules import check_attack_names, check_model_name, require, require_name
from tune_mtard.config.search import Distribution, SearchConfig
from tune_mtard.config.space import check_space, check_spaces, parse_space, parse_spaces
from tune_mtard.data import DATASETS
from tune_mtard.errors import ConfigError
from tune_mtard.methods import METHODS
from tune_mtard.models import available_models


def _archs() -> list[str]:
    return available_models()


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str = "./data"
    download: bool = False
    val_fraction: float = 0.1
    batch_size: int = 128

    def check(self) -> None:
        require_name(self.dataset, DATASETS.names(), "data.dataset", "dataset")
        require(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction:g}")
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1")


@dataclass
class StudentConfig:
    arch: str = "resnet18"

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

    def check(self) -> None:
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
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


@dataclass
class BaselinesConfig:
    """Settings of the comparison methods (``method`` other than b-mtard, docs/methods.md)."""

    trades_beta: float = 6.0
    ard_temperature: float = 30.0
    ard_alpha: float = 1.0

    def check(self) -> None:
        require(self.trades_beta >= 0, "baselines.trades_beta", "must be >= 0")
        require(self.ard_temperature > 0, "baselines.ard_temperature", "must be > 0")
        require(0 <= self.ard_alpha <= 1, "baselines.ard_alpha", "must be in [0, 1]")


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
        require(bool(self.tracking_uri), "mlflow.tracking_uri", "must not be empty")


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


@dataclass
class Config:
    """A run config; with ``search`` and ``space`` it is a search space, and ``spaces`` is what ``compare --tune``
    searches per method (docs/configuration.md)."""

    name: str = "cifar10-bmtard"
    seed: int = 0
    device: str = AUTO  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    method: str = "b-mtard"
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    search: SearchConfig | None = None
    space: dict[str, Distribution] | None = None
    spaces: dict[str, dict[str, Distribution | None]] | None = None  # over compare --tune's spaces (space.py)

    def check(self, check_files: bool = True) -> None:
        """Every rule of the run config, and of the search section when there is one (the space: space.py)."""
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                "must be a non-empty name without '/' (and not '.' or '..')")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(bool(_DEVICE.match(self.device)), "device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.data.check()
        self.student.check()
        self.teachers.check(check_files)
        require_name(self.method, METHODS.names(), "method", "method")
        self.attack.check()
        self.train.check()
        self.balance.check()
        self.baselines.check()
        self.diagnostics.check()
        self.eval.check()
        self.perf.check()
        self.mlflow.check()
        if self.search is not None:
            self.search.check()
            auto = self.search.register_as == "auto"
            registered = self.name if auto else self.search.register_as
            if registered:  # "": nothing is registered
                check_model_name(registered, "search.register_as", " (auto registers under the search's name; set "
                                 "another name, or '' for none)" if auto else "")

    def to_dict(self, with_search: bool = False) -> dict[str, Any]:
        """Plain YAML-ready dict; the run config alone unless ``with_search`` (then also ``search``, ``space``
        and ``spaces``, where the config has them)."""
        raw = to_plain(self)
        if not with_search or self.search is None:
            raw.pop("search", None)
            raw.pop("space", None)
        if not with_search or self.spaces is None:
            raw.pop("spaces", None)
        return raw

    def run_config(self) -> Config:
        """This config without its ``search``, ``space`` and ``spaces`` sections."""
        return dataclasses.replace(self, search=None, space=None, spaces=None)

    def flat(self) -> dict[str, Any]:
        """The run config as dotted keys (``balance.beta``), for MLflow params and comparisons."""
        return flatten(self.to_dict())

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def with_values(self, values: dict[str, Any]) -> Config:
        """A new validated config with dotted keys set (e.g. a trial's sampled values)."""
        return with_values(self, values)

    def dump(self, path: str | Path, with_search: bool = False) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(to_yaml(self, with_search=with_search))


# ---- building a Config from the parsed YAML, and back ------------------------------------------------


def from_dict(raw: dict[str, Any], check_files: bool = True) -> Config:
    """Build and validate a :class:`Config` from a plain dict (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", "expected a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    space_raw = raw.pop("space", None)
    spaces_raw = raw.pop("spaces", None)
    cfg = build(Config, raw, "")
    if "recipe" not in ((raw.get("teachers") or {}).get("robust") or {}):
        # A robust teacher is adversarially trained unless the file says otherwise.
        cfg.teachers.robust.recipe = "trades"
    if "search" in raw and cfg.search is None:
        cfg.search = SearchConfig()
    if space_raw is not None:
        cfg.space = parse_space(space_raw)
        if cfg.search is None:
            cfg.search = SearchConfig()
    if spaces_raw is not None:
        cfg.spaces = parse_spaces(spaces_raw)
    cfg.check(check_files=check_files)
    if cfg.space:
        check_space(cfg)
    if cfg.spaces:
        check_spaces(cfg)
    return cfg


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A new validated config: ``cfg`` with dotted keys set (e.g. a trial's sampled values)."""
    raw = cfg.to_dict(with_search=True)
    for key, value in values.items():
        set_dotted(raw, key, value, origin=key)
    return from_dict(raw, check_files=False)


def set_dotted(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set dotted ``key`` in the raw (YAML) dict; ``space.<config key>[.<param>]`` reaches the space section and
    ``spaces.<method>[.<config key>[.<param>]]`` one space of the ``spaces`` section."""
    if key.startswith("space."):
        raw["space"] = raw.get("space") or {}
        _set_in_space(raw["space"], key[len("space."):], value)
        return
    if key.startswith("spaces."):
        spaces = raw["spaces"] = raw.get("spaces") or {}
        method, _, rest = key[len("spaces."):].partition(".")
        if not rest:
            spaces[method] = value
            return
        spaces[method] = spaces.get(method) or {}
        if not isinstance(spaces[method], dict):
            raise ConfigError(f"spaces.{method}", "expected a mapping of dotted config keys to distributions")
        _set_in_space(spaces[method], rest, value)
        return
    parts = key.split(".")
    node = raw
    cls: Any = Config
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in names:
            raise ConfigError(origin, "unknown config key")
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = field_type(cls, part)
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def _set_in_space(space: dict[str, Any], rest: str, value: Any) -> None:
    """``<config key>`` sets a whole distribution of ``space``, ``<config key>.<param>`` one field of it."""
    for known in sorted(space, key=len, reverse=True):
        if rest == known:
            space[known] = value
            return
        if rest.startswith(known + ".") and isinstance(space[known], dict):
            space[known][rest[len(known) + 1:]] = value
            return
    space[rest] = value


def to_yaml(cfg: Config, with_search: bool = False) -> str:
    raw = cfg.to_dict(with_search=with_search)
    if "space" in raw and cfg.space is not None:
        raw["space"] = _plain_space(cfg.space)
    if "spaces" in raw and cfg.spaces is not None:
        raw["spaces"] = {name: {key: None if dist is None else _plain_space({key: dist})[key]
                                for key, dist in space.items()} for name, space in cfg.spaces.items()}
    return yaml.safe_dump(raw, sort_keys=False)


def _plain_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Distributions as a space file writes them: the fields that are set."""
    return {key: {name: v for name, v in to_plain(dist).items() if v is not None and not (name == "log" and v is False)}
            for key, dist in space.items()}
