"""The ``space`` section of a search: dotted run-config keys mapped to the distributions a search samples.

Distribution types: ``float`` and ``int`` (``low``, ``high``, optional ``log``, ``step``) and
``categorical`` (``choices``). Every value a distribution can sample must make a valid run config, and
rules that tie keys together (``tau_min <= tau_max``) must hold at every corner of the space
(docs/configuration.md, "Search space").
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any, Iterable, get_type_hints

from tune_mtard.config.coerce import build, flatten
from tune_mtard.config.rules import require
from tune_mtard.config.search import Distribution
from tune_mtard.errors import ConfigError
from tune_mtard.methods import default_space, variants

if TYPE_CHECKING:
    # schema builds a Config with the checks here; this module reaches the Config class only through a config
    from tune_mtard.config.schema import Config

# Past this many corners every pair of keys is checked at its corners, which covers every two-key rule.
MAX_CORNERS = 4096

# Keys a trial cannot vary, and why: a search builds the data and the teachers once, from the base config,
# and every trial must be measured the same way for their metrics to compare (docs/configuration.md,
# "Search space"). A dotted prefix ending in "." covers a whole section.
UNSEARCHABLE = {
    "name": "it names the search",
    "seed": "the data split and the teachers come from the base config's seed",
    "device": "Ray places each trial",
    "data.": "the data is loaded once, from the base config, for every trial",
    "teachers.": "the teachers are built once, from the base config, for every trial",
    "attack.": "the threat model and training attack are the same for every trial and its teachers",
    "eval.": "every trial is validated the same way, so their metrics compare",
    "train.epochs": "every trial has the same budget, ASHA's max_t (--max-epochs shrinks it)",
    "mlflow.": "every trial records to the search's store",
    "perf.threads": "the search sets it to each trial's CPU share",
}
SEARCHABLE_EXCEPTIONS = ("data.batch_size",)  # read by each trial's own loader


def unsearchable_reason(key: str) -> str | None:
    """Why ``key`` cannot be a ``space`` key, or None when a trial really varies it."""
    if key in SEARCHABLE_EXCEPTIONS:
        return None
    for prefix, reason in UNSEARCHABLE.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return reason
    return None


def parse_space(raw: Any, section: str = "space") -> dict[str, Distribution]:
    """A space as distributions; ``section`` is where it sits (``space``, or ``spaces.<method>``), for messages."""
    if not isinstance(raw, dict):
        raise ConfigError(section, "expected a mapping of dotted config keys to distributions")
    space = {}
    for key, spec in raw.items():
        where = f"{section}.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(where, "expected a mapping like {type: float, low: .., high: ..}")
        dist = build(Distribution, spec, where)
        dist.check(where)
        space[key] = dist
    return space


def check_space(cfg: Config) -> None:
    """Space keys are run-config leaves; every value a distribution can sample must make a valid config."""
    space = cfg.space or {}
    run = cfg.run_config()
    leaves = flatten(run.to_dict())
    kinds = leaf_types(type(cfg))
    for key, dist in space.items():
        where = f"space.{key}"
        require(key in leaves, where, "not a key of the run config")
        reason = unsearchable_reason(key)
        require(reason is None, where, f"cannot be searched: {reason}")
        kind = kinds[key]
        if dist.type == "float":
            require(kind is float, where, f"type float cannot sample {key}, which is {_kind_name(kind)}")
        if dist.type == "int":
            require(kind in (int, float), where, f"type int cannot sample {key}, which is {_kind_name(kind)}")
        for value in dist.extremes():
            try:
                run.with_values({key: value})
            except ConfigError as exc:
                raise ConfigError(where, f"value {value!r} is invalid: {exc.message}") from None
    if len(space) > 1:
        for combo in _corners(space):
            try:
                run.with_values(dict(combo))
            except ConfigError as exc:
                values = ", ".join(f"{k}={v!r}" for k, v in combo)
                raise ConfigError(f"space.{exc.key}", f"samples can break a rule of the run config: {exc.message} "
                                                      f"(at {values})") from None


def parse_spaces(raw: Any) -> dict[str, dict[str, Distribution | None]]:
    """The ``spaces`` section: a method (or variant) name -> what to lay over the default space ``compare --tune``
    searches for it (a key's distribution, or null: not searched)."""
    if not isinstance(raw, dict):
        raise ConfigError("spaces", "expected a mapping of method names to spaces")
    spaces: dict[str, dict[str, Distribution | None]] = {}
    for name, entry in raw.items():
        section = f"spaces.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(section, "expected a mapping of dotted config keys to distributions (or null)")
        spaces[str(name)] = {key: None if spec is None else parse_space({key: spec}, section)[key]
                             for key, spec in entry.items()}
    return spaces


def check_spaces(cfg: Config) -> None:
    """Each ``spaces`` entry names a method or variant ``compare --methods`` accepts, and the space it makes is
    one that method can search."""
    names = variants()
    for name in cfg.spaces or {}:
        require(name in names, f"spaces.{name}", f"unknown method {name!r} (valid: {', '.join(names)})")
        method_search_base(cfg, name)


def method_space(cfg: Config, variant: str) -> dict[str, Distribution]:
    """What ``compare --tune`` searches for ``variant``: its default space (beside its registration in
    tune_mtard/methods/) with the config's ``spaces.<variant>`` laid over it, key by key: a distribution
    replaces or adds that key, null drops it (docs/configuration.md, "spaces")."""
    section = f"spaces.{variant}"
    space = parse_space(default_space(variant), section)
    for key, dist in ((cfg.spaces or {}).get(variant) or {}).items():
        if dist is not None:
            space[key] = dist
            continue
        require(key in space, f"{section}.{key}", f"null drops a key of {variant}'s default space, which does not "
                                                  f"search it (it searches {', '.join(space)})")
        del space[key]
    require(bool(space), section, "leaves nothing to search")
    return space


def method_search_base(cfg: Config, variant: str) -> Config:
    """``cfg``'s run config as ``variant`` runs it, with :func:`method_space` as its space, checked like any
    space (:func:`check_space`) and for keys the variant sets itself; a ConfigError names ``spaces.<variant>.<key>``."""
    section = f"spaces.{variant}"
    space = method_space(cfg, variant)
    fixed = variants()[variant]
    clash = [key for key in space if key in fixed]
    if clash:
        raise ConfigError(f"{section}.{clash[0]}", f"cannot be searched: {variant} sets it to {fixed[clash[0]]!r}")
    searched = dataclasses.replace(cfg.run_config().with_values(fixed), space=space)
    try:
        check_space(searched)
    except ConfigError as exc:
        given = (cfg.spaces or {}).get(variant) or {}
        hint = "" if any(exc.key.startswith(f"space.{key}") for key in given) else \
            f" (in {variant}'s default space; set {section} to change it)"
        raise ConfigError(section + exc.key[len("space"):], exc.message + hint) from None
    return searched


def _corners(space: dict[str, Distribution]) -> Iterable[tuple]:
    corners = [[(k, v) for v in d.extremes()] for k, d in space.items()]
    n_corners = 1
    for c in corners:
        n_corners *= max(len(c), 1)
    if n_corners <= MAX_CORNERS:
        return itertools.product(*corners)
    return ((a, b) for i, ca in enumerate(corners) for cb in corners[i + 1:] for a in ca for b in cb)


def _kind_name(kind: Any) -> str:
    return {float: "a float", int: "an integer", bool: "a boolean", str: "a string"}.get(kind, "not a number")


def leaf_types(config_class: type) -> dict[str, Any]:
    """Dotted run-config key -> the Python type its values have (``config_class``: :class:`Config`)."""
    out: dict[str, Any] = {}

    def walk(cls: Any, prefix: str) -> None:
        for name, hint in get_type_hints(cls).items():
            if cls is config_class and name in ("search", "space", "spaces"):
                continue
            key = f"{prefix}{name}"
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
            else:
                out[key] = hint if hint in (int, float, bool, str) else object

    walk(config_class, "")
    return out
