"""The search driver: a space file to a finished search (docs/search.md).

Optuna's TPE proposes configurations (study persisted at ``<storage>/<name>/optuna.db``), Ray Tune runs
them as trials of the B-MTARD loop (``tune_mtard.search.trial``), ASHA stops weak ones early on
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
from tune_mtard.search.compat import reopen_search_generator, unreachable_ray_address
from tune_mtard.search.confirm import confirm_tuner
from tune_mtard.search.local_ray import ray_session
from tune_mtard.search.lock import SearchLock, refuse_if_running
from tune_mtard.search.nodes import check_nodes_see_storage
from tune_mtard.search.outcome import SearchOutcome, conclude, interrupted
from tune_mtard.search.plan import plan_search
from tune_mtard.search.remote import (
    Mirror,
    bucket_lease,
    check_storage_options,
    check_store_reachable,
    driver_folder,
    experiment_storage,
    is_remote,
    mirror_of,
    ray_experiment,
    ray_storage,
    refuse_if_leased,
    registered,
)
from tune_mtard.search.resources import check_local_resources, check_resources, trial_resources
from tune_mtard.search.resume import check_same_search
from tune_mtard.search.schedulers import build_scheduler, check_first_rung, fit_to_epochs
from tune_mtard.search.space_methods import searched_methods
from tune_mtard.search.study_storage import check_database, delete_study, optuna_storage_url
from tune_mtard.search.trials import load_experiment_trials
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
    retry_errored: bool = False  # with resume: infra-failed trials again (docs/search.md, "Retrying infra failures")
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
    check_storage_options(cfg)
    check_trial_device(cfg.device, cfg.search.resources.gpu)
    return cfg


def experiment_dir(cfg: Config) -> Path:
    """The search's folder on the driver's machine: ``<storage>/<name>``, or its copy of an object store's
    (docs/cluster.md, "Object storage")."""
    return driver_folder(cfg)


def ran_in(folder: Path) -> bool:
    """Whether a search ran in the local folder ``folder`` (Ray Tune wrote its state there)."""
    return (folder / files.TUNER_STATE).exists() and (folder / files.SPACE).exists()


def started(cfg: Config) -> bool:
    """Whether the search ran (Ray Tune wrote its state to the storage): only then can it be resumed."""
    storage = experiment_storage(cfg)
    return storage.exists(files.TUNER_STATE) and storage.exists(files.SPACE)


# Where the driver's machine keeps the data and the teacher cache: a driver resuming from another working
# folder (or machine) takes its own, relative ones resolved against its working folder.
DRIVER_PATHS = ("data.root", "teachers.cache_dir")


# What a resumed search takes from this command, not from the saved config: where it is stored (the same bucket,
# seen from this machine), and a larger budget, more retries or more trials to continue with (docs/search.md).
RESUME_TAKES = ("storage", "storage_options", "budget", "max_failures", "num_samples")


def saved_config(cfg: Config) -> Config:
    """The interrupted search's config, with this driver's ``DRIVER_PATHS``."""
    with experiment_storage(cfg).local_file(files.SPACE) as path:
        saved = load_config(path, check_files=False)
    return saved.with_values({key: cfg.get(key) for key in DRIVER_PATHS})


def check_experiment(cfg: Config, resume: bool, tracking_uri: str | None = None,
                     num_samples: int | None = None) -> None:
    """A new search needs an unused name; a resumed one, a search of that name that ran, with the same config
    and search (``num_samples``: what ``--num-samples`` asked, if given)."""
    folder = experiment_dir(cfg)
    where = cfg.search.storage if is_remote(cfg) else folder.parent
    if resume and not started(cfg):
        raise ConfigError("--resume", f"no interrupted search named {cfg.name!r} in {where}")
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
    elif started(cfg):
        raise ConfigError("name", f"a search named {cfg.name!r} already exists in {where}; "
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
    if request.retry_errored and not request.resume:
        raise ConfigError("--retry-errored", "retries the infra-failed trials of a search that ran: pass it with "
                                             "--resume")
    cfg = search_config(request)
    check_address(request.address)
    check_store_reachable(cfg, "--storage" if request.storage else "search.storage")  # an object store answers
    if request.plan:
        return plan(cfg, request)
    refuse_if_running(experiment_dir(cfg), "--resume" if request.resume else "name")
    refuse_if_leased(cfg, "--resume" if request.resume else "name")  # a driver of another machine
    check_experiment(cfg, request.resume, request.tracking_uri, request.num_samples)
    if request.resume:
        # The interrupted search's own config rules (its MLflow store and study too), except where it is stored.
        saved = saved_config(cfg)
        if cfg.search.optuna_storage and cfg.search.optuna_storage != saved.search.optuna_storage:
            raise ConfigError("search.optuna_storage", "the interrupted search's study is in "
                                                       f"{saved.search.optuna_storage or files.OPTUNA_DB}; "
                                                       "resume it with the same database")
        given = cfg.to_dict(with_search=True)["search"]
        cfg = saved.with_values({f"search.{key}": given[key] for key in RESUME_TAKES})
    check_tracking_uri(cfg.mlflow.tracking_uri, "--tracking-uri" if request.tracking_uri else "mlflow.tracking_uri")
    check_search_folder(experiment_dir(cfg), "--storage" if request.storage else "search.storage")
    check_database(cfg, request.resume)
    return run_search(cfg, resume=request.resume, address=request.address, quiet=request.quiet,
                      retry_errored=request.retry_errored)


def plan(cfg: Config, request: SearchRequest) -> int:
    """``search --plan``: the forecast of a new search, written to ``plan.json``; no trial runs."""
    if request.resume:
        raise ConfigError("--plan", "plans a new search; it cannot be combined with --resume")
    roles = roles_for(searched_methods(cfg))
    check_teacher_files(cfg.run_config(), roles)
    plan_search(cfg, roles, request.plan_device, request.plan_cluster, request.address)
    return 0


def run_search(cfg: Config, resume: bool = False, address: str | None = None, quiet: bool = False,
               retry_errored: bool = False) -> int:
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
            check_nodes_see_storage(cfg.search.storage, cfg.search.resources.cpu, cfg.search.resources.gpu,
                                    cfg.search.storage_options)
        flag = "--resume" if resume else "name"
        with SearchLock(folder, flag) as lock, bucket_lease(cfg, flag):
            mirror = Mirror.of(cfg)
            if is_remote(cfg) and not resume:
                (folder / files.OPTUNA_DB).unlink(missing_ok=True)  # a copy's leftover of a search gone from it
            mirror.pull()  # an object store's files, under the lock (docs/cluster.md, "Object storage")
            check_experiment(cfg, resume)  # again, under the lock: another driver may have started it
            try:
                with registered(mirror):
                    return _run_locked(cfg, data, roles, folder, resume, quiet, start, retry_errored).exit_code
            except BaseException:
                if not resume and not started(cfg):  # failed in its own setup: the name stays usable
                    _remove_setup(cfg, folder, lock.created_folder, mirror)
                raise


def _remove_setup(cfg: Config, folder: Path, created_folder: bool, mirror: Mirror) -> None:
    """What a driver that failed before its search started wrote, so a rerun of the same name starts clean."""
    delete_study(cfg)
    names = (files.SPACE, files.OPTUNA_DB, files.PARENT_RUN_ID, files.TEACHERS_JSON, files.TUNER_STATE)
    mirror.forget(names + (files.BUDGET_JSON, files.RECORDS_JOURNAL))
    if created_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in names:
        (folder / name).unlink(missing_ok=True)


def _run_locked(cfg: Config, data, roles: tuple[str, ...], folder: Path, resume: bool, quiet: bool,
                start: float, retry_errored: bool = False) -> SearchOutcome:
    from ray import tune

    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.failures import retry_infra_failures_only
    from tune_mtard.search.recorder import log_teachers, start_parent
    from tune_mtard.search.retry import prepare_retries
    from tune_mtard.search.searcher import finished_optuna_trials
    from tune_mtard.search.trial import train_bmtard

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
            retried = prepare_retries(folder, parent) if retry_errored else []
            # A resumed trial that the killed driver had already finished only reports its last epoch again.
            finished = (finished_optuna_trials(optuna_storage_url(cfg, folder), cfg.name) - set(retried)
                        if resume else set())
            trainable = tune.with_resources(
                tune.with_parameters(train_bmtard, base=cfg.run_config(), data=data, teachers=teacher_weights,
                                     finished=finished, resumed_search=resume,
                                     worker_resources=(s.resources.cpu, s.resources.gpu)),
                trial_resources(cfg),
            )
            start_budget_session(cfg, folder, resume)
            path, fs = ray_experiment(cfg)
            if resume:
                grown = compat.grow_search(folder, s.num_samples)
                # A grown --num-samples, or another search.max_failures: a --resume of the saved file keeps them.
                if grown or load_config(folder / files.SPACE, check_files=False).search.max_failures != s.max_failures:
                    cfg.dump(folder / files.SPACE, with_search=True)
                mirror_of(folder).push()  # the state Ray restores from, as edited here
                with compat.quiet_experiment_analysis():
                    tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                               storage_filesystem=fs)
            else:
                tuner = new_tuner(cfg, trainable, folder, experiment_id, parent.run_id, quiet)
                mirror_of(folder).push()  # the search's files are in the storage before its first trial
            with interrupts.watched():
                grid = tuner.fit()
            if interrupts.received() is None:
                def rerun(points: list[dict[str, Any]]):
                    """The seed-confirmation trials, resumed where a killed driver left them."""
                    if resume and (folder / files.CONFIRM_FOLDER / files.TUNER_STATE).exists():
                        confirm = tune.Tuner.restore(f"{path}/{files.CONFIRM_FOLDER}", trainable,
                                                     resume_unfinished=True, resume_errored=False,
                                                     storage_filesystem=fs)
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


RAY_SYNC_S = 15  # how often Ray Tune sends its experiment state to an object store (its default: 300 s)


def start_budget_session(cfg: Config, folder: Path, resume: bool) -> None:
    """``budget.json`` for this session: the limits and what the trials of earlier sessions spent."""
    # ray.tune loads at import of this: only a search that runs needs it
    from tune_mtard.search.budget import read_reached, start_session

    if resume and read_reached(folder):  # the budget ended the last session: Tune marked the search finished
        reopen_search_generator(folder)
    trials = load_experiment_trials(*ray_experiment(cfg)) if resume else []
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
    compat.tolerate_deleted_checkpoints()
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
    storage_path, storage_filesystem = ray_storage(cfg)
    # Reused actors spare each trial a fresh worker process (and its torch import); a trial's state is
    # its own all the same, since the Trainer seeds every RNG and builds every model anew.
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            callbacks=[recorder, FailureLines()],
            sync_config=tune.SyncConfig(sync_period=RAY_SYNC_S) if storage_filesystem else None,
            stop=BudgetStopper(folder),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0 if quiet else 1,
        ),
    )

