"""What ``--resume`` may change (docs/search.md, "Resume"): its budget, retries and trial count, nothing else.

A resumed search is the saved one: Ray Tune restores its sampler, scheduler, trial count and retry
budget from its own pickled state, so a changed ``search.*`` or ``space.*`` key, or ``--num-samples``,
would be silently ignored. Each is refused instead (exit 2, naming the key); only where the search is
stored (``search.storage``, ``--storage``) may differ, since that is how the folder is found, the budget
(``search.budget.*``), which every session reads again, so a larger one really continues the search, and
the retry count (``search.max_failures``), which the retry rule takes from each session, and a larger trial
count (``search.num_samples``, ``--num-samples``), which the restored search proposes up to.
"""

from __future__ import annotations

from typing import Any

from tune_mtard.config import Config, flatten
from tune_mtard.config.loading import to_yaml
from tune_mtard.errors import ConfigError

WHERE_IT_IS = ("search.storage",)  # not part of the search: where its folder is
APPLIED_ON_RESUME = "search.budget."  # read again by every session (docs/search.md, "Budget")
RETRIES = "search.max_failures"  # the retry rule takes each session's count (search/compat.py)
SAMPLES = "search.num_samples"  # may grow: the restored search proposes up to it (search/compat.py, grow_search)


def search_keys(cfg: Config) -> dict[str, Any]:
    """The ``search`` and ``space`` sections as dotted keys (``search.num_samples``, ``space.train.lr.high``)."""
    import yaml

    raw = yaml.safe_load(to_yaml(cfg, with_search=True))
    keys = flatten(raw.get("search") or {}, "search.")
    for name, dist in (raw.get("space") or {}).items():
        keys.update(flatten(dist, f"space.{name}.") if isinstance(dist, dict) else {f"space.{name}": dist})
    return {k: v for k, v in keys.items()
            if k not in WHERE_IT_IS and k not in (RETRIES, SAMPLES) and not k.startswith(APPLIED_ON_RESUME)}


def check_same_search(cfg: Config, saved: Config, num_samples_flag: int | None) -> None:
    """ConfigError naming the first ``search.*`` / ``space.*`` key (or ``--num-samples``) that differs."""
    flag = "--num-samples" if num_samples_flag is not None else SAMPLES
    if cfg.search.num_samples < saved.search.num_samples:
        raise ConfigError(flag, f"{cfg.search.num_samples} is fewer than the {saved.search.num_samples} trials of the "
                                "search being resumed; a resumed search can run more trials, never fewer")
    now, then = search_keys(cfg), search_keys(saved)
    for key in sorted(set(now) | set(then)):
        if now.get(key) == then.get(key):
            continue
        raise ConfigError(key, f"differs from the search being resumed ({then.get(key)!r} -> {now.get(key)!r}); "
                                "a resumed search runs as it was saved: start a new search (--set name=NEW) "
                                "to change it")
