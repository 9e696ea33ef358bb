"""The search driver: a space file to a finished search (docs/search.md).

Optuna's TPE proposes configurations (study persisted at ``<storage>/<name>/optuna.db``), Ray Tune runs
them as trials of the B-MTARD loop (``tune_mtard.trainables.bmtard``), ASHA stops weak ones early on
validation W-Robust Acc, MLflow records a parent run for the search and a child run per trial, and the
best trial's config is written to ``<storage>/<name>/best_config.yaml`` for the final training run.

A search ends in one of three outcomes (docs/search.md, "Outcomes"): ``finished`` (exit 0),
``no_usable_trial`` (every trial failed or diverged; exit 1) or ``interrupted`` (SIGINT or SIGTERM; exit
130 or 143, resumable). Everything a user can get wrong is checked before anything is written, and one
driver at a time works on a search (a lock in its folder). Ray, Optuna and MLflow are imported only once
the request has been validated.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_mtard import atomic, files, tracking
from tune_mtard.config import Config, absolute_tracking_uri, find_config_file, load_config
from tune_mtard.data import load_data
from tune_mtard.errors import ConfigError, Interrupted
from tune_mtard.perf import check_trial_device, release_cuda_memory, resolve_device
from tune_mtard.search import compat, interrupts, journal
from tune_mtard.search.compat import largest_node, reopen_search_generator, unreachable_ray_address
from tune_mtard.search.confirm import confirm_tuner
from tune_mtard.search.local_ray import ray_session
from tune_mtard.search.lock import SearchLock, refuse_if_running
from tune_mtard.search.nodes import check_nodes_see_storage
from tune_mtard.search.outcome import SearchOutcome, conclude, interrupted
from tune_mtard.search.plan import plan_search
from tune_mtard.search.resume import check_same_search
from tune_mtard.search.schedulers import build_scheduler, check_first_rung, fit_to_epochs
from tune_mtard.search.space_methods import searched_methods
from tune_mtard.search.study_storage import check_database, delete_study, optuna_storage_url
from tune_mtard.search.trials import load_experiment_trials
from tune_mtard.search.workers import DRIVER_CPU as WORKERS_DRIVER_CPU
from tune_mtard.services import check_private, check_search_folder, check_tracking_uri, masked_uri
from tune_mtard.teachers import check_teacher_files, prepare_teachers, roles_for


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
    plan: bool = False  # forecast the cost, run nothing (docs/search.md, "Planning a search")
    plan_device: str | None = None
    plan_cluster: str | None = None


def resolve_space(space: str) -> Path:
    """A path; else a file name in ``./search_spaces/``; else one of the spaces installed with the package."""
    try:
        return find_config_file(space)
    except ConfigError as exc:
        raise ConfigError("--space", f"{space}: {exc.message}") from None


def search_config(request: SearchRequest) -> Config:
    """The space file with every flag applied, validated; ConfigError (exit 2) on any problem, before Ray starts.

    ``--max-epochs`` below ASHA's ``grace_period`` lowers the grace period to it (and says so).
    """
    if request.num_samples is not None and request.num_samples < 1:
        raise ConfigError("--num-samples", "must be >= 1")
    if request.max_epochs is not None and request.max_epochs < 1:
        raise ConfigError("--max-epochs", "must be >= 1")
    flags = {"search.num_samples": ("--num-samples", request.num_samples),
             "search.storage": ("--storage", request.storage),
             "mlflow.tracking_uri": ("--tracking-uri", request.tracking_uri)}
    cfg = load_config(resolve_space(request.space), request.overrides,
                      flags={key: flag for key, flag in flags.items() if flag[1] is not None})
    if cfg.search is None or not cfg.space:
        raise ConfigError("--space", f"{request.space} has no space section: it is a run config (use tune_mtard.train)")
    if request.max_epochs is not None and request.max_epochs < cfg.train.epochs:
        fitted, note = fit_to_epochs(cfg.search.scheduler, request.max_epochs, "--max-epochs")
        if note:
            print(note)
        cfg = cfg.with_values({"train.epochs": request.max_epochs,  # milestones are fractions: they scale
                               **{f"search.scheduler.{key}": value for key, value in fitted.items()}})
    check_first_rung(cfg.search.scheduler, cfg.train.epochs)
    if "://" in cfg.search.storage:
        raise ConfigError("search.storage", f"{cfg.search.storage}: cloud URIs are not supported; use a folder "
                                            "every node mounts at the same path")
    check_trial_device(cfg.device, cfg.search.resources.gpu)
    return cfg


def experiment_dir(cfg: Config) -> Path:
    assert cfg.search is not None
    return Path(cfg.search.storage) / cfg.name


def started(folder: Path) -> bool:
    """Whether a search ran in ``folder`` (Ray Tune wrote its state): only then can it be resumed."""
    return (folder / files.TUNER_STATE).exists() and (folder / files.SPACE).exists()


# Where the driver's machine keeps the data and the teacher cache: a driver resuming from another working
# folder (or machine) takes its own, relative ones resolved against its working folder.
DRIVER_PATHS = ("data.root", "teachers.cache_dir")


def saved_config(cfg: Config) -> Config:
    """The interrupted search's config, with this driver's ``DRIVER_PATHS``."""
    saved = load_config(experiment_dir(cfg) / files.SPACE, check_files=False)
    return saved.with_values({key: cfg.get(key) for key in DRIVER_PATHS})


def check_experiment(cfg: Config, resume: bool, tracking_uri: str | None = None,
                     num_samples: int | None = None) -> None:
    """A new search needs an unused name; a resumed one, a search of that name that ran, with the same config
    and search (``num_samples``: what ``--num-samples`` asked, if given)."""
    folder = experiment_dir(cfg)
    if resume and not started(folder):
        raise ConfigError("--resume", f"no interrupted search named {cfg.name!r} in {folder.parent}")
    if resume:
        check_private(folder)
        saved = saved_config(cfg)
        for key, value in cfg.to_dict(with_search=False).items():
            if key == "mlflow":
                continue
            if saved.to_dict().get(key) != value:
                raise ConfigError("--resume", f"the config differs from the interrupted search's in {key!r}")
        check_same_search(cfg, saved, num_samples)
        if tracking_uri is not None and absolute_tracking_uri(tracking_uri) != saved.mlflow.tracking_uri:
            raise ConfigError("--tracking-uri", f"the interrupted search records to "
                                                f"{masked_uri(saved.mlflow.tracking_uri)}; "
                                                "resume it with the same MLflow store")
    elif started(folder):
        raise ConfigError("name", f"a search named {cfg.name!r} already exists in {folder.parent}; "
                                  "pass --resume to continue it, or --set name=NEW")


def check_address(address: str | None) -> None:
    """``--address`` must name a reachable cluster: one line and exit 2 within seconds, not minutes of retries."""
    if address is None or address == "local":
        return

    problem = unreachable_ray_address(address)
    if problem is not None:
        raise ConfigError("--address", problem)


def search(request: SearchRequest) -> int:
    """The ``search`` command: validate, then run (or resume) the search; returns the exit code."""
    cfg = search_config(request)
    check_address(request.address)
    if request.plan:
        return plan(cfg, request)
    refuse_if_running(experiment_dir(cfg), "--resume" if request.resume else "name")
    check_experiment(cfg, request.resume, request.tracking_uri, request.num_samples)
    if request.resume:
        # The interrupted search's own config rules (its MLflow store and study too), except where it is stored.
        saved = saved_config(cfg)
        if cfg.search.optuna_storage and cfg.search.optuna_storage != saved.search.optuna_storage:
            raise ConfigError("search.optuna_storage", "the interrupted search's study is in "
                                                       f"{saved.search.optuna_storage or files.OPTUNA_DB}; "
                                                       "resume it with the same database")
        saved.search.storage = cfg.search.storage
        saved.search.budget = cfg.search.budget  # --resume with a larger budget continues
        saved.search.max_failures = cfg.search.max_failures  # and with more retries, retries more
        saved.search.num_samples = cfg.search.num_samples  # and with more trials, runs more
        cfg = saved
    check_tracking_uri(cfg.mlflow.tracking_uri, "--tracking-uri" if request.tracking_uri else "mlflow.tracking_uri")
    check_search_folder(experiment_dir(cfg), "--storage" if request.storage else "search.storage")
    check_database(cfg, request.resume)
    return run_search(cfg, resume=request.resume, address=request.address, quiet=request.quiet)


def plan(cfg: Config, request: SearchRequest) -> int:
    """``search --plan``: the forecast of a new search, written to ``plan.json``; no trial runs."""
    if request.resume:
        raise ConfigError("--plan", "plans a new search; it cannot be combined with --resume")
    roles = roles_for(searched_methods(cfg))
    check_teacher_files(cfg.run_config(), roles)
    plan_search(cfg, roles, request.plan_device, request.plan_cluster, request.address)
    return 0


def run_search(cfg: Config, resume: bool = False, address: str | None = None, quiet: bool = False) -> int:
    """Prepare everything, run the Tuner, then record the outcome; returns the exit code (raises
    :class:`~tune_mtard.errors.Interrupted` when a signal stopped it)."""
    import ray

    assert cfg.search is not None and cfg.space is not None
    folder = experiment_dir(cfg)
    start = time.perf_counter()
    data = load_data(cfg)
    roles = roles_for(searched_methods(cfg))
    check_teacher_files(cfg.run_config(), roles)
    resolve_device(cfg.device)  # the driver prepares the teachers there
    local_ray = address is None and not ray.is_initialized()
    if local_ray:
        check_local_resources(cfg)  # before Ray starts: a local Ray has this machine's CPUs and GPUs
    with ray_session(address, log_to_driver=not quiet):
        check_resources(cfg)
        if not local_ray:  # a cluster: its other nodes may not see the storage
            check_nodes_see_storage(cfg.search.storage, cfg.search.resources.cpu, cfg.search.resources.gpu)
        with SearchLock(folder, "--resume" if resume else "name") as lock:
            check_experiment(cfg, resume)  # again, under the lock: another driver may have started it
            try:
                return _run_locked(cfg, data, roles, folder, resume, quiet, start).exit_code
            except BaseException:
                if not resume and not started(folder):  # failed in its own setup: the name stays usable
                    _remove_setup(cfg, folder, lock.created_folder)
                raise


def check_resources(cfg: Config) -> None:
    """Every trial asks ``search.resources`` of one node: some node of the cluster must have that much."""
    cpu, gpu = largest_node()
    r = cfg.search.resources
    if r.cpu > cpu or r.gpu > gpu:
        raise ConfigError("search.resources", f"a trial asks for {r.cpu:g} CPU and {r.gpu:g} GPU, but the largest "
                                              f"node of the Ray cluster has {cpu:g} CPU and {gpu:g} GPU")
    if cfg.train.workers > 1:  # workers may span nodes: the cluster as a whole must hold one trial
        import ray

        total = ray.cluster_resources()
        check_workers_fit(cfg, float(total.get("CPU", 0)), float(total.get("GPU", 0)), "the Ray cluster")


def trial_resources(cfg: Config) -> dict[str, float]:
    """What Ray Tune reserves for a trial: ``search.resources``; with ``train.workers`` > 1 next to nothing, as
    the trial only waits for its Ray Train workers, which reserve ``search.resources`` each (docs/scale.md)."""
    r = cfg.search.resources
    return {"cpu": r.cpu, "gpu": r.gpu} if cfg.train.workers == 1 else {"cpu": WORKERS_DRIVER_CPU}


def check_workers_fit(cfg: Config, cpu: float, gpu: float, where: str) -> None:
    """A trial's ``train.workers`` workers of ``search.resources`` each, and the trial itself, fit in ``where``."""
    n, r = cfg.train.workers, cfg.search.resources
    need_cpu = n * r.cpu + WORKERS_DRIVER_CPU
    if n > 1 and (need_cpu > cpu + 1e-9 or n * r.gpu > gpu + 1e-9):
        raise ConfigError("train.workers", f"{n} workers of {r.cpu:g} CPU and {r.gpu:g} GPU each (search.resources) "
                                           f"and the trial's {WORKERS_DRIVER_CPU:g} CPU need {need_cpu:g} CPU and "
                                           f"{n * r.gpu:g} GPU, but {where} has {cpu:g} CPU and {gpu:g} GPU")


def check_local_resources(cfg: Config) -> None:
    import torch

    r = cfg.search.resources
    cpu, gpu = os.cpu_count() or 1, torch.cuda.device_count()
    if r.cpu > cpu or r.gpu > gpu:
        raise ConfigError("search.resources", f"a trial asks for {r.cpu:g} CPU and {r.gpu:g} GPU, but this machine "
                                              f"has {cpu} CPU and {gpu} GPU (pass --address to use a Ray cluster)")
    check_workers_fit(cfg, cpu, gpu, "this machine")


def _remove_setup(cfg: Config, folder: Path, created_folder: bool) -> None:
    """What a driver that failed before its search started wrote, so a rerun of the same name starts clean."""
    delete_study(cfg)
    if created_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in (files.SPACE, files.OPTUNA_DB, files.PARENT_RUN_ID, files.TEACHERS_JSON, files.TUNER_STATE):
        (folder / name).unlink(missing_ok=True)


def _run_locked(cfg: Config, data, roles: tuple[str, ...], folder: Path, resume: bool, quiet: bool,
                start: float) -> SearchOutcome:
    from ray import tune

    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.failures import retry_infra_failures_only
    from tune_mtard.search.recorder import log_teachers, start_parent
    from tune_mtard.search.searcher import finished_optuna_trials
    from tune_mtard.trainables.bmtard import train_bmtard

    s = cfg.search
    with interrupts.sigterm_as_interrupt():
        teachers = prepare_teachers(cfg.run_config(), data, resolve_device(cfg.device),
                                    progress=not quiet and sys.stderr.isatty(), roles=roles)
        teachers.announce()
        atomic.write_text(folder / files.TEACHERS_JSON, json.dumps(
            {"pins": teachers.pins(), "quality": teachers.quality_metrics()}, indent=2))
        # The trials get CPU copies, and the driver's card memory goes back before they start.
        teacher_weights = {role: (t.arch, {k: v.detach().cpu() for k, v in t.model.cpu().state_dict().items()})
                           for role, t in teachers.teachers.items()}
        release_cuda_memory()
        # Every trial checkpoints each epoch, so Tune's snapshots of the experiment are frequent by design.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        compat.tolerate_deleted_checkpoints()
        journal.bounded_http_retries()
        retry_infra_failures_only(s.max_failures)
        client = tracking.client_for(cfg.mlflow.tracking_uri)
        experiment_id = tracking.experiment_id(client, cfg.mlflow.experiment)
        id_file = folder / files.PARENT_RUN_ID
        reopen = id_file.read_text().strip() if resume and id_file.is_file() else None
        # The journal's writer sends what an earlier session left pending first; the records are settled last.
        with journal.settled(folder, cfg.mlflow.tracking_uri) as records, journal.open_journaled_run(
                client, folder, experiment_id, cfg.name, reopen=reopen, tags={
                    "tune_mtard.command": "search", "tune_mtard.experiment_dir": str(folder)}) as parent:
            if reopen is None:
                start_parent(parent, cfg, folder)
            log_teachers(parent, teachers)
            # A resumed trial that the killed driver had already finished only reports its last epoch again.
            finished = finished_optuna_trials(optuna_storage_url(cfg, folder), cfg.name) if resume else set()
            trainable = tune.with_resources(
                tune.with_parameters(train_bmtard, base=cfg.run_config(), data=data, teachers=teacher_weights,
                                     finished=finished, worker_resources=(s.resources.cpu, s.resources.gpu)),
                trial_resources(cfg),
            )
            start_budget_session(cfg, folder, resume)
            if resume:
                if compat.grow_search(folder, s.num_samples):  # --num-samples grew: the next --resume compares with it
                    cfg.dump(folder / files.SPACE, with_search=True)
                with compat.quiet_experiment_analysis():
                    tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=False)
            else:
                tuner = new_tuner(cfg, trainable, folder, experiment_id, parent.run_id, quiet)
            with interrupts.watched():
                grid = tuner.fit()
            if interrupts.received() is None:
                def rerun(points: list[dict[str, Any]]):
                    """The seed-confirmation trials, resumed where a killed driver left them."""
                    if resume and (folder / files.CONFIRM_FOLDER / files.TUNER_STATE).exists():
                        confirm = tune.Tuner.restore(str(folder / files.CONFIRM_FOLDER), trainable,
                                                     resume_unfinished=True, resume_errored=False)
                    else:
                        confirm = confirm_tuner(cfg, trainable, folder, experiment_id, parent.run_id, points,
                                                quiet)
                    with interrupts.watched():
                        result = confirm.fit()
                    return None if interrupts.received() else result

                outcome = conclude(cfg, folder, grid, teachers, data, parent, start, rerun)
            else:
                outcome = interrupted(cfg, folder, parent, start)
            if outcome.status == "interrupted":  # raised inside the run: the parent run ends KILLED
                raise Interrupted(interrupts.received(), f"interrupted by {interrupts.received()}: trials stopped, "
                                                         f"their records KILLED; continue with: python -m "
                                                         f"tune_mtard.search --space {folder / files.SPACE} --resume")
    if records.pending and outcome.exit_code == 0:
        outcome.exit_code = journal.EXIT_RECORDS_PENDING
    return outcome


def start_budget_session(cfg: Config, folder: Path, resume: bool) -> None:
    """``budget.json`` for this session: the limits and what the trials of earlier sessions spent."""
    # ray.tune loads at import of this: only a search that runs needs it
    from tune_mtard.search.budget import read_reached, start_session

    if resume and read_reached(folder):  # the budget ended the last session: Tune marked the search finished
        reopen_search_generator(folder)
    trials = load_experiment_trials(folder) if resume else []
    start_session(cfg, folder, sum(float(t.metrics.get("time_total_s") or 0) for t in trials), resume)


def new_tuner(cfg: Config, trainable, folder: Path, experiment_id: str, parent_run_id: str, quiet: bool,
              recorder_class: type | None = None, searcher_class: type | None = None):
    """The Tuner of a new search: the Optuna searcher, the scheduler and the MLflow recorder (a benchmark may
    pass subclasses of the last two that time them)."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.budget import BudgetMeter, BudgetStopper, with_budget
    from tune_mtard.search.failures import FailureLines
    from tune_mtard.search.recorder import MlflowTrialRecorder
    from tune_mtard.search.searcher import (
        PrunedAwareOptunaSearch,
        default_point,
        optuna_distributions,
    )

    s = cfg.search
    storage = optuna.storages.RDBStorage(optuna_storage_url(cfg, folder))
    point, notes = default_point(cfg)
    for note in notes:
        print(note, flush=True)
    # A multi-objective study gets one direction per objective; ASHA still stops on search.metric (the
    # searcher is given its space, so Tune's metric and mode below do not overwrite its objectives).
    metric, mode = (list(s.objectives), s.objective_modes()) if s.objectives else (s.metric, s.mode)
    # One meter for the budget's scheduler, stopper, searcher and recorder, even without a budget yet: a
    # --resume may set one (docs/search.md, "Budget").
    meter = BudgetMeter(folder)
    searcher = (searcher_class or PrunedAwareOptunaSearch)(
        space=optuna_distributions(cfg.space), metric=metric, mode=mode, sampler_config=s.sampler,
        study_name=cfg.name, storage=storage, points_to_evaluate=[point], full_epochs=cfg.train.epochs,
        budget=meter,
    )
    searcher = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
    scheduler = with_budget(build_scheduler(s.scheduler, max_t=cfg.train.epochs), meter, cfg.search.budget)
    recorder = (recorder_class or MlflowTrialRecorder)(cfg.mlflow.tracking_uri, experiment_id, parent_run_id,
                                                       cfg.train.epochs, cfg.name, budget=meter, folder=folder)
    # Reused actors spare each trial a fresh worker process (and its torch import); a trial's state is
    # its own all the same, since the Trainer seeds every RNG and builds every model anew.
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(folder.parent), callbacks=[recorder, FailureLines()],
            stop=BudgetStopper(folder),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0 if quiet else 1,
        ),
    )

