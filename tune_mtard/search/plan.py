"""``search --plan``: what a search will cost, known before it is paid for (docs/search.md, "Planning a search").

No trial runs. The student's step, a validation and a trial's per-epoch checkpoint are timed on the device
(:mod:`tune_mtard.costs`, a few seconds), Ray is started and stopped once to time its start, and the
scheduler's epochs are simulated (:mod:`tune_mtard.search.schedule_model`) in as many lanes as the cluster
and ``search.max_concurrent`` allow. Teachers that the search would train first (``auto`` ones not cached)
are added. The plan prints expected and worst-case epochs, device-hours and wall time with its assumptions,
and writes them to ``<storage>/<name>/plan.json``.

``--plan-device NAME`` times another device of this machine; ``--plan-device NAME=STEPS_PER_S`` plans for a
device that is not here, from its steps/s of the student's step (measured there with ``bench step``): every
compute time is scaled by its ratio to this machine's. ``--plan-cluster CPUS,GPUS`` gives the cluster's size.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tune_mtard import files
from tune_mtard.config import AUTO, Config
from tune_mtard.costs import TrainingCosts, measure_training, validations
from tune_mtard.data import load_data
from tune_mtard.errors import ConfigError
from tune_mtard.perf import resolve_device
from tune_mtard.search.remote import experiment_storage, is_remote
from tune_mtard.search.schedule_model import DRAWS, SimulatedSearch, asha_rungs, random_values, simulate
from tune_mtard.search.space_methods import searched_methods
from tune_mtard.teachers import recipe_config, roles_for, teacher_path

# Fixed costs no plan can time without running a trial, measured on the 2-core CPU of docs/performance.md from
# the README's digits search of 2026-12-03 (12 trials, load average 20 from other work; docs/search.md,
# "Planning a search"): the gap between a trial's last report and the next trial's start on its lane plus the
# first epoch's extra time (the Trainer built), and the time from the last trial's end to the process's exit.
TRIAL_LAUNCH_S = 3.2  # a trial's start and wrap-up: its worker, the object-store transfer, its records
REPORT_S = 0.15  # one reported epoch besides its validation and checkpoint: diagnostics, Tune's and MLflow's handling
CONCLUDE_S = 48.0  # after the last trial: ranking, trials.csv, plots, sensitivity analysis, model registration


@dataclass
class Cluster:
    cpu: float
    gpu: float
    source: str  # where the size came from


def lanes(cfg: Config, cluster: Cluster) -> int:
    """How many trials run at once: ``max_concurrent``, ``num_samples`` and what the cluster holds."""
    s, n = cfg.search, cfg.train.workers  # each of a trial's train.workers workers holds search.resources
    fit = math.floor(cluster.cpu / (n * s.resources.cpu) + 1e-9)
    if s.resources.gpu > 0:
        fit = min(fit, math.floor(cluster.gpu / (n * s.resources.gpu) + 1e-9))
    return max(1, min(s.max_concurrent, s.num_samples, fit))


def parse_plan_device(text: str | None) -> tuple[str | None, float | None]:
    """``NAME`` (a device here) or ``NAME=STEPS_PER_S`` (a device elsewhere, at that speed)."""
    if text is None:
        return None, None
    name, _, speed = text.partition("=")
    if not name:
        raise ConfigError("--plan-device", f"{text!r}: give NAME or NAME=STEPS_PER_S (e.g. cuda, a100=14.5)")
    if not speed:
        return name, None
    try:
        steps_per_s = float(speed)
    except ValueError:
        steps_per_s = -1.0
    if not steps_per_s > 0 or math.isinf(steps_per_s):
        raise ConfigError("--plan-device", f"{text!r}: STEPS_PER_S must be a positive number")
    return name, steps_per_s


def parse_plan_cluster(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        cpu, gpu = (float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError("--plan-cluster", f"{text!r}: give CPUS,GPUS (e.g. 32,4)") from None
    if cpu <= 0 or gpu < 0:
        raise ConfigError("--plan-cluster", f"{text!r}: CPUS must be > 0 and GPUS >= 0")
    return cpu, gpu


def teachers_to_train(cfg: Config, roles: tuple[str, ...]) -> dict[str, Config]:
    """Role -> the recipe of each ``auto`` teacher the search would train first (not in the cache yet)."""

    return {role: recipe_config(cfg, role) for role in roles
            if getattr(cfg.teachers, role).checkpoint == AUTO and not teacher_path(cfg, role).is_file()}


def trial_seconds(cfg: Config, costs: TrainingCosts):
    """A trial's seconds from its start to its report of epoch ``e`` (every report validates and checkpoints)."""
    every, total = cfg.eval.every, cfg.train.epochs

    def seconds(epoch: int) -> float:
        reports = validations(epoch, every, total)
        return (TRIAL_LAUNCH_S + epoch * costs.train_epoch_s
                + reports * (costs.validation_s + costs.checkpoint_s + REPORT_S))
    return seconds


def reported_epochs(cfg: Config) -> list[int]:
    every, total = cfg.eval.every, cfg.train.epochs
    return sorted({e for e in range(every, total + 1, every)} | {total})


def forecast(cfg: Config, costs: TrainingCosts, cluster: Cluster, ray_start_s: float, setup_s: float,
             teacher_recipes: dict[str, Config]) -> dict[str, Any]:
    """The plan's figures: expected (mean over simulated searches) and worst case."""
    s = cfg.search
    max_t = cfg.train.epochs
    rungs = asha_rungs(s.scheduler.grace_period, s.scheduler.reduction_factor, max_t) if (
        s.scheduler.type == "asha") else []
    slots = lanes(cfg, cluster)
    seconds = trial_seconds(cfg, costs)
    reported = reported_epochs(cfg)
    draws = [simulate(random_values(s.num_samples, seed), slots, max_t, rungs, s.scheduler.reduction_factor,
                      reported, seconds) for seed in range(DRAWS)]
    worst = simulate([0.0] * s.num_samples, slots, max_t, [], s.scheduler.reduction_factor, reported, seconds)
    teachers = {role: {"epochs": r.train.epochs, "seconds": r.train.epochs * costs.teacher_epoch_s[role]}
                for role, r in teacher_recipes.items()}
    teacher_s = sum(t["seconds"] for t in teachers.values())
    share, unit = s.resources.device_share()
    share *= cfg.train.workers  # a trial's workers each hold search.resources
    fixed_s = ray_start_s + setup_s + teacher_s + CONCLUDE_S

    def figures(sims: list[SimulatedSearch]) -> dict[str, float]:
        trial_s = statistics.mean(sum(seconds(e) for e in sim.epochs) for sim in sims)
        return {"epochs": statistics.mean(sim.total_epochs for sim in sims),
                "trials_at_full_budget": statistics.mean(sim.epochs.count(max_t) for sim in sims),
                "device_hours": (trial_s * share + teacher_s) / 3600,
                "wall_s": fixed_s + statistics.mean(sim.wall_s for sim in sims)}

    expected, worst_case = figures(draws), figures([worst])
    return {
        "search": cfg.name, "wall_s": expected["wall_s"], "device_hours_unit": unit,
        "expected": expected, "worst_case": worst_case,
        "scheduler": {"type": s.scheduler.type, "rungs": rungs, "max_t": max_t,
                      "reduction_factor": s.scheduler.reduction_factor, "grace_period": s.scheduler.grace_period},
        "num_samples": s.num_samples, "max_concurrent": s.max_concurrent, "lanes": slots,
        "resources_per_trial": asdict(s.resources), "cluster": asdict(cluster),
        "measured": {**asdict(costs), "train_epoch_s": costs.train_epoch_s, "steps_per_s": 1 / costs.step_s,
                     "ray_start_s": ray_start_s, "setup_s": setup_s},
        "teachers_to_train": teachers,
        "fixed_costs_s": {"trial_launch_s": TRIAL_LAUNCH_S, "report_s": REPORT_S, "conclude_s": CONCLUDE_S},
        "assumptions": assumptions(cfg, costs, cluster, slots, unit),
    }


def assumptions(cfg: Config, costs: TrainingCosts, cluster: Cluster, slots: int, unit: str) -> list[str]:
    s = cfg.search
    lines = [
        f"{costs.steps_per_epoch} steps per epoch at {1 / costs.step_s:.2f} steps/s on {costs.device}; a "
        f"validation takes {costs.validation_s:.2f} s, a checkpoint {costs.checkpoint_s:.3f} s",
        f"{slots} trials at once: max_concurrent {s.max_concurrent}, {s.resources.cpu:g} CPU and "
        f"{s.resources.gpu:g} GPU per trial on a cluster of {cluster.cpu:g} CPU and {cluster.gpu:g} GPU "
        f"({cluster.source}); trials sharing a device are assumed not to slow each other",
        f"per trial {TRIAL_LAUNCH_S:g} s to launch and wrap up, per report {REPORT_S:g} s, after the last trial "
        f"{CONCLUDE_S:g} s (measured on the 2-core CPU of docs/performance.md)",
        f"device-hours in {unit}: trial seconds times what a trial holds, teacher training on one device",
    ]
    if s.scheduler.type == "asha":
        lines.append(f"expected: the mean of {DRAWS} simulated searches with Ray's ASHA rules, each trial's value "
                     "drawn at random and its rank the same at every rung; worst case: every trial runs all "
                     f"{cfg.train.epochs} epochs")
    return lines


def ray_start_seconds(address: str | None) -> tuple[float, Cluster]:
    """Start (or connect to) Ray once, as the search would, and read the cluster's size; stopped again. A Ray
    this process already runs (a caller's) is used as it is, and its start is not timed (0 s)."""
    import ray

    start = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or "local", include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        elapsed = time.perf_counter() - start if started_here else 0.0
        total = ray.cluster_resources()
        cpu, gpu = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    finally:
        if started_here:
            ray.shutdown()
    return elapsed, Cluster(cpu, gpu, f"the Ray cluster at {address}" if address else "this machine's Ray")


def plan_search(cfg: Config, roles: tuple[str, ...], plan_device: str | None, plan_cluster: str | None,
                address: str | None, teachers_counted: set[str] = frozenset()) -> dict[str, Any]:
    """Measure, simulate, print and write ``plan.json``; returns the plan. Teachers of ``teachers_counted``
    are left out (an earlier plan of the same comparison trains them)."""

    device_name, given_steps_per_s = parse_plan_device(plan_device)
    given_cluster = parse_plan_cluster(plan_cluster)
    if device_name is not None and given_steps_per_s is None:
        try:
            device = resolve_device(device_name)
        except (ConfigError, RuntimeError) as exc:
            raise ConfigError("--plan-device", f"{device_name}: {getattr(exc, 'message', exc)} (name a device "
                                               "of this machine, or give NAME=STEPS_PER_S)") from None
    else:
        device = resolve_device(cfg.device)
    start = time.perf_counter()
    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    setup_s = time.perf_counter() - start
    recipes = teachers_to_train(cfg, tuple(role for role in roles if role not in teachers_counted))
    threads = cfg.perf.threads or max(1, int(cfg.search.resources.cpu))  # as a trial sets them
    costs = measure_training(cfg, data, device, recipes, threads)
    if given_steps_per_s is not None:
        costs = costs.scaled(given_steps_per_s * costs.step_s, device_name)
    ray_start_s, cluster = ray_start_seconds(address)
    if given_cluster is not None:
        cluster = Cluster(*given_cluster, "--plan-cluster")
    elif given_steps_per_s is not None:
        cluster = Cluster(cluster.cpu, cluster.gpu, cluster.source + "; pass --plan-cluster for another")
    plan = forecast(cfg, costs, cluster, ray_start_s, setup_s, recipes)
    if is_remote(cfg):  # an object store's search folder (docs/cluster.md, "Object storage")
        storage = experiment_storage(cfg)
        storage.write_text(files.PLAN_JSON, json.dumps(plan, indent=2))
        print_plan(plan, f"{storage.uri}/{files.PLAN_JSON}")
        return plan
    folder = Path(cfg.search.storage) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / files.PLAN_JSON
    path.write_text(json.dumps(plan, indent=2))
    print_plan(plan, path)
    return plan


def plan_tuned_comparison(searches: dict[str, Config], seeds: list[int], base: Config, out: Path) -> dict[str, Any]:
    """``compare --tune N --plan``: each method's search planned (its own ``plan.json``), one after the other as
    the comparison runs them, then each method's best config trained on every seed; written to
    ``<out>/plan.json``. The seed runs' final test evaluation is not included."""

    plans, counted = {}, set()
    for method, cfg in searches.items():
        roles = roles_for(searched_methods(cfg))
        plans[method] = plan_search(cfg, roles, None, None, None, counted)
        counted |= set(roles)
    epochs = base.train.epochs
    seed_runs_s = {}
    for method, p in plans.items():
        m = p["measured"]
        one_run = epochs * m["train_epoch_s"] + validations(epochs, base.eval.every, epochs) * m["validation_s"]
        seed_runs_s[method] = len(seeds) * one_run
    total = {
        "wall_s": sum(p["wall_s"] for p in plans.values()) + sum(seed_runs_s.values()),
        "worst_case_wall_s": sum(p["worst_case"]["wall_s"] for p in plans.values()) + sum(seed_runs_s.values()),
        "searches": {method: p["wall_s"] for method, p in plans.items()},
        "seed_runs_s": seed_runs_s,
        "assumptions": ["searches run one after the other, each as its plan.json says",
                        f"each method's best config trained for {epochs} epochs on {len(seeds)} seeds at its "
                        "search's measured step and validation; the final test evaluation is not included"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / files.PLAN_JSON).write_text(json.dumps(total, indent=2))
    print(f"plan of the tuned comparison: {len(plans)} searches, then {len(seeds)} seeds each: expected "
          f"{_hours(total['wall_s'])} (worst case {_hours(total['worst_case_wall_s'])}); written to "
          f"{out / files.PLAN_JSON}; nothing was started")
    return total


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def print_plan(plan: dict[str, Any], path: Path | str) -> None:
    e, w = plan["expected"], plan["worst_case"]
    unit = plan["device_hours_unit"]
    print(f"plan of search {plan['search']}: {plan['num_samples']} trials, {plan['lanes']} at a time, "
          f"{plan['scheduler']['type']} (rungs {plan['scheduler']['rungs']}, max_t {plan['scheduler']['max_t']})")
    for role, t in plan["teachers_to_train"].items():
        print(f"  first trains the {role} teacher: {t['epochs']} epochs, {_hours(t['seconds'])}")
    print(f"  {'':12s} {'epochs':>9s} {'full-budget':>12s} {unit:>16s} {'wall time':>12s}")
    for name, f in (("expected", e), ("worst case", w)):
        print(f"  {name:12s} {f['epochs']:9.1f} {f['trials_at_full_budget']:12.1f} {f['device_hours']:16.3f} "
              f"{_hours(f['wall_s']):>12s}")
    print("assumptions:")
    for line in plan["assumptions"]:
        print(f"  - {line}")
    print(f"plan written to {path}; no trial was started")
