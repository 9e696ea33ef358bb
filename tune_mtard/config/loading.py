"""Config files in and out: YAML, ``--set KEY=VALUE`` overrides, the search-space lookup, paths and YAML output."""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from tune_mtard.config.coerce import field_type
from tune_mtard.config.schema import Config, from_dict, set_dotted, to_yaml, with_values  # noqa: F401 (re-exported)
from tune_mtard.errors import ConfigError

SPACES_PACKAGE = "tune_mtard.search_spaces"  # the repository's search_spaces/ folder, installed in the package
SPACES_FOLDER = "search_spaces"


def load_config(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True,
                flags: dict[str, tuple[str, Any]] | None = None) -> Config:
    """Read a YAML config (a path, or a name :func:`find_config_file` finds), apply overrides, validate.

    ``overrides`` are ``--set KEY=VALUE`` strings (VALUE read as YAML); ``flags`` the values of a command's typed
    flags, ``{config key: (flag, value)}``, set as they are (never read again as YAML) after the overrides, so a
    flag wins; an error in one names the flag. The config is validated once, with everything applied.
    """
    path = find_config_file(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(str(path), f"invalid YAML: {first}") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror})") from None
    check_sections_named(raw, path)
    apply_overrides(raw, overrides)
    for key, (flag, value) in (flags or {}).items():
        set_dotted(raw, key, value, origin=flag)
    try:
        cfg = from_dict(raw, check_files=check_files)
    except ConfigError as exc:
        named = {key: flag for key, (flag, _) in (flags or {}).items()}
        if exc.key in named:
            raise ConfigError(named[exc.key], exc.message) from None
        raise
    return resolve_paths(cfg)


def check_sections_named(raw: Any, path: Path) -> None:
    """A config file is a non-empty mapping whose every section holds something (docs/configuration.md, "What a
    config file must say"): an empty file, or a section with nothing under it, is what a torn or unfinished
    file looks like, and must not load as the built-in defaults."""
    if raw is None or raw == {}:
        raise ConfigError(str(path), "the file is empty: a config names its sections (an empty file is refused, "
                                     "not read as the defaults)")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a YAML mapping at the top level")
    _check_no_empty_section(raw, Config, "", path)


def _check_no_empty_section(raw: dict[str, Any], cls: Any, prefix: str, path: Path) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in names:
            continue  # unknown keys are named by the schema's own check
        section = field_type(cls, key)
        if value is None and (not prefix or dataclasses.is_dataclass(section)):
            raise ConfigError(str(path), f"'{prefix}{key}' has nothing under it (a file cut short?); write the "
                                         f"values, or {{}} to take all of its defaults")
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            _check_no_empty_section(value, section, f"{prefix}{key}.", path)


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
    if cfg.search is not None and cfg.search.optuna_storage.startswith("sqlite:///"):
        cfg.search.optuna_storage = absolute_tracking_uri(cfg.search.optuna_storage)
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
