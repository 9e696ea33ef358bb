"""One typed config for runs and searches (SPEC section 3), parsed and validated once at the edge.

YAML in, dataclasses out. Everything inside the package takes a :class:`Config` (or plain values),
never raw dicts. Numbers may be written as fractions ``a/b``; they are parsed, never evaluated.
Every problem raises :class:`~tune_mtard.errors.ConfigError` naming the dotted key at fault.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin, get_type_hints

import yaml

from tune_mtard.errors import ConfigError


class Method(str, enum.Enum):
    NATURAL = "natural"
    PGD_AT = "pgd-at"
    TRADES = "trades"
    ARD = "ard"
    RSLAD = "rslad"
    MTARD = "mtard"
    BMTARD = "b-mtard"


class TeacherRecipe(str, enum.Enum):
    NATURAL = "natural"
    PGD_AT = "pgd-at"
    TRADES = "trades"


DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "svhn", "tiny-imagenet")
ATTACKS = ("clean", "fgsm", "pgd20", "cw", "aa", "square")  # tune_mtard.attacks builds each of these
AUTO = "auto"


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str = "./data"
    download: bool = False
    val_fraction: float = 0.1
    batch_size: int = 128


@dataclass
class StudentConfig:
    arch: str = "resnet18"


@dataclass
class TeacherConfig:
    arch: str = "resnet56"
    checkpoint: str = AUTO
    recipe: TeacherRecipe = TeacherRecipe.NATURAL
    epochs: int = 100
    lr: float = 0.1
    trades_beta: float = 6.0


def _clean_teacher() -> TeacherConfig:
    return TeacherConfig(arch="resnet56", checkpoint="teachers/cifar10-resnet56-natural.pt")


def _robust_teacher() -> TeacherConfig:
    return TeacherConfig(
        arch="wrn34_10", checkpoint="teachers/cifar10-wrn34_10-trades.pt", recipe=TeacherRecipe.TRADES
    )


@dataclass
class TeachersConfig:
    clean: TeacherConfig = field(default_factory=_clean_teacher)
    robust: TeacherConfig = field(default_factory=_robust_teacher)
    cache_dir: str = "./teachers/auto"  # where `checkpoint: auto` teachers are trained once and kept


@dataclass
class AttackConfig:
    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10


@dataclass
class TrainConfig:
    epochs: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2.0e-4
    lr_milestones: list[float] = field(default_factory=lambda: [0.7167, 0.8667, 0.95])
    lr_gamma: float = 0.1


@dataclass
class BalanceConfig:
    entropy: bool = True
    loss: bool = True
    beta: float = 1.0
    tau_init: float = 1.0
    tau_min: float = 1.0
    tau_max: float = 10.0
    tau_lr: float = 0.001
    weight_lr: float = 0.025


@dataclass
class BaselinesConfig:
    """Settings of the comparison methods (``method`` other than b-mtard)."""

    trades_beta: float = 6.0
    ard_temperature: float = 30.0
    ard_alpha: float = 1.0


@dataclass
class EvalConfig:
    every: int = 1
    n_examples: int = 1000
    pgd_steps: int = 20
    pgd_step_size: float = 2 / 255
    clean_weight: float = 0.5
    final_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])
    final_n_examples: int = 0  # 0: the whole test split
    batch_size: int = 256


@dataclass
class PerfConfig:
    """GPU fast path. ``auto`` turns an option on when the run is on CUDA and off on the CPU."""

    bf16: Union[bool, str] = AUTO
    channels_last: Union[bool, str] = AUTO
    compile: bool = False
    # CPU threads for torch (0: torch's default). A search runs each trial with search.resources.cpu
    # threads and writes that number into best_config.yaml: float sums, and so results, depend on it.
    threads: int = 0
    data_on_device: Union[bool, str] = AUTO


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "cifar10-bmtard"


@dataclass
class Resources:
    cpu: float = 4
    gpu: float = 0.5


@dataclass
class SchedulerConfig:
    type: str = "asha"
    grace_period: int = 10
    reduction_factor: float = 3


@dataclass
class SamplerConfig:
    type: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 10


@dataclass
class FinalEvalConfig:
    top_k: int = 0
    attacks: list[str] = field(default_factory=lambda: ["aa"])
    n_examples: int = 1000


@dataclass
class SearchConfig:
    num_samples: int = 64
    max_concurrent: int = 4
    metric: str = "val_w_robust_acc"
    mode: str = "max"
    resources: Resources = field(default_factory=Resources)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    storage: str = "./tune_results"
    max_failures: int = 1
    final_eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)


@dataclass
class Distribution:
    """One searched key: ``float``/``int`` with ``low``, ``high``, optional ``log``/``step``; or ``categorical``."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def extremes(self) -> list[Any]:
        """The values that bound what this distribution can sample (to check the config's rules)."""
        if self.type == "categorical":
            return list(self.choices or [])
        return [self.low, self.high]


@dataclass
class Config:
    name: str = "cifar10-bmtard"
    seed: int = 0
    device: str = AUTO
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    method: Method = Method.BMTARD
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    search: SearchConfig | None = None
    space: dict[str, Distribution] | None = None

    def to_dict(self, with_search: bool = False) -> dict[str, Any]:
        """Plain YAML-ready dict; the run config alone unless ``with_search``."""
        raw = _to_plain(self)
        if not with_search or self.search is None:
            raw.pop("search", None)
            raw.pop("space", None)
        return raw

    def run_config(self) -> "Config":
        """This config without its ``search`` and ``space`` sections."""
        return dataclasses.replace(self, search=None, space=None)

    def flat(self) -> dict[str, Any]:
        """The run config as dotted keys (``balance.beta``), for MLflow params and comparisons."""
        return flatten(self.to_dict())

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node.value if isinstance(node, enum.Enum) else node

    def with_values(self, values: dict[str, Any]) -> "Config":
        """A new validated config with dotted keys set (e.g. a trial's sampled values)."""
        raw = self.to_dict(with_search=True)
        for key, value in values.items():
            _set_dotted(raw, key, value, origin=key)
        return from_dict(raw, check_files=False)

    def dump(self, path: str | Path, with_search: bool = False) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(to_yaml(self, with_search=with_search))


# ---------------------------------------------------------------------------------------------
# Parsing

_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


def parse_number(value: Any, key: str) -> float:
    """A float from a YAML number or an ``a/b`` fraction string (parsed, never evaluated)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            denominator = float(match.group(2))
            if denominator == 0:
                raise ConfigError(key, f"division by zero in {value!r}")
            return float(match.group(1)) / denominator
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(key, f"expected a number or a fraction a/b, got {value!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None and type(None) in get_args(annotation):
            return None
        if bool in args and str in args:  # bool or "auto"
            if isinstance(value, bool) or value == AUTO:
                return value
            raise ConfigError(key, f"expected true, false or auto, got {value!r}")
        return _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = get_args(annotation)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return value
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return _build(annotation, value, key)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            valid = ", ".join(m.value for m in annotation)
            raise ConfigError(key, f"unknown value {value!r} (valid: {valid})") from None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        return parse_number(value, key)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(dotted, f"unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], dotted)
    return cls(**kwargs)


def _parse_space(raw: Any) -> dict[str, Distribution]:
    if not isinstance(raw, dict):
        raise ConfigError("space", "expected a mapping of dotted config keys to distributions")
    space = {}
    for key, spec in raw.items():
        where = f"space.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(where, "expected a mapping like {type: float, low: .., high: ..}")
        dist = _build(Distribution, spec, where)
        if dist.type in ("float", "int"):
            for bound in ("low", "high"):
                if getattr(dist, bound) is None:
                    raise ConfigError(f"{where}.{bound}", f"required for type {dist.type}")
            if dist.choices is not None:
                raise ConfigError(f"{where}.choices", f"not allowed for type {dist.type}")
            if dist.low >= dist.high:
                raise ConfigError(where, f"low ({dist.low:g}) must be < high ({dist.high:g})")
            if dist.log and dist.low <= 0:
                raise ConfigError(f"{where}.low", "must be > 0 with log: true")
            if dist.step is not None and dist.step <= 0:
                raise ConfigError(f"{where}.step", "must be > 0")
            if dist.log and dist.step is not None:
                raise ConfigError(where, "log and step cannot be combined")
            if dist.type == "int":
                for bound in ("low", "high", "step"):
                    v = getattr(dist, bound)
                    if v is not None and not float(v).is_integer():
                        raise ConfigError(f"{where}.{bound}", f"must be an integer for type int, got {v!r}")
                    if v is not None:
                        setattr(dist, bound, int(v))
        elif dist.type == "categorical":
            if not dist.choices:
                raise ConfigError(f"{where}.choices", "a non-empty list is required for type categorical")
            for bound in ("low", "high", "step"):
                if getattr(dist, bound) is not None:
                    raise ConfigError(f"{where}.{bound}", "not allowed for type categorical")
        else:
            raise ConfigError(f"{where}.type", f"unknown distribution {dist.type!r} (valid: float, int, categorical)")
        space[key] = dist
    return space


def from_dict(raw: dict[str, Any], check_files: bool = True) -> Config:
    """Build and validate a :class:`Config` from a plain dict (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", "expected a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    space_raw = raw.pop("space", None)
    cfg = _build(Config, raw, "")
    if "recipe" not in ((raw.get("teachers") or {}).get("robust") or {}):
        # A robust teacher is adversarially trained unless the file says otherwise (SPEC section 2).
        cfg.teachers.robust.recipe = TeacherRecipe.TRADES
    if "search" in raw and cfg.search is None:
        cfg.search = SearchConfig()
    if space_raw is not None:
        cfg.space = _parse_space(space_raw)
        if cfg.search is None:
            cfg.search = SearchConfig()
    validate(cfg, check_files=check_files)
    return cfg


def load_config(
    path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
) -> Config:
    """Read a YAML config, apply ``--set KEY=VALUE`` overrides and validate."""
    path = find_config_file(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(str(path), f"invalid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a YAML mapping at the top level")
    apply_overrides(raw, overrides)
    return resolve_paths(from_dict(raw, check_files=check_files))


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def absolute_tracking_uri(uri: str) -> str:
    """A tracking URI that means the same store from any working directory (Ray trials chdir)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + _absolute(uri[len("sqlite:///"):])
    if "://" not in uri:
        return _absolute(uri)
    return uri


def resolve_paths(cfg: Config) -> Config:
    """Make every relative path in the config absolute, relative to the current directory."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root = _absolute(cfg.data.root)
    for teacher in (cfg.teachers.clean, cfg.teachers.robust):
        if teacher.checkpoint != AUTO:
            teacher.checkpoint = _absolute(teacher.checkpoint)
    cfg.teachers.cache_dir = _absolute(cfg.teachers.cache_dir)
    cfg.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    if cfg.search is not None and "://" not in cfg.search.storage:
        cfg.search.storage = _absolute(cfg.search.storage)
    return cfg


SPACES_PACKAGE = "search_spaces"


def find_config_file(name: str | Path) -> Path:
    """A path; else a file name in ``./search_spaces/``; else one of the spaces installed with the package."""
    import importlib.resources

    for candidate in (Path(name), Path(SPACES_PACKAGE) / Path(name).name):
        if candidate.is_file():
            return candidate.resolve()
    installed = importlib.resources.files(SPACES_PACKAGE)
    if installed.joinpath(Path(name).name).is_file():
        return Path(str(installed.joinpath(Path(name).name)))
    available = sorted(p.name for p in installed.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(str(name), f"config file not found as a path, in ./{SPACES_PACKAGE}/ or among the "
                                 f"installed spaces ({', '.join(available)})")


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as YAML."""
    if "=" not in item:
        raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("--set", f"empty key in {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> None:
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, origin=key)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    if key.startswith("space."):
        # Space keys are dotted config keys themselves: space.<config key>.<param> or space.<config key>.
        space = raw.setdefault("space", {}) or {}
        raw["space"] = space
        rest = key[len("space.") :]
        for known in sorted(space, key=len, reverse=True):
            if rest == known:
                space[known] = value
                return
            if rest.startswith(known + "."):
                space[known][rest[len(known) + 1 :]] = value
                return
        space[rest] = value
        return
    parts = key.split(".")
    node = raw
    cls: Any = Config
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if names is None or part not in names:
            raise ConfigError(origin, "unknown config key")
        if i == len(parts) - 1:
            node[part] = value
            return
        hint = get_type_hints(cls)[part]
        args = [a for a in get_args(hint) if a is not type(None)]
        cls = args[0] if args else hint
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


# ---------------------------------------------------------------------------------------------
# Validation

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: Config, check_files: bool = True) -> None:
    """Check every rule of the run config (and the search section and space, when present)."""
    from tune_mtard.models import available_models

    _validate_run(cfg, available_models(), check_files)
    if cfg.search is not None:
        _validate_search(cfg.search)
    if cfg.space:
        _validate_space(cfg)


def _validate_run(cfg: Config, archs: list[str], check_files: bool) -> None:
    _require(bool(cfg.name) and "/" not in cfg.name, "name", "must be a non-empty name without '/'")
    _require(cfg.seed >= 0, "seed", "must be >= 0")
    _require(bool(_DEVICE.match(cfg.device)), "device", f"expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    d = cfg.data
    _require(d.dataset in DATASETS, "data.dataset", f"unknown dataset {d.dataset!r} (valid: {', '.join(DATASETS)})")
    _require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction:g}")
    _require(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(cfg.student.arch in archs, "student.arch", f"unknown arch {cfg.student.arch!r} (valid: {', '.join(archs)})")
    for role in ("clean", "robust"):
        t: TeacherConfig = getattr(cfg.teachers, role)
        key = f"teachers.{role}"
        _require(t.arch in archs, f"{key}.arch", f"unknown arch {t.arch!r} (valid: {', '.join(archs)})")
        _require(t.epochs >= 1, f"{key}.epochs", "must be >= 1")
        _require(t.lr > 0, f"{key}.lr", "must be > 0")
        _require(t.trades_beta >= 0, f"{key}.trades_beta", "must be >= 0")
        _require(bool(t.checkpoint), f"{key}.checkpoint", "must be a path or auto")
        if check_files and t.checkpoint != AUTO:
            _require(Path(t.checkpoint).expanduser().is_file(), f"{key}.checkpoint",
                     f"file not found: {Path(t.checkpoint).expanduser().resolve()} "
                     "(train it with python -m tune_mtard.teachers, or set checkpoint: auto)")
    a = cfg.attack
    _require(a.epsilon >= 0, "attack.epsilon", f"must be >= 0, got {a.epsilon:g}")
    _require(a.step_size > 0, "attack.step_size", f"must be > 0, got {a.step_size:g}")
    _require(a.steps >= 0, "attack.steps", "must be >= 0")
    t = cfg.train
    _require(t.epochs >= 1, "train.epochs", "must be >= 1")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr:g}")
    _require(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _require(all(0 < m <= 1 for m in t.lr_milestones), "train.lr_milestones", "fractions of train.epochs must be in (0, 1]")
    _require(t.lr_milestones == sorted(t.lr_milestones), "train.lr_milestones", "must be increasing")
    _require(0 < t.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]")
    b = cfg.balance
    _require(b.beta > 0, "balance.beta", f"must be > 0, got {b.beta:g}")
    _require(b.tau_min > 0, "balance.tau_min", f"must be > 0, got {b.tau_min:g}")
    _require(b.tau_max > 0, "balance.tau_max", f"must be > 0, got {b.tau_max:g}")
    _require(b.tau_min <= b.tau_max, "balance.tau_min", f"({b.tau_min:g}) must be <= balance.tau_max ({b.tau_max:g})")
    _require(b.tau_init > 0, "balance.tau_init", f"must be > 0, got {b.tau_init:g}")
    _require(b.tau_lr >= 0, "balance.tau_lr", f"must be >= 0, got {b.tau_lr:g}")
    _require(0 <= b.weight_lr <= 1, "balance.weight_lr", f"must be in [0, 1], got {b.weight_lr:g}")
    bl = cfg.baselines
    _require(bl.trades_beta >= 0, "baselines.trades_beta", "must be >= 0")
    _require(bl.ard_temperature > 0, "baselines.ard_temperature", "must be > 0")
    _require(0 <= bl.ard_alpha <= 1, "baselines.ard_alpha", "must be in [0, 1]")
    e = cfg.eval
    _require(e.every >= 1, "eval.every", "must be >= 1")
    _require(e.n_examples >= 1, "eval.n_examples", "must be >= 1")
    _require(e.pgd_steps >= 1, "eval.pgd_steps", "must be >= 1")
    _require(e.pgd_step_size > 0, "eval.pgd_step_size", "must be > 0")
    _require(0 <= e.clean_weight <= 1, "eval.clean_weight", f"must be in [0, 1], got {e.clean_weight:g}")
    _require(e.final_n_examples >= 0, "eval.final_n_examples", "must be >= 0 (0: the whole test split)")
    _require(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    for i, name in enumerate(e.final_attacks):
        _require(name in ATTACKS, f"eval.final_attacks[{i}]", f"unknown attack {name!r} (valid: {', '.join(ATTACKS)})")
    _require(cfg.perf.threads >= 0, "perf.threads", "must be >= 0 (0: torch's default)")
    _require(bool(cfg.mlflow.experiment), "mlflow.experiment", "must not be empty")
    _require(bool(cfg.mlflow.tracking_uri), "mlflow.tracking_uri", "must not be empty")


def _validate_search(s: SearchConfig) -> None:
    _require(s.num_samples >= 1, "search.num_samples", "must be >= 1")
    _require(s.max_concurrent >= 1, "search.max_concurrent", "must be >= 1")
    _require(s.mode in ("max", "min"), "search.mode", f"must be max or min, got {s.mode!r}")
    _require(bool(s.metric), "search.metric", "must not be empty")
    _require(s.resources.cpu > 0, "search.resources.cpu", "must be > 0")
    _require(s.resources.gpu >= 0, "search.resources.gpu", "must be >= 0")
    _require(s.scheduler.type in ("asha", "fifo"), "search.scheduler.type", f"must be asha or fifo, got {s.scheduler.type!r}")
    _require(s.scheduler.grace_period >= 1, "search.scheduler.grace_period", "must be >= 1")
    _require(s.scheduler.reduction_factor > 1, "search.scheduler.reduction_factor", "must be > 1")
    _require(s.sampler.type in ("tpe", "random"), "search.sampler.type", f"must be tpe or random, got {s.sampler.type!r}")
    _require(s.sampler.n_startup_trials >= 0, "search.sampler.n_startup_trials", "must be >= 0")
    _require(s.max_failures >= 0, "search.max_failures", "must be >= 0")
    _require(bool(s.storage), "search.storage", "must not be empty")
    _require(s.final_eval.top_k >= 0, "search.final_eval.top_k", "must be >= 0")
    _require(s.final_eval.n_examples >= 1, "search.final_eval.n_examples", "must be >= 1")
    for i, name in enumerate(s.final_eval.attacks):
        _require(name in ATTACKS, f"search.final_eval.attacks[{i}]", f"unknown attack {name!r} (valid: {', '.join(ATTACKS)})")


_NUMERIC = (int, float)


def _validate_space(cfg: Config) -> None:
    """Space keys are run-config leaves; every value a distribution can sample must make a valid config."""
    space = cfg.space or {}
    base = cfg.to_dict()
    leaves = flatten(base)
    hints = _leaf_types()
    for key, dist in space.items():
        where = f"space.{key}"
        _require(key in leaves, where, "not a key of the run config")
        kind = hints[key]
        if dist.type == "float":
            _require(kind is float, where, f"type float cannot sample {key}, which is {_kind_name(kind)}")
        if dist.type == "int":
            _require(kind in (int, float), where, f"type int cannot sample {key}, which is {_kind_name(kind)}")
        for value in dist.extremes():
            raw = copy.deepcopy(base)
            _set_dotted(raw, key, value, origin=where)
            try:
                from_dict(raw, check_files=False)
            except ConfigError as exc:
                raise ConfigError(where, f"value {value!r} is invalid: {exc.message}") from None
    # Rules that tie keys together (tau_min <= tau_max, ...) must hold at every corner of the space.
    # Rules that tie keys together (tau_min <= tau_max, ...) must hold at every corner of the space; past
    # 4096 corners every pair of keys is checked at its corners, which covers every two-key rule.
    corners = [[(k, v) for v in d.extremes()] for k, d in space.items()]
    n_corners = 1
    for c in corners:
        n_corners *= max(len(c), 1)
    if n_corners <= 4096:
        combos: Iterable[tuple] = itertools.product(*corners)
    else:
        combos = (a + b for i, ca in enumerate(corners) for cb in corners[i + 1:]
                  for a, b in itertools.product([(x,) for x in ca], [(x,) for x in cb]))
    if len(space) > 1:
        for combo in combos:
            raw = copy.deepcopy(base)
            for k, v in combo:
                _set_dotted(raw, k, v, origin=f"space.{k}")
            try:
                from_dict(raw, check_files=False)
            except ConfigError as exc:
                values = ", ".join(f"{k}={v!r}" for k, v in combo)
                raise ConfigError(f"space.{exc.key}", f"samples can break a rule of the run config: {exc.message} (at {values})") from None


def _kind_name(kind: Any) -> str:
    return {float: "a float", int: "an integer", bool: "a boolean", str: "a string"}.get(kind, "not a number")


def _leaf_types() -> dict[str, Any]:
    """Dotted run-config key -> the Python type its values have."""
    out: dict[str, Any] = {}

    def walk(cls: Any, prefix: str) -> None:
        for name, hint in get_type_hints(cls).items():
            if cls is Config and name in ("search", "space"):
                continue
            key = f"{prefix}{name}"
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
            elif isinstance(hint, type) and issubclass(hint, enum.Enum):
                out[key] = str
            else:
                out[key] = hint if hint in (int, float, bool, str) else object

    walk(Config, "")
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys (``{"balance": {"beta": 1}}`` -> ``{"balance.beta": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def to_yaml(cfg: Config, with_search: bool = False) -> str:
    raw = cfg.to_dict(with_search=with_search)
    if with_search and cfg.space is not None:
        raw["space"] = {
            k: {name: v for name, v in _to_plain(d).items() if v is not None and not (name == "log" and v is False)}
            for k, d in cfg.space.items()
        }
    return yaml.safe_dump(raw, sort_keys=False)
