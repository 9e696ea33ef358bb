"""What ``--resume`` may change (docs/search.md, "Resume"): nothing of the search it continues.

A resumed search is the saved one: Ray Tune restores its sampler, scheduler, trial count and retry
budget from its own pickled state, so a changed ``search.*`` or ``space.*`` key, or ``--num-samples``,
would be silently ignored. Each is refused instead (exit 2, naming the key); only where the search is
stored (``search.storage``, ``--storage``) may differ, since that is how the folder is found, and the budget
(``search.budget.*``), which every session reads again, so a larger one really continues the search.
"""

from __future__ import annotations

from typing import Any

from tune_mtard.config import Config, flatten
from tune_mtard.config.loading import to_yaml
from tune_mtard.errors import ConfigError

WHERE_IT_IS = ("search.storage",)  # not part of the search: where its folder is
APPLIED_ON_RESUME = "search.budget."  # read again by every session (docs/search.md, "Budget")


def search_keys(cfg: Config) -> dict[str, Any]:
    """The ``search`` and ``space`` sections as dotted keys (``search.num_samples``, ``space.train.lr.high``)."""
    import yaml

    raw = yaml.safe_load(to_yaml(cfg, with_search=True))
    keys = flatten(raw.get("search") or {}, "search.")
    for name, dist in (raw.get("space") or {}).items():
        keys.update(flatten(dist, f"space.{name}.") if isinstance(dist, dict) else {f"space.{name}": dist})
    return {k: v for k, v in keys.items() if k not in WHERE_IT_IS and not k.startswith(APPLIED_ON_RESUME)}


def check_same_search(cfg: Config, saved: Config, num_samples_flag: int | None) -> None:
    """ConfigError naming the first ``search.*`` / ``space.*`` key (or ``--num-samples``) that differs."""
    now, then = search_keys(cfg), search_keys(saved)
    for key in sorted(set(now) | set(then)):
        if now.get(key) == then.get(key):
            continue
        flag = "--num-samples" if key == "search.num_samples" and num_samples_flag is not None else key
        raise ConfigError(flag, f"differs from the search being resumed ({then.get(key)!r} -> {now.get(key)!r}); "
                                "a resumed search runs as it was saved: start a new search (--set name=NEW) "
                                "to change it")
