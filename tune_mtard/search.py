"""Run a search: ``python -m tune_mtard.search --space SPACE``.

Optuna's TPE proposes configurations (study persisted at ``<storage>/<name>/optuna.db``), Ray Tune runs
them as trials of the B-MTARD loop, ASHA stops weak ones early on validation W-Robust Acc, MLflow records
a parent run for the search and a child run per trial, and the best trial's config is written to
``<storage>/<name>/best_config.yaml`` for the final training run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tune_mtard.cli import ArgumentParser, add_set_flag, run
from tune_mtard.config import Config, Distribution, absolute_tracking_uri, find_config_file, flatten, load_config, to_yaml
from tune_mtard.errors import ConfigError
from tune_mtard.tuning import (
    BEST_CONFIG, PARENT_RUN_FILE, SPACE_FILE, TrialSummary, best_trial,
)



def resolve_space(space: str) -> Path:
    """A path; else a file name in ``./search_spaces/``; else one of the spaces installed with the package."""
    try:
        return find_config_file(space)
    except ConfigError as exc:
        raise ConfigError("--space", f"{space}: {exc.message}") from None


def build_search_config(args: Any) -> Config:
    """The space file with every flag applied, validated; exits 2 on any problem before Ray starts."""
    overrides = list(args.overrides)
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError("--num-samples", "must be >= 1")
        overrides.append(f"search.num_samples={args.num_samples}")
    if args.storage is not None:
        overrides.append(f"search.storage={args.storage}")
    if args.tracking_uri is not None:
        overrides.append(f"mlflow.tracking_uri={args.tracking_uri}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError("--max-epochs", "must be >= 1")
    cfg = load_config(resolve_space(args.space), overrides)
    if args.max_epochs is not None and args.max_epochs < cfg.train.epochs:
        cfg = cfg.with_values({"train.epochs": args.max_epochs})  # shrinks only; milestones are fractions
    if cfg.search is not None and "://" in cfg.search.storage:
        raise ConfigError("search.storage", f"{cfg.search.storage}: cloud URIs are not supported; use a folder "
                                            "every node mounts at the same path")
    if cfg.search is None or not cfg.space:
        raise ConfigError("--space", f"{args.space} has no space section: it is a run config (use tune_mtard.train)")
    return cfg


def reproducible_values(cfg: Config, sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values plus the thread count it ran with, so ``train`` repeats it exactly on a CPU."""
    threads = cfg.perf.threads or max(1, int(cfg.search.resources.cpu))
    return {**sampled, "perf.threads": threads}


def teacher_config(cfg: Config) -> Config:
    """The run config whose method needs every teacher some trial will use (``method`` may be searched)."""
    from tune_mtard.config import Method
    from tune_mtard.methods import NEEDS_TEACHERS

    methods = {cfg.method} | {Method(m) for m in (cfg.space or {}).get("method", Distribution("categorical", choices=[])).choices or []}
    roles = set().union(*(NEEDS_TEACHERS.get(m, ()) for m in methods))
    if "clean" in roles:
        return cfg.run_config().with_values({"method": Method.BMTARD.value})
    if "robust" in roles:
        return cfg.run_config().with_values({"method": Method.ARD.value})
    return cfg.run_config()


def experiment_dir(cfg: Config) -> Path:
    assert cfg.search is not None
    return Path(cfg.search.storage) / cfg.name


def _check_experiment(cfg: Config, resume: bool, tracking_uri: str | None = None) -> None:
    folder = experiment_dir(cfg)
    exists = (folder / "tuner.pkl").exists() and (folder / SPACE_FILE).exists()
    if resume and not exists:
        raise ConfigError("--resume", f"no interrupted search named {cfg.name!r} in {folder.parent}")
    if resume:
        saved = load_config(folder / SPACE_FILE, check_files=False)
        for key, value in cfg.to_dict(with_search=False).items():
            if key in ("mlflow",):
                continue
            if saved.to_dict().get(key) != value:
                raise ConfigError("--resume", f"the config differs from the interrupted search's in {key!r}")
        if tracking_uri is not None and absolute_tracking_uri(tracking_uri) != saved.mlflow.tracking_uri:
            raise ConfigError("--tracking-uri", f"the interrupted search records to {saved.mlflow.tracking_uri}; "
                                                "resume it with the same MLflow store")
    elif folder.exists() and any(folder.iterdir()):
        raise ConfigError("name", f"a search named {cfg.name!r} already exists in {folder.parent}; "
                                  "pass --resume to continue it, or --set name=NEW")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tune_mtard.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", required=True, help="search space: a path, or a file name in ./search_spaces/ "
                                                       "or among the installed spaces (e.g. cifar10.yaml)")
    parser.add_argument("--num-samples", type=int, default=None, help="number of trials (search.num_samples)")
    parser.add_argument("--max-epochs", type=int, default=None, help="shrink train.epochs (the schedule scales with it)")
    parser.add_argument("--storage", default=None, help="folder or URI for results (search.storage)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (mlflow.tracking_uri)")
    parser.add_argument("--address", default=None, help="connect to an existing Ray cluster (e.g. auto, ray://host:10001)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    parser.add_argument("--no-progress", action="store_true", help="quiet: no Ray Tune status tables")
    add_set_flag(parser)
    args = parser.parse_args(argv)

    cfg = build_search_config(args)
    cfg.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    _check_experiment(cfg, args.resume, args.tracking_uri)
    if args.resume:
        cfg = _resumed_config(cfg)
    return run_search(cfg, resume=args.resume, address=args.address, quiet=args.no_progress)


def _resumed_config(cfg: Config) -> Config:
    """On resume the interrupted search's own config rules (its MLflow store too), except where it is stored."""
    saved = load_config(experiment_dir(cfg) / SPACE_FILE, check_files=False)
    saved.search.storage = cfg.search.storage
    return saved


def run_search(cfg: Config, resume: bool = False, address: str | None = None, quiet: bool = False) -> int:
    """Prepare data and teachers, run the Tuner, then pick, export and record the best trial."""
    import ray
    from ray import tune

    from tune_mtard import tracking
    from tune_mtard.data import load_data
    from tune_mtard.engine import resolve_device
    from tune_mtard.teachers import prepare_teachers
    from tune_mtard.tuning import (
        close_orphaned_optuna_trials, delete_orphaned_child_runs, finished_optuna_trials,
        quiet_experiment_analysis, tolerate_deleted_checkpoints,
    )
    from trainables.bmtard import train_bmtard

    assert cfg.search is not None and cfg.space is not None
    s = cfg.search
    folder = experiment_dir(cfg)
    start = time.perf_counter()

    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    teachers = prepare_teachers(teacher_config(cfg), data, device, progress=not quiet and sys.stderr.isatty())
    teacher_weights = {role: (getattr(cfg.teachers, role).arch, model.cpu().state_dict())
                       for role, model in teachers.items()}

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="warning",
                 log_to_driver=not quiet, configure_logging=True)
    # Every trial checkpoints each epoch, so Tune's snapshots of the experiment are frequent by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tolerate_deleted_checkpoints()

    folder.mkdir(parents=True, exist_ok=True)
    client = tracking.client_for(cfg.mlflow.tracking_uri)
    experiment_id = tracking.experiment_id(client, cfg.mlflow.experiment)
    parent_run_id = parent_run(client, cfg, folder, experiment_id, resume)

    # A resumed trial that the killed driver had already finished only reports its last epoch again.
    finished = finished_optuna_trials(folder, cfg.name) if resume else set()
    trainable = tune.with_resources(
        tune.with_parameters(train_bmtard, base=cfg.run_config(), data=data, teachers=teacher_weights,
                             finished=finished),
        {"cpu": s.resources.cpu, "gpu": s.resources.gpu},
    )
    if resume:
        with quiet_experiment_analysis():
            tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = new_tuner(cfg, trainable, folder, experiment_id, parent_run_id, quiet)
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, "KILLED")
        raise

    trials = summarize_trials(grid)
    trial_ids = {t.trial_id for t in trials}
    close_orphaned_optuna_trials(folder, cfg.name, trial_ids)
    delete_orphaned_child_runs(client, experiment_id, parent_run_id, trial_ids)
    best = best_trial(trials, s.metric, s.mode, cfg.train.epochs)
    wall = time.perf_counter() - start
    best_path = folder / BEST_CONFIG
    if best is not None:
        best_cfg = cfg.run_config().with_values(reproducible_values(cfg, best.sampled))
        best_cfg.dump(best_path)
    _record_parent(client, parent_run_id, cfg, folder, trials, best, wall)
    if s.final_eval.top_k > 0 and best is not None:
        from tune_mtard.final_eval import evaluate_top_trials

        evaluate_top_trials(cfg, trials, data, client, parent_run_id, folder)
    failed = [t for t in trials if t.status == "ERROR"]
    client.set_terminated(parent_run_id, "FAILED" if best is None else "FINISHED")
    _print_result(cfg, trials, best, best_path, wall, folder)
    return 1 if best is None or failed else 0


def new_tuner(cfg: Config, trainable, folder: Path, experiment_id: str, parent_run_id: str, quiet: bool):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tune_mtard.tuning import (
        MlflowTrialRecorder, PrunedAwareOptunaSearch, default_point, optuna_distributions, optuna_storage_url,
    )

    s = cfg.search
    if s.sampler.type == "tpe":
        sampler = optuna.samplers.TPESampler(seed=s.sampler.seed, n_startup_trials=s.sampler.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.sampler.seed)
    storage = optuna.storages.RDBStorage(optuna_storage_url(folder))
    point = default_point(cfg)
    searcher = PrunedAwareOptunaSearch(
        space=optuna_distributions(cfg.space), metric=s.metric, mode=s.mode, sampler=sampler,
        study_name=cfg.name, storage=storage, points_to_evaluate=[point] if point else None,
        full_epochs=cfg.train.epochs,
    )
    searcher = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=s.scheduler.grace_period,
                                  reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    recorder = MlflowTrialRecorder(cfg.mlflow.tracking_uri, experiment_id, parent_run_id, cfg.train.epochs, cfg.name)
    # Reused actors spare each trial a fresh worker process (and its torch import); a trial's state is
    # its own all the same, since the Trainer seeds every RNG and builds every model anew.
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(folder.parent), callbacks=[recorder],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0 if quiet else 1,
        ),
    )


def parent_run(client, cfg: Config, folder: Path, experiment_id: str, resume: bool) -> str:
    """The search's parent run: the same one after a resume."""
    from tune_mtard import tracking

    id_file = folder / PARENT_RUN_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=cfg.name, tags={"tune_mtard.command": "search",
                                                                     "tune_mtard.experiment_dir": str(folder)})
    run_id = run.info.run_id
    id_file.write_text(run_id)
    (folder / SPACE_FILE).write_text(to_yaml(cfg, with_search=True))
    tracking.log_params(client, run_id, flatten(cfg.to_dict(with_search=True)["search"], "search."))
    tracking.log_params(client, run_id, {"name": cfg.name, "data.dataset": cfg.data.dataset,
                                         "train.epochs": cfg.train.epochs, "method": cfg.method.value})
    client.log_artifact(run_id, str(folder / SPACE_FILE))
    return run_id


def summarize_trials(grid_or_trials) -> list[TrialSummary]:
    """Trials of a finished :class:`ray.tune.ResultGrid` as :class:`TrialSummary` rows."""
    summaries = []
    for result in grid_or_trials:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        checkpoint = result.checkpoint
        summaries.append(TrialSummary(
            trial_id=str(trial_id),
            sampled=dict(result.config or {}),
            status="ERROR" if result.error else "TERMINATED",
            epochs=int(metrics.get("epoch", 0) or 0),
            metrics=metrics,
            checkpoint_dir=checkpoint.path if checkpoint is not None else None,
        ))
    return summaries


def write_trials_csv(trials: list[TrialSummary], path: Path, space_keys: list[str], full_epochs: int) -> None:
    columns = ["trial_id", "state", "epochs", "val_clean_acc", "val_robust_acc", "val_w_robust_acc"] + space_keys
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for t in trials:
            state = "FAIL" if t.status == "ERROR" else ("COMPLETE" if t.epochs >= full_epochs else "PRUNED")
            writer.writerow([t.trial_id, state, t.epochs] + [t.metrics.get(k, "") for k in columns[3:6]]
                            + [t.sampled.get(k, "") for k in space_keys])


def plot_trials(trials: list[TrialSummary], best: TrialSummary | None, path: Path) -> None:
    """Clean vs robust validation accuracy across trials, the best one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    xs = [t.metric("val_clean_acc") for t in trials]
    ys = [t.metric("val_robust_acc") for t in trials]
    ax.scatter(xs, ys, c="tab:blue", label="trials", alpha=0.7)
    if best is not None:
        ax.scatter([best.metric("val_clean_acc")], [best.metric("val_robust_acc")], marker="*", s=300,
                   c="tab:red", label=f"best ({best.trial_id})")
    ax.set_xlabel("validation clean accuracy")
    ax.set_ylabel("validation robust accuracy (PGD)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _record_parent(client, run_id: str, cfg: Config, folder: Path, trials: list[TrialSummary],
                   best: TrialSummary | None, wall: float) -> None:
    from tune_mtard import tracking

    trials_csv = folder / "trials.csv"
    write_trials_csv(trials, trials_csv, list(cfg.space or {}), cfg.train.epochs)
    scatter = folder / "trials_clean_vs_robust.png"
    plot_trials(trials, best, scatter)
    artifacts = [trials_csv, scatter]
    summary: dict[str, float] = {
        "n_trials": len(trials),
        "n_complete": sum(t.epochs >= cfg.train.epochs and t.status != "ERROR" for t in trials),
        "n_pruned": sum(t.epochs < cfg.train.epochs and t.status != "ERROR" for t in trials),
        "n_failed": sum(t.status == "ERROR" for t in trials),
        "epochs_spent": sum(t.epochs for t in trials),
        "epochs_full_budget": len(trials) * cfg.train.epochs,
        "wall_time_s": wall,
    }
    if best is not None:
        for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc"):
            summary[f"best_{key}"] = best.metric(key)
        artifacts.append(folder / BEST_CONFIG)
        tracking.set_tags(client, run_id, {"best_trial_id": best.trial_id})
    tracking.log_metrics(client, run_id, summary, step=0)
    (folder / "summary.json").write_text(json.dumps(
        dict(summary, best_trial_id=best.trial_id if best else None), indent=2))
    artifacts.append(folder / "summary.json")
    tracking.log_artifacts(client, run_id, artifacts)


def _print_result(cfg: Config, trials: list[TrialSummary], best: TrialSummary | None, best_path: Path,
                  wall: float, folder: Path) -> None:
    full = cfg.train.epochs
    pruned = [t for t in trials if t.epochs < full and t.status != "ERROR"]
    print()
    print(f"search {cfg.name}: {len(trials)} trials, {len(pruned)} stopped early by ASHA, "
          f"{sum(t.epochs for t in trials)} of {len(trials) * full} epochs, {wall:.0f}s")
    if best is None:
        print("no trial reported the metric; see the Ray Tune logs in", folder)
        return
    metric = cfg.search.metric
    print(f"best trial {best.trial_id}: {metric} {best.metric(metric):.4f} "
          f"(clean {best.metric('val_clean_acc'):.4f}, robust {best.metric('val_robust_acc'):.4f}, "
          f"{best.epochs} epochs)")
    for key, value in best.sampled.items():
        print(f"  {key} = {value:.6g}" if isinstance(value, float) else f"  {key} = {value}")
    print(f"best config: {best_path}")
    print(f"train it:    python -m tune_mtard.train --config {best_path}")
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:") or "://" not in uri:
        print(f"MLflow UI:   mlflow ui --backend-store-uri {uri}")
    else:
        print(f"MLflow:      {uri} (experiment {cfg.mlflow.experiment})")


if __name__ == "__main__":
    run(main)
