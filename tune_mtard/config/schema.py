"""The config schema (docs/configuration.md): :class:`Config`, made of the sections of sections.py.

``from_dict`` builds a Config from the parsed YAML (and ``with_values`` one from another), ``to_yaml`` writes
one back: here, beside the class whose methods use them.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tune_mtard import atomic
from tune_mtard.config.coerce import AUTO, build, field_type, flatten, to_plain
from tune_mtard.config.rules import check_model_name, require, require_name
from tune_mtard.config.search import Distribution, SearchConfig
from tune_mtard.config.sections import (
    AttackConfig,
    BalanceConfig,
    BaselinesConfig,
    DataConfig,
    DiagnosticsConfig,
    EvalConfig,
    MlflowConfig,
    PerfConfig,
    StudentConfig,
    TeachersConfig,
    TrainConfig,
    dataset_channels,
)
from tune_mtard.config.space import check_space, check_spaces, parse_space, parse_spaces
from tune_mtard.errors import ConfigError
from tune_mtard.methods import METHODS

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
        channels = dataset_channels(self.data.dataset)
        for key in ("student", "teachers.clean", "teachers.robust"):
            self.get(key).normalization.check(f"{key}.normalization", channels)
        require_name(self.method, METHODS.names(), "method", "method")
        self.attack.check()
        self.train.check()
        require(self.data.batch_size % self.train.workers == 0, "data.batch_size",
                f"{self.data.batch_size} (the global batch) must divide into train.workers = {self.train.workers} "
                "equal shards")
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
        atomic.write_text(path, to_yaml(self, with_search=with_search))


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
