"""Config files in and out: YAML, ``--set KEY=VALUE`` overrides, the search-space lookup, paths and YAML output."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from tune_mtard.config.schema import Config, from_dict, set_dotted, to_yaml, with_values  # noqa: F401 (re-exported)
from tune_mtard.errors import ConfigError

SPACES_PACKAGE = "tune_mtard.search_spaces"  # the repository's search_spaces/ folder, installed in the package
SPACES_FOLDER = "search_spaces"


def load_config(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True) -> Config:
    """Read a YAML config (a path, or a name :func:`find_config_file` finds), apply overrides, validate."""
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


def find_config_file(name: str | Path) -> Path:
    """A path; else a file name in ``./search_spaces/``; else one of the spaces installed with the package."""
    for candidate in (Path(name), Path(SPACES_FOLDER) / Path(name).name):
        if candidate.is_file():
            return candidate.resolve()
    installed = importlib.resources.files(SPACES_PACKAGE)
    if installed.joinpath(Path(name).name).is_file():
        return Path(str(installed.joinpath(Path(name).name)))
    available = sorted(p.name for p in installed.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(str(name), f"config file not found as a path, in ./{SPACES_FOLDER}/ or among the "
                                 f"installed spaces ({', '.join(available)})")


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
        if teacher.checkpoint != "auto":
            teacher.checkpoint = _absolute(teacher.checkpoint)
    cfg.teachers.cache_dir = _absolute(cfg.teachers.cache_dir)
    cfg.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    if cfg.search is not None and "://" not in cfg.search.storage:
        cfg.search.storage = _absolute(cfg.search.storage)
    return cfg


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
        set_dotted(raw, key, value, origin=key)
