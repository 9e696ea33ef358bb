"""Tuned comparisons: what ``compare --tune N`` does (docs/methods.md, "Tuned comparisons").

A shared, hand-set learning rate favours some methods by construction (the KL~ losses of the distillation
methods have gradients an order of magnitude smaller than cross-entropy's), so each method (or B-MTARD
ablation) first gets its own search: an ordinary search of this platform (``run_search``), with its own
Optuna study, MLflow experiment and parent run, records and ``best_config.yaml``, over that method's space
(its default space beside its registration in ``tune_mtard/methods/``, or the config's ``spaces`` entry).
Every method gets the same budget: N trials, the same sampler and seed, scheduler, resources and ``max_t``
(``--tune-epochs``). Then each method's best config is trained on the comparison's seeds and evaluated on
the test split exactly as ``compare`` does (:mod:`tune_mtard.workflows.compare`), and the table gains each
method's tuned values and the budget its search spent. ``--resume`` continues an interrupted tuned
comparison: finished searches are not run again, interrupted ones continue, finished runs are kept.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tune_mtard import atomic, files
from tune_mtard.config import Config, flatten, from_dict, load_config, to_yaml
from tune_mtard.config.coerce import build, to_plain
from tune_mtard.config.search import SchedulerConfig, SearchConfig
from tune_mtard.config.space import method_search_base
from tune_mtard.data import load_data
from tune_mtard.errors import ConfigError, Interrupted
from tune_mtard.perf import resolve_device
from tune_mtard.search import driver, interrupts
from tune_mtard.search.driver import check_experiment, ran_in
from tune_mtard.search.local_ray import ray_session
from tune_mtard.search.lock import SearchLock, refuse_if_running
from tune_mtard.search.plan import plan_tuned_comparison
from tune_mtard.search.resources import check_local_resources
from tune_mtard.search.schedulers import describe_scheduler, fit_to_epochs
from tune_mtard.teachers import check_teacher_files, roles_for
from tune_mtard.workflows.compare import (
    CompareRequest,
    SeedRun,
    base_config,
    comparison_params,
    comparison_run,
    final_attacks,
    markdown_table,
    parse_methods,
    parse_seeds,
    read_results,
    record_comparison,
    refuse_workers,
    report_failures,
    run_seeds,
    summarize,
    test_examples,
)

# The search section of a config that has none: the digits space's (docs/methods.md, "Tuned comparisons").
DEFAULT_SEARCH: dict[str, Any] = {
    "max_concurrent": 2,
    "metric": "val_w_robust_acc",
    "mode": "max",
    "resources": {"cpu": 1, "gpu": 0},
    "scheduler": {"type": "asha", "grace_period": 3, "reduction_factor": 3},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 5},
}
DONE = ("finished", "no_usable_trial")  # a search that ended so is not run again by --resume


@dataclass
class TunedPlan:
    """A tuned comparison, checked before anything runs: the base config, what is compared, and each method's
    search config (a space file: the base run config as the method runs it, its space, the shared search)."""

    base: Config
    methods: list[str]
    seeds: list[int]
    attacks: list[str]
    out: Path
    tune: int
    tune_epochs: int
    searches: dict[str, Config]
    resume: bool
    notes: list[str] = field(default_factory=list)

    def folder(self, method: str) -> Path:
        cfg = self.searches[method]
        return Path(cfg.search.storage) / cfg.name

    @property
    def search(self) -> SearchConfig:
        """The search section every method's search shares."""
        return next(iter(self.searches.values())).search

    def asked(self) -> dict[str, Any]:
        """What ``--resume`` must be asked again, as ``tuned_comparison.json`` keeps it: the flags, the shared
        search section and each method's space (the base config is kept in ``config.yaml``)."""
        return {"methods": self.methods, "seeds": self.seeds, "attacks": self.attacks, "tune": self.tune,
                "tune_epochs": self.tune_epochs, "search": to_plain(self.search),
                "spaces": {m: to_plain(cfg.space) for m, cfg in self.searches.items()}}


@dataclass
class MethodSearch:
    """How one method's search ended, what it found and what it spent."""

    method: str
    cfg: Config
    status: str
    summary: dict[str, Any]
    parent_run_id: str
    wall_time_s: float
    best: Config | None = None

    @property
    def tuned(self) -> dict[str, Any]:
        """The best config's values of the searched keys."""
        return {} if self.best is None else {key: self.best.get(key) for key in self.cfg.space or {}}

    @property
    def epochs_cap(self) -> int:
        return self.cfg.search.num_samples * self.cfg.train.epochs

    def budget(self) -> dict[str, Any]:
        """The summary columns of the method's search (``comparison_summary.csv``, the parent run's metrics)."""
        spent = self.summary.get("epochs_spent", 0)
        return {"search_name": self.cfg.name, "search_status": self.status,
                "search_trials": self.summary.get("n_trials", 0),
                "search_failed_trials": self.summary.get("n_failed", 0),
                "search_epochs_spent": spent, "search_epochs_cap": self.epochs_cap,
                "search_epochs_fraction": spent / self.epochs_cap, "search_wall_time_s": round(self.wall_time_s, 1),
                **{f"tuned.{key}": value for key, value in self.tuned.items()}}


# ------------------------------------------------------------------------------------------ planning


def plan_tuned(request: CompareRequest) -> TunedPlan:
    """Everything checked before anything runs, is written or is logged (exit 2 on any problem)."""
    if request.tune < 1:
        raise ConfigError("--tune", f"must be >= 1 (trials per method), got {request.tune}")
    if request.tune_epochs is not None and request.tune_epochs < 1:
        raise ConfigError("--tune-epochs", f"must be >= 1, got {request.tune_epochs}")
    methods = parse_methods(request.methods)
    seeds = parse_seeds(request.seeds)
    loaded = base_config(request)
    base = loaded.run_config()
    refuse_workers(base)
    resolve_device(base.device)
    epochs = request.tune_epochs or base.train.epochs
    out = Path(request.out or Path("runs") / f"{base.name}-compare-tuned").resolve()
    search, notes = search_section(loaded.search, request.tune, epochs, out / files.TUNED_SEARCHES)
    searches = {m: method_search_config(loaded, m, search, epochs) for m in methods}
    check_teacher_files(base, roles_for({cfg.method for cfg in searches.values()}))
    check_local_resources(next(iter(searches.values())))
    plan = TunedPlan(base, methods, seeds, final_attacks(base), out, request.tune, epochs, searches, request.resume,
                     notes)
    check_out(plan)
    return plan


def search_section(given: SearchConfig | None, tune: int, epochs: int,
                   storage: Path) -> tuple[dict[str, Any], list[str]]:
    """The search section every method's search shares: the config's (else :data:`DEFAULT_SEARCH`) with N
    trials, stored in the comparison's folder; ASHA's grace period at most ``epochs``."""
    raw = to_plain(given) if given is not None else copy.deepcopy(DEFAULT_SEARCH)
    raw.update(num_samples=tune, storage=str(storage))
    scheduler = raw.setdefault("scheduler", {})
    fitted, note = fit_to_epochs(build(SchedulerConfig, scheduler, "search.scheduler"), epochs, "--tune-epochs")
    scheduler.update(fitted)
    return raw, [note] if note else []


def method_search_config(loaded: Config, variant: str, search: dict[str, Any], epochs: int) -> Config:
    """The search of ``variant``: named ``<name>-tune-<variant>`` (its study, folder and MLflow experiment),
    ``train.epochs`` = ``epochs`` (ASHA's ``max_t``), over the variant's default space with ``loaded``'s
    ``spaces`` entry laid over it (:func:`~tune_mtard.config.space.method_space`)."""
    run = method_search_base(loaded, variant)
    name = f"{loaded.name}-tune-{variant}"
    raw = run.run_config().to_dict()
    raw.update(name=name, search=search, space={key: to_plain(dist) for key, dist in (run.space or {}).items()})
    raw["train"]["epochs"] = epochs
    raw["mlflow"]["experiment"] = name
    return from_dict(raw, check_files=False)


def check_out(plan: TunedPlan) -> None:
    """A new comparison needs an unused ``--out``; ``--resume`` one that ran, asked for and configured the same."""
    state = plan.out / files.TUNED_STATE
    if not plan.resume:
        if state.exists() or (plan.out / files.COMPARISON_CSV).exists():
            raise ConfigError("--out", f"{plan.out} already holds a comparison; pass --resume to continue it, or "
                                       "choose another --out")
        return
    if not state.is_file():
        raise ConfigError("--resume", f"no tuned comparison to continue in {plan.out}")
    refuse_if_running(plan.out, "--resume")
    saved = json.loads(state.read_text())
    for key, value in plan.asked().items():
        if saved.get(key) != value:
            shown = {"search": "ran with another search section", "spaces": "searched other spaces"}.get(
                key, f"ran with {key} {saved.get(key)}, not {value}")
            raise ConfigError("--resume", f"the interrupted comparison {shown}")
    saved_base = load_config(plan.out / files.RUN_CONFIG, check_files=False).to_dict()
    for key, value in plan.base.to_dict().items():
        if saved_base.get(key) != value:
            raise ConfigError("--resume", f"the config differs from the interrupted comparison's in {key!r}")
    for method, cfg in plan.searches.items():
        refuse_if_running(plan.folder(method), "--resume")
        if ran_in(plan.folder(method)):
            check_experiment(cfg, resume=True)


# ------------------------------------------------------------------------------------------- running


def compare_tuned(request: CompareRequest) -> int:
    """``compare --tune N``: each method's search, then its best config on every seed; returns the exit code."""
    plan = plan_tuned(request)
    if request.plan:  # the cost of it all, nothing run (docs/search.md, "Planning a search")
        plan_tuned_comparison(plan.searches, plan.seeds, plan.base, plan.out)
        return 0
    try:
        with interrupts.sigterm_as_interrupt():
            return _run(plan)
    except (KeyboardInterrupt, Interrupted) as exc:
        signal_name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        raise Interrupted(signal_name, f"interrupted by {signal_name}: the comparison in {plan.out} stopped, its "
                                       "records KILLED; continue it with the same command and --resume") from None


def _run(plan: TunedPlan) -> int:
    base, out = plan.base, plan.out
    for note in plan.notes:
        print(note, flush=True)
    data = load_data(base)
    state_file = out / files.TUNED_STATE
    with SearchLock(out, "--resume" if plan.resume else "--out"):
        if plan.resume:
            state = json.loads(state_file.read_text())
        else:
            state = {**plan.asked(), "searches": {m: {"name": cfg.name, "wall_time_s": 0.0}
                                                  for m, cfg in plan.searches.items()}}
            atomic.write_text(out / files.RUN_CONFIG, to_yaml(base))
            atomic.write_text(state_file, json.dumps(state, indent=2))
        params = {**comparison_params(base, plan.methods, plan.seeds, plan.attacks), "compare.tune": plan.tune,
                  "compare.tune_epochs": plan.tune_epochs, **flatten(to_plain(plan.search), "compare.search.")}
        header = (f"compare {base.name} --tune {plan.tune}: {', '.join(plan.methods)}, each searched with "
                  f"{plan.tune} trials of {plan.tune_epochs} epochs, then trained on seeds "
                  f"{', '.join(map(str, plan.seeds))} for {base.train.epochs} epochs on {resolve_device(base.device)}")
        with comparison_run(base, data, out, f"{base.name}-compare-tuned", params, header,
                            {cfg.method for cfg in plan.searches.values()}, id_file=out / files.PARENT_RUN_ID,
                            resume=plan.resume) as (parent, teachers):
            outcomes = run_searches(plan, state, state_file, parent)
            configs = final_configs(plan, outcomes)
            n_test = test_examples(base, data)

            def tabulate(results: Sequence[SeedRun]) -> tuple[list[dict[str, Any]], str]:
                return tuned_table(plan, outcomes, results, n_test)

            done = read_results(out / files.COMPARISON_CSV) if plan.resume else []
            if plan.resume:
                _delete_killed_runs(parent.client, parent.experiment_id, parent.run_id)
            tags = {m: {"compare.search_run_id": o.parent_run_id, "compare.search_dir": str(plan.folder(m))}
                    for m, o in outcomes.items()}
            results = run_seeds(configs, data, teachers.models, out, parent, base.seed, plan.attacks,
                                tabulate, done, tags)
            failed = record_comparison(parent, base, out, results, *tabulate(results))
            no_result = [m for m, o in outcomes.items() if o.best is None]
            parent.failed = bool(failed or no_result)
    for method in no_result:
        print(f"the search of {method} found no usable trial (every trial failed or diverged): see "
              f"{plan.folder(method) / files.SUMMARY_JSON}", file=sys.stderr)
    return report_failures(failed, len(results)) or int(bool(no_result))


def search_status(folder: Path) -> str:
    """``finished`` or ``no_usable_trial`` (done), ``interrupted`` (started: resume it) or ``new``."""
    summary = folder / files.SUMMARY_JSON
    if summary.is_file():
        status = json.loads(summary.read_text())["status"]
        if status in DONE:
            return status
    return "interrupted" if ran_in(folder) else "new"


def run_searches(plan: TunedPlan, state: dict[str, Any], state_file: Path, parent) -> dict[str, MethodSearch]:
    """Each method's search, one after the other, on one local Ray (unless one is running already); a search
    that ended before is not run again. Links each search's parent run to the comparison's parent run."""
    todo = [m for m in plan.methods if search_status(plan.folder(m)) not in DONE]
    outcomes = {}
    with ray_session(needed=bool(todo)):
        for i, method in enumerate(plan.methods, start=1):
            cfg, folder = plan.searches[method], plan.folder(method)
            status = search_status(folder)
            if status in DONE:
                print(f"[search {i}/{len(plan.methods)}] {method}: ended {status} before; not run again", flush=True)
            else:
                print(f"[search {i}/{len(plan.methods)}] {method}: {'resuming ' if status != 'new' else ''}"
                      f"{plan.tune} trials of {plan.tune_epochs} epochs over {', '.join(cfg.space)}", flush=True)
                start = time.perf_counter()
                try:
                    driver.run_search(cfg, resume=status != "new", quiet=True)
                finally:
                    state["searches"][method]["wall_time_s"] += time.perf_counter() - start
                    atomic.write_text(state_file, json.dumps(state, indent=2))
            outcomes[method] = read_outcome(method, cfg, folder, state["searches"][method]["wall_time_s"])
            parent.set_tags({f"tune.{method}.search_run_id": outcomes[method].parent_run_id,
                             f"tune.{method}.search_experiment": cfg.mlflow.experiment,
                             f"tune.{method}.search_status": outcomes[method].status,
                             f"tune.{method}.search_dir": str(folder)})
    return outcomes


def read_outcome(method: str, cfg: Config, folder: Path, wall_time_s: float) -> MethodSearch:
    """A search's outcome from its folder: ``summary.json``, the parent run id and ``best_config.yaml``."""
    summary = json.loads((folder / files.SUMMARY_JSON).read_text())
    best = None
    if summary["status"] == "finished":
        best = load_config(folder / files.BEST_CONFIG, check_files=False)
        check_teacher_files(best, roles_for([best.method]))  # the pinned teachers are the comparison's
    return MethodSearch(method, cfg, summary["status"], summary, (folder / files.PARENT_RUN_ID).read_text().strip(),
                         wall_time_s or summary.get("wall_time_s", 0.0), best)


def final_configs(plan: TunedPlan, outcomes: dict[str, MethodSearch]) -> dict[tuple[str, int], Config]:
    """Each method's best config on every seed, seed by seed: the seed changed, ``train.epochs`` the base
    config's (the search may have run shorter), ``name`` and ``mlflow.*`` the comparison's."""
    base = plan.base
    return {(method, seed): outcomes[method].best.with_values({
                "seed": seed, "train.epochs": base.train.epochs, "name": base.name,
                "mlflow.tracking_uri": base.mlflow.tracking_uri, "mlflow.experiment": base.mlflow.experiment})
            for seed in plan.seeds for method in plan.methods if outcomes[method].best is not None}


def _delete_killed_runs(client, experiment: str, parent_run_id: str) -> None:
    """The runs an interrupted comparison left KILLED: a resumed comparison trains them again, without duplicates."""
    for run in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                             "and attributes.status = 'KILLED'"):
        client.delete_run(run.info.run_id)


# ---------------------------------------------------------------------------------------- the table


def tuned_table(plan: TunedPlan, outcomes: dict[str, MethodSearch], results: Sequence[SeedRun],
                n_test: int) -> tuple[list[dict[str, Any]], str]:
    """The summary rows (each with its search's budget and tuned values) and the markdown of a tuned comparison:
    the test table with the tuned values and the budget next to each method, and a line when ASHA spent
    different amounts on different methods."""
    shown = [m for m in plan.methods if outcomes[m].best is None or any(r.method == m for r in results)]
    summary = summarize(results, shown)
    for row in summary:
        outcome = outcomes[row["method"]]
        if outcome.best is None:
            row["note"] = "search found no usable trial"
        row.update(outcome.budget())
    extra: dict[str, dict[str, str]] = {"tuned values": {}, "trials": {}, "epochs": {}, "search time": {}}
    for method in shown:
        o, budget = outcomes[method], outcomes[method].budget()
        extra["tuned values"][method] = tuned_text(o.tuned)
        failed = f" ({budget['search_failed_trials']} failed)" if budget["search_failed_trials"] else ""
        extra["trials"][method] = f"{budget['search_trials']}{failed}"
        extra["epochs"][method] = (f"{budget['search_epochs_spent']} of {o.epochs_cap} "
                                   f"({100 * budget['search_epochs_fraction']:.0f}%)")
        extra["search time"][method] = f"{budget['search_wall_time_s']:.0f} s"
    s = plan.search
    scheduler = describe_scheduler(s.scheduler)
    lines = [f"Each method at its own searched best: {plan.tune} trials of at most {plan.tune_epochs} epochs per "
             f"method ({plan.tune * plan.tune_epochs} epochs at most), {s.sampler.type} sampler seed {s.sampler.seed}, "
             f"{scheduler}, on {s.metric}; then {plan.base.train.epochs} epochs per seed.", "",
             markdown_table(summary, plan.attacks, plan.seeds, n_test, plan.base.attack.epsilon,
                            plan.base.eval.clean_weight, extra)]
    unequal = budget_difference(outcomes)
    return summary, "\n".join(lines) + (f"\n{unequal}\n" if unequal else "")


def tuned_text(values: dict[str, Any]) -> str:
    """``lr=0.0731, trades_beta=4.93``: each key by its last part unless two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in values]
    names = [part if last.count(part) == 1 else key for key, part in zip(values, last, strict=True)]
    return ", ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in zip(names, values.values(), strict=True))


def budget_difference(outcomes: dict[str, MethodSearch]) -> str:
    """A line saying how many epochs each search spent, when they differ (ASHA stopped more of some methods'
    trials); empty when every method spent the same."""
    spent = {m: o.budget()["search_epochs_spent"] for m, o in outcomes.items()}
    if len(set(spent.values())) <= 1:
        return ""
    return "ASHA spent different budgets: " + ", ".join(
        f"{m} {spent[m]} of {o.epochs_cap} epochs ({100 * spent[m] / o.epochs_cap:.0f}%)" for m, o in outcomes.items())
