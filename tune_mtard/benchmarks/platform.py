"""``bench platform``: one short trial run bare through :class:`~tune_mtard.engine.Trainer` in a fresh process,
and ``--trials`` such trials, one at a time, in one Tuner of the real trainable, searcher, scheduler and MLflow
recorder; ``platform_overhead`` is the extra wall time of a trial's training loop as a fraction of it. Ray's
startup (once per search) and the trials' launch and wrap-up (the Tuner's wall less the trials' loops, per
trial) are reported apart (docs/performance.md).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tune_mtard.benchmarks.machine import machine_info, machine_line
from tune_mtard.benchmarks.step import random_teachers
from tune_mtard.config import Config
from tune_mtard.data import DataBundle, load_data
from tune_mtard.engine import Trainer
from tune_mtard.errors import ConfigError
from tune_mtard.perf import resolve_device
from tune_mtard.search.local_ray import ray_session


def _timed_trial(sampled: dict[str, Any], *, base: Config, data: DataBundle,
                 teachers: dict[str, tuple[str, dict[str, torch.Tensor]]], timing_folder: str) -> None:
    """The real trainable, with its wall time written where the benchmark reads it (a file per trial)."""
    from ray import tune

    # only the benchmark that measures it loads the search stack
    from tune_mtard.search.trial import train_bmtard

    start, cpu_start = time.perf_counter(), time.process_time()
    train_bmtard(sampled, base=base, data=data, teachers=teachers)
    timing = {"trial_loop_s": time.perf_counter() - start, "trial_loop_cpu_s": time.process_time() - cpu_start}
    Path(timing_folder, f"{tune.get_context().get_trial_id()}.json").write_text(json.dumps(timing))


def _bare_trial(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
                threads: int) -> dict[str, float]:
    """What the trainable does, without Ray or MLflow: wall and CPU seconds, sum of epoch_time_s."""
    # only the benchmark that measures it loads the search stack
    from tune_mtard.search.trial import teacher_from_weights

    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = Trainer(cfg, data, {role: teacher_from_weights(arch, weights, data)
                                  for role, (arch, weights) in teachers.items()}).fit()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"bare_s": wall, "bare_cpu_s": cpu, "bare_epoch_time_sum_s": sum(m["epoch_time_s"] for m in history)}


def _bare_run(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
              threads: int) -> dict[str, float]:
    """:func:`_bare_trial` in a fresh process, as a trial's worker is: both pay the same one-off costs
    (torch.optim's first call imports torch._dynamo, seconds on a loaded machine)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_bare_trial, cfg, data, teachers, threads).result()


# Seconds the driver spent in the MLflow recorder's and the Optuna searcher's per-result hooks, over all of
# a trial's reports: a function trainable waits after each ``tune.report`` until the driver has processed it.
# Tune runs both hooks in the driver, this process, so class-level sums see every call.
DRIVER_SECONDS: dict[str, float] = {"driver_mlflow_s": 0.0, "driver_optuna_s": 0.0}


def _timed_hooks():
    """The search's recorder and searcher, each with its per-result hook timed into :data:`DRIVER_SECONDS`."""
    # only the benchmark that measures it loads the search stack
    from tune_mtard.search.recorder import MlflowTrialRecorder
    from tune_mtard.search.searcher import PrunedAwareOptunaSearch

    class TimedRecorder(MlflowTrialRecorder):
        def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            super().on_trial_result(*args, **kwargs)
            DRIVER_SECONDS["driver_mlflow_s"] += time.perf_counter() - start

    class TimedSearcher(PrunedAwareOptunaSearch):
        def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            super().on_trial_result(*args, **kwargs)
            DRIVER_SECONDS["driver_optuna_s"] += time.perf_counter() - start

    return TimedRecorder, TimedSearcher


def _ray_trials(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
                folder: Path) -> dict[str, float]:
    """``search.num_samples`` trials, one at a time, through the search's own Tuner (searcher, scheduler,
    MLflow recorder, checkpoints): the Tuner's wall, and each trial's loop as the trial timed it."""
    from ray import tune

    # only the benchmark that measures it loads the search stack
    from tune_mtard import tracking
    from tune_mtard.search.driver import new_tuner
    from tune_mtard.search.recorder import start_parent

    s = cfg.search
    folder.mkdir(parents=True)
    timing_folder = folder / "trial_timing"
    timing_folder.mkdir()
    with tracking.command_run(cfg.mlflow, cfg.name, "bench platform", folder) as parent:
        start_parent(parent, cfg, folder)
        trainable = tune.with_resources(
            tune.with_parameters(_timed_trial, base=cfg.run_config(), data=data, teachers=teachers,
                                 timing_folder=str(timing_folder)),
            {"cpu": s.resources.cpu, "gpu": s.resources.gpu},
        )
        recorder_class, searcher_class = _timed_hooks()
        tuner = new_tuner(cfg, trainable, folder, parent.experiment_id, parent.run_id, quiet=True,
                          recorder_class=recorder_class, searcher_class=searcher_class)
        for key in DRIVER_SECONDS:
            DRIVER_SECONDS[key] = 0.0
        start = time.perf_counter()
        grid = tuner.fit()
        fit_wall = time.perf_counter() - start
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"a benchmark trial failed: {errors[0]}")
    loops = [json.loads(path.read_text()) for path in sorted(timing_folder.glob("*.json"))]
    if len(loops) != len(grid):
        raise RuntimeError(f"{len(grid)} trials ran but {len(loops)} timed their loop")
    return {"trials": len(loops), "tuner_fit_s": fit_wall,
            "trial_loop_s": statistics.median(t["trial_loop_s"] for t in loops),
            "trial_loop_cpu_s": statistics.median(t["trial_loop_cpu_s"] for t in loops),
            "trial_loops_sum_s": sum(t["trial_loop_s"] for t in loops),
            "trial_epoch_time_sum_s": float(sum(r.metrics_dataframe["epoch_time_s"].sum() for r in grid)) / len(grid),
            "trial_launch_s": (fit_wall - sum(t["trial_loop_s"] for t in loops)) / len(loops),
            **{key: value / len(loops) for key, value in DRIVER_SECONDS.items()}}


def bench_platform(cfg: Config, epochs: int, repeats: int, trials: int = 8) -> dict[str, Any]:
    """Each repeat: the bare trial in a fresh process, and one Tuner of ``trials`` trials run one at a time
    (``trial_launch_s``: the Tuner's wall less the trials' own loops, per trial; the first worker's start is
    paid once per search, as in a search)."""
    if cfg.search is None:
        raise ConfigError("--config", "platform needs a search space file (its search.resources)")
    cfg = cfg.with_values({"train.epochs": epochs, "search.num_samples": trials, "search.scheduler.type": "fifo",
                           "search.max_concurrent": 1, "search.sampler.n_startup_trials": trials})
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    teachers = {role: (getattr(cfg.teachers, role).arch, model.state_dict())
                for role, model in random_teachers(cfg, data).items()}
    threads = max(1, int(cfg.search.resources.cpu))
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tune-mtard-bench-") as tmp:
        start = time.perf_counter()
        with ray_session():
            ray_startup = time.perf_counter() - start
            for i in range(repeats):
                trial_cfg = cfg.with_values({"search.storage": str(Path(tmp) / "tune"), "name": f"bench-platform-{i}",
                                             "mlflow.tracking_uri": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                                             "mlflow.experiment": "bench-platform"})
                # Alternate which goes first, so a change of load does not always favour the same one.
                if i % 2 == 0:
                    bare = _bare_run(cfg.run_config(), data, teachers, threads)
                trial = _ray_trials(trial_cfg, data, teachers, Path(tmp) / "tune" / trial_cfg.name)
                if i % 2 == 1:
                    bare = _bare_run(cfg.run_config(), data, teachers, threads)
                runs.append(dict(trial, **bare))

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    overheads = [(r["trial_loop_s"] - r["bare_s"]) / r["trial_loop_s"] for r in runs]
    cpu_overheads = [(r["trial_loop_cpu_s"] - r["bare_cpu_s"]) / r["trial_loop_cpu_s"] for r in runs]
    end_to_end = [(r["trial_launch_s"] + r["trial_loop_s"] - r["bare_s"]) / (r["trial_launch_s"] + r["trial_loop_s"])
                  for r in runs]
    return {
        "command": "platform", "config": cfg.name, "dataset": cfg.data.dataset, "epochs": epochs,
        "reports": math.ceil(epochs / cfg.eval.every), "threads_per_trial": threads, "device": str(device),
        "repeats": repeats, "trials_per_tuner": trials, "runs": runs,
        "bare_s": median("bare_s"), "trial_loop_s": median("trial_loop_s"), "tuner_fit_s": median("tuner_fit_s"),
        "platform_overhead": statistics.median(overheads),
        "platform_overhead_cpu": statistics.median(cpu_overheads),
        "driver_mlflow_s": median("driver_mlflow_s"),
        "driver_optuna_s": median("driver_optuna_s"),
        "trial_launch_s": median("trial_launch_s"),
        "platform_overhead_end_to_end": statistics.median(end_to_end),
        "ray_startup_s": ray_startup,
        "machine": machine_info(device, load_before),
    }


def print_platform(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"platform benchmark: {result['dataset']}, {result['epochs']} epochs, {result['reports']} reports, "
          f"{result['threads_per_trial']} thread(s) per trial, {result['device']}, median of {result['repeats']}")
    print(machine_line(m))
    print(f"bare Trainer (teachers + Trainer + fit)            {result['bare_s']:8.2f} s")
    print(f"Ray Tune trial, inside the trainable               {result['trial_loop_s']:8.2f} s")
    print(f"Tuner.fit of {result['trials_per_tuner']} trials, one at a time         {result['tuner_fit_s']:8.2f} s")
    print(f"platform_overhead (trial loop vs bare, wall)       {result['platform_overhead']:8.3f}")
    print(f"  the same in CPU seconds of the trial's process     {result['platform_overhead_cpu']:8.3f}")
    print(f"  driver's MLflow / Optuna work on the reports     {result['driver_mlflow_s']:8.2f} s / "
          f"{result['driver_optuna_s']:.2f} s (the trial waits for it)")
    print(f"trial launch and wrap-up ((fit - loops) / trials)  {result['trial_launch_s']:8.2f} s per trial")
    print(f"end-to-end overhead per trial ((launch + loop - bare) / (launch + loop))"
          f" {result['platform_overhead_end_to_end']:.3f}")
    print(f"Ray startup (once per search)                      {result['ray_startup_s']:8.2f} s")
