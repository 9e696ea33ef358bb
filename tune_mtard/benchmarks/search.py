"""``bench search``: the same search with ASHA and with every trial run to the end (FIFO):
``asha_epoch_fraction`` and ``asha_best_gap`` (docs/performance.md). It uses the config's real teachers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tune_mtard.benchmarks.machine import machine_info
from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.files import SUMMARY_JSON
from tune_mtard.perf import resolve_device


def _fifo_fingerprint(cfg: Config) -> dict[str, Any]:
    """What decides a FIFO search's outcome: the whole config but its name, storage, records and scheduler."""
    raw = cfg.to_dict(with_search=True)
    for key in ("name", "mlflow"):
        raw.pop(key)
    for key in ("storage", "scheduler"):
        raw["search"].pop(key)
    return json.loads(json.dumps(raw, default=str))


def bench_search(space: str, overrides: list[str], num_samples: int | None, max_epochs: int | None,
                 storage: str | None, fifo_from: str | None) -> dict[str, Any]:
    # only the benchmark that measures it loads the search stack
    from tune_mtard.data import load_data
    from tune_mtard.search.driver import SearchRequest, experiment_dir, run_search, search_config
    from tune_mtard.search.local_ray import ray_session
    from tune_mtard.teachers import prepare_teachers

    load_before = os.getloadavg()
    outcomes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tune-mtard-bench-") as tmp:
        storage = storage or str(Path(tmp) / "tune")
        configs = {}
        for scheduler in ("asha", "fifo"):
            cfg = search_config(SearchRequest(
                space=space, num_samples=num_samples, max_epochs=max_epochs, storage=storage,
                tracking_uri=f"sqlite:///{Path(storage) / 'mlflow.db'}",
                overrides=list(overrides) + [f"search.scheduler.type={scheduler}"]))
            configs[scheduler] = cfg.with_values({"name": f"{cfg.name}-{scheduler}"})
        fingerprint = _fifo_fingerprint(configs["fifo"])
        if fifo_from is not None:
            earlier = _read_earlier_search(fifo_from)
            if earlier.get("fifo_fingerprint") != fingerprint:
                raise ConfigError("--fifo-from", f"{fifo_from} ran another config, space, sample count or epochs")
            outcomes["fifo"] = dict(earlier["fifo"], reused_from=str(Path(fifo_from).resolve()))
            del configs["fifo"]

        # The teachers are trained (or found) once, before any search is timed.
        cfg = configs["asha"].run_config()
        start = time.perf_counter()
        data = load_data(cfg)
        prepare_teachers(cfg, data, resolve_device(cfg.device), progress=False)
        teachers_s = time.perf_counter() - start
        start = time.perf_counter()
        with ray_session():
            ray_startup = time.perf_counter() - start
            for scheduler, cfg in configs.items():
                start = time.perf_counter()
                run_search(cfg, quiet=True)
                summary = json.loads((experiment_dir(cfg) / SUMMARY_JSON).read_text())
                outcomes[scheduler] = dict(summary, bench_wall_s=time.perf_counter() - start)
    cfg = configs["asha"]
    asha, fifo = outcomes["asha"], outcomes["fifo"]
    return {
        "command": "search", "config": cfg.name.removesuffix("-asha"), "dataset": cfg.data.dataset,
        "num_samples": cfg.search.num_samples, "epochs": cfg.train.epochs,
        "grace_period": cfg.search.scheduler.grace_period, "reduction_factor": cfg.search.scheduler.reduction_factor,
        "asha": asha, "fifo": fifo, "fifo_fingerprint": fingerprint,
        "asha_epoch_fraction": asha["epochs_spent"] / fifo["epochs_full_budget"],
        "asha_best_gap": fifo["best_val_w_robust_acc"] - asha["best_val_w_robust_acc"],
        "ray_startup_s": ray_startup, "teachers_s": teachers_s,
        "machine": machine_info(resolve_device(cfg.device), load_before),
    }


def _read_earlier_search(path: str) -> dict[str, Any]:
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("--fifo-from", f"cannot read {path}: {exc}") from None
    if not isinstance(earlier, dict) or earlier.get("command") != "search" or "fifo" not in earlier:
        raise ConfigError("--fifo-from", f"{path} is not the JSON of a `bench search --out`")
    return earlier


def print_search(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"search benchmark: {result['dataset']}, {result['num_samples']} samples, {result['epochs']} epochs, "
          f"ASHA grace {result['grace_period']} reduction {result['reduction_factor']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_avg_before']} -> {m['load_avg_1_5_15']}")
    print(f"{'':6s} {'epochs':>8s} {'of':>6s} {'best val W-Robust':>18s} {'wall s':>8s}")
    for name in ("asha", "fifo"):
        r = result[name]
        reused = "  (reused)" if "reused_from" in r else ""
        print(f"{name:6s} {r['epochs_spent']:8d} {r['epochs_full_budget']:6d} "
              f"{r.get('best_val_w_robust_acc', float('nan')):18.4f} {r['bench_wall_s']:8.0f}{reused}")
    print(f"asha_epoch_fraction {result['asha_epoch_fraction']:.3f}   asha_best_gap (FIFO - ASHA) "
          f"{result['asha_best_gap']:+.4f}")
