"""The search driver: a space file to a finished search (docs/search.md).

Optuna's TPE proposes configurations (study persisted at ``<storage>/<name>/optuna.db``), Ray Tune runs
them as trials of the B-MTARD loop (``tune_mtard.trainables.bmtard``), ASHA stops weak ones early on
validation W-Robust Acc, MLflow records a parent run for the search and a child run per trial, and the
best trial's config is written to ``<storage>/<name>/best_config.yaml`` for the final training run.

Ray, Optuna and MLflow are imported only once the request has been validated, so bad input is rejected
in a second, before anything starts.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_mtard import files
from tune_mtard.config import Config, absolute_tracking_uri, find_config_file, load_config
from tune_mtard.errors import ConfigError


@dataclass
class SearchRequest:
    """What the ``search`` command asks for (docs/cli.md, "search")."""

    space: str
    num_samples: int | None = None
    max_epochs: int | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    quiet: bool = False
    overrides: list[str] = field(default_factory=list)


def resolve_space(space: str) -> Path:
    """A path; else a file name in ``./search_spaces/``; else one of the spaces installed with the package."""
    try:
        return find_config_file(space)
    except ConfigError as exc:
        raise ConfigError("--space", f"{space}: {exc.message}") from None


def search_config(request: SearchRequest) -> Config:
    """The space file with every flag applied, validated; ConfigError (exit 2) on any problem, before Ray starts."""
    overrides = list(request.overrides)
    if request.num_samples is not None:
        if request.num_samples < 1:
            raise ConfigError("--num-samples", "must be >= 1")
        overrides.append(f"search.num_samples={request.num_samples}")
    if request.storage is not None:
        overrides.append(f"search.storage={request.storage}")
    if request.tracking_uri is not None:
        overrides.append(f"mlflow.tracking_uri={request.tracking_uri}")
    if request.max_epochs is not None and request.max_epochs < 1:
        raise ConfigError("--max-epochs", "must be >= 1")
    cfg = load_config(resolve_space(request.space), overrides)
    if request.max_epochs is not None and request.max_epochs < cfg.train.epochs:
        cfg = cfg.with_values({"train.epochs": request.max_epochs})  # shrinks only; milestones are fractions
    if cfg.search is not None and "://" in cfg.search.storage:
        raise ConfigError("search.storage", f"{cfg.search.storage}: cloud URIs are not supported; use a folder "
                                            "every node mounts at the same path")
    if cfg.search is None or not cfg.space:
        raise ConfigError("--space", f"{request.space} has no space section: it is a run config (use tune_mtard.train)")
    cfg.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    return cfg


def experiment_dir(cfg: Config) -> Path:
    assert cfg.search is not None
    return Path(cfg.search.storage) / cfg.name


def reproducible_values(cfg: Config, sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values plus the thread count it ran with, so ``train`` repeats it exactly on a CPU."""
    threads = cfg.perf.threads or max(1, int(cfg.search.resources.cpu))
    return {**sampled, "perf.threads": threads}


def searched_methods(cfg: Config) -> set[str]:
    """The methods some trial will train: the base config's and, when ``method`` is searched, its choices."""
    dist = (cfg.space or {}).get("method")
    return {cfg.method} | set(dist.choices if dist is not None and dist.choices else [])


def check_experiment(cfg: Config, resume: bool, tracking_uri: str | None = None) -> None:
    """A new search needs an unused name; a resumed one, an interrupted search of that name and the same config."""
    folder = experiment_dir(cfg)
    exists = (folder / "tuner.pkl").exists() and (folder / files.SPACE).exists()
    if resume and not exists:
        raise ConfigError("--resume", f"no interrupted search named {cfg.name!r} in {folder.parent}")
    if resume:
        saved = load_config(folder / files.SPACE, check_files=False)
        for key, value in cfg.to_dict(with_search=False).items():
            if key == "mlflow":
                continue
            if saved.to_dict().get(key) != value:
                raise ConfigError("--resume", f"the config differs from the interrupted search's in {key!r}")
        if tracking_uri is not None and absolute_tracking_uri(tracking_uri) != saved.mlflow.tracking_uri:
            raise ConfigError("--tracking-uri", f"the interrupted search records to {saved.mlflow.tracking_uri}; "
                                                "resume it with the same MLflow store")
    elif folder.exists() and any(folder.iterdir()):
        raise ConfigError("name", f"a search named {cfg.name!r} already exists in {folder.parent}; "
                                  "pass --resume to continue it, or --set name=NEW")


def search(request: SearchRequest) -> int:
    """The ``search`` command: validate, then run (or resume) the search; returns the exit code."""
    cfg = search_config(request)
    check_experiment(cfg, request.resume, request.tracking_uri)
    if request.resume:
        # The interrupted search's own config rules (its MLflow store too), except where it is stored.
        saved = load_config(experiment_dir(cfg) / files.SPACE, check_files=False)
        saved.search.storage = cfg.search.storage
        cfg = saved
    return run_search(cfg, resume=request.resume, address=request.address, quiet=request.quiet)


def run_search(cfg: Config, resume: bool = False, address: str | None = None, quiet: bool = False) -> int:
    """Prepare data and teachers, run the Tuner, then pick, export and record the best trial."""
    import ray
    from ray import tune

    from tune_mtard import tracking
    from tune_mtard.data import load_data
    from tune_mtard.perf import resolve_device
    from tune_mtard.search import compat
    from tune_mtard.search.recorder import delete_orphaned_child_runs, record_search, start_parent_run
    from tune_mtard.search.searcher import close_orphaned_optuna_trials, finished_optuna_trials
    from tune_mtard.search.trials import best_trial, summarize_results
    from tune_mtard.teachers import prepare_teachers, roles_for
    from tune_mtard.trainables.bmtard import train_bmtard

    assert cfg.search is not None and cfg.space is not None
    s = cfg.search
    folder = experiment_dir(cfg)
    start = time.perf_counter()

    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    teachers = prepare_teachers(cfg.run_config(), data, device, progress=not quiet and sys.stderr.isatty(),
                                roles=roles_for(searched_methods(cfg)))
    teacher_weights = {role: (getattr(cfg.teachers, role).arch, model.cpu().state_dict())
                       for role, model in teachers.items()}

    if not ray.is_initialized():
        # Without --address, a local Ray of our own, whatever address file a past `ray start` left behind.
        ray.init(address=address or "local", include_dashboard=False, logging_level="warning",
                 log_to_driver=not quiet, configure_logging=True)
    # Every trial checkpoints each epoch, so Tune's snapshots of the experiment are frequent by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    compat.tolerate_deleted_checkpoints()

    folder.mkdir(parents=True, exist_ok=True)
    client = tracking.client_for(cfg.mlflow.tracking_uri)
    experiment_id = tracking.experiment_id(client, cfg.mlflow.experiment)
    id_file = folder / files.PARENT_RUN_ID
    if resume and id_file.is_file():
        parent_run_id = id_file.read_text().strip()
        client.update_run(parent_run_id, status=tracking.RUNNING)
    else:
        parent_run_id = start_parent_run(client, cfg, folder, experiment_id)

    # A resumed trial that the killed driver had already finished only reports its last epoch again.
    finished = finished_optuna_trials(folder, cfg.name) if resume else set()
    trainable = tune.with_resources(
        tune.with_parameters(train_bmtard, base=cfg.run_config(), data=data, teachers=teacher_weights,
                             finished=finished),
        {"cpu": s.resources.cpu, "gpu": s.resources.gpu},
    )
    if resume:
        with compat.quiet_experiment_analysis():
            tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = new_tuner(cfg, trainable, folder, experiment_id, parent_run_id, quiet)
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, tracking.KILLED)
        raise

    trials = summarize_results(grid)
    trial_ids = {t.trial_id for t in trials}
    close_orphaned_optuna_trials(folder, cfg.name, trial_ids)
    delete_orphaned_child_runs(client, experiment_id, parent_run_id, trial_ids)
    best = best_trial(trials, s.metric, s.mode, cfg.train.epochs)
    wall = time.perf_counter() - start
    best_path = folder / files.BEST_CONFIG
    if best is not None:
        cfg.run_config().with_values(reproducible_values(cfg, best.sampled)).dump(best_path)
    record_search(client, parent_run_id, cfg, folder, trials, best, wall)
    if s.final_eval.top_k > 0 and best is not None:
        from tune_mtard.search.final_eval import evaluate_top_trials

        evaluate_top_trials(cfg, trials, data, client, parent_run_id, folder)
    failed = [t for t in trials if t.failed]
    client.set_terminated(parent_run_id, tracking.FAILED if best is None else tracking.FINISHED)
    _print_result(cfg, trials, best, best_path, wall, folder)
    return 1 if best is None or failed else 0


def new_tuner(cfg: Config, trainable, folder: Path, experiment_id: str, parent_run_id: str, quiet: bool,
              recorder_class: type | None = None, searcher_class: type | None = None):
    """The Tuner of a new search: the Optuna searcher, the scheduler and the MLflow recorder (a benchmark may
    pass subclasses of the last two that time them)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tune_mtard.search.recorder import MlflowTrialRecorder
    from tune_mtard.search.searcher import (
        PrunedAwareOptunaSearch, default_point, optuna_distributions, optuna_storage_url,
    )

    s = cfg.search
    if s.sampler.type == "tpe":
        sampler = optuna.samplers.TPESampler(seed=s.sampler.seed, n_startup_trials=s.sampler.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.sampler.seed)
    storage = optuna.storages.RDBStorage(optuna_storage_url(folder))
    point = default_point(cfg)
    searcher = (searcher_class or PrunedAwareOptunaSearch)(
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
    recorder = (recorder_class or MlflowTrialRecorder)(cfg.mlflow.tracking_uri, experiment_id, parent_run_id, cfg.train.epochs, cfg.name)
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


def _print_result(cfg: Config, trials, best, best_path: Path, wall: float, folder: Path) -> None:
    full = cfg.train.epochs
    pruned = [t for t in trials if t.epochs < full and not t.failed]
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
