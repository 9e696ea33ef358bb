"""``bench driver``: the search driver's own cost per report, at two sizes of search (docs/performance.md).

The real Tuner of a search (:func:`~tune_mtard.search.driver.new_tuner`: the Optuna searcher, the ASHA scheduler
of the registry, the MLflow recorder and its journal) runs trials that report synthetic metrics at once, each
report with a small checkpoint as a real trial's (the loop state with a balance trace, and student weights).
The trials cost next to nothing, so the Tuner's wall and the driver process's CPU seconds are the driver's
work: divided by the reports, they must not grow with the search (the figures at ``trials`` and at
``trials_large`` within 1.5x of each other).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tune_mtard import files
from tune_mtard.benchmarks.machine import machine_info, machine_line
from tune_mtard.config import Config
from tune_mtard.errors import ConfigError
from tune_mtard.metrics import (
    DIAGNOSTICS,
    EPOCH,
    EPOCH_METRICS,
    TRACE_HEADER,
    VAL_CLEAN_ACC,
    VAL_ROBUST_ACC,
    VAL_W_ROBUST_ACC,
    w_robust_acc,
)
from tune_mtard.search.local_ray import ray_session

RECORDS_WAIT_S = 1800.0  # at most, for the journal's writer to send a search's records to MLflow
ROWS_PER_EPOCH = 24  # optimiser steps per epoch of a digits trial: the trace a checkpoint carries grows so


def synthetic_value(sampled: dict[str, Any], epoch: int, epochs: int) -> float:
    """A made-up validation accuracy: a learning curve whose height depends on the sampled values, so the
    searcher and ASHA rank trials as they would real ones."""
    height = 0.5 + 0.4 * (math.sin(sum(float(v) * (i + 1) for i, v in enumerate(sampled.values()))) + 1) / 2
    return height * (1 - math.exp(-3 * epoch / epochs))


def synthetic_trial(sampled: dict[str, Any], *, epochs: int) -> None:
    """A trial that reports what a B-MTARD trial reports, every epoch with a checkpoint, and computes nothing."""
    # only the benchmark's trials load Ray Tune's function API
    from ray import tune

    student = {"weight": torch.zeros(8)}
    for epoch in range(1, epochs + 1):
        clean = synthetic_value(sampled, epoch, epochs)
        robust = 0.6 * clean
        metrics: dict[str, Any] = {name: 0.0 for name in EPOCH_METRICS + DIAGNOSTICS}
        metrics.update({EPOCH: epoch, VAL_CLEAN_ACC: clean, VAL_ROBUST_ACC: robust,
                        VAL_W_ROBUST_ACC: w_robust_acc(clean, robust, 0.5)})
        trace = torch.zeros(epoch * ROWS_PER_EPOCH, len(TRACE_HEADER))
        trace[:, 0] = torch.arange(1, epoch * ROWS_PER_EPOCH + 1)
        trace[:, 1] = trace[:, 0].div(ROWS_PER_EPOCH, rounding_mode="floor")
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"epoch": epoch, "trace": trace}, Path(folder) / files.TRIAL_STATE)
            torch.save(student, Path(folder) / files.STUDENT)
            tune.report(dict(metrics, node_id="synthetic"), checkpoint=tune.Checkpoint.from_directory(folder))


def _search(cfg: Config, trials: int, epochs: int, folder: Path) -> dict[str, Any]:
    """One search of ``trials`` synthetic trials through the search's Tuner; its figures, with the reports that
    reached MLflow (``recorded_reports``: the child runs' ``val_w_robust_acc`` rows, once the records settled)."""
    from ray import tune

    # only the benchmark that measures it loads the search stack
    from tune_mtard import tracking
    from tune_mtard.search import journal
    from tune_mtard.search.driver import new_tuner
    from tune_mtard.search.recorder import child_runs_filter, start_parent

    cfg = cfg.with_values({"search.num_samples": trials, "train.epochs": epochs, "name": f"bench-driver-{trials}",
                           "search.storage": str(folder), "mlflow.experiment": "bench-driver",
                           "mlflow.tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"})
    search_folder = folder / cfg.name
    search_folder.mkdir(parents=True)
    journal.bounded_http_retries()
    client = tracking.client_for(cfg.mlflow.tracking_uri)
    experiment_id = tracking.experiment_id(client, cfg.mlflow.experiment)
    with journal.settled(search_folder, cfg.mlflow.tracking_uri) as records, journal.open_journaled_run(
            client, search_folder, experiment_id, cfg.name, tags={"tune_mtard.command": "bench driver"}) as parent:
        start_parent(parent, cfg, search_folder)
        trainable = tune.with_resources(tune.with_parameters(synthetic_trial, epochs=epochs),
                                        {"cpu": cfg.search.resources.cpu, "gpu": 0})
        tuner = new_tuner(cfg, trainable, search_folder, experiment_id, parent.run_id, quiet=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        grid = tuner.fit()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        drain_start = time.perf_counter()
        # A search waits journal.DRAIN_S for its records; the benchmark waits until all are sent, to count them.
        journal.writer_for(search_folder, cfg.mlflow.tracking_uri).drain(RECORDS_WAIT_S)
    drain = time.perf_counter() - drain_start
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} benchmark trial(s) failed, the first: {errors[0]}")
    reports = sum(len(r.metrics_dataframe) for r in grid)
    children = client.search_runs([experiment_id], filter_string=child_runs_filter(parent.run_id),
                                  max_results=10_000)
    recorded = sum(len(client.get_metric_history(run.info.run_id, VAL_W_ROBUST_ACC)) for run in children)
    return {"trials": trials, "epochs": epochs, "reports": reports, "recorded_reports": recorded,
            "child_runs": len(children),
            "records": "pending" if records.pending else "complete",
            "tuner_fit_s": wall, "driver_cpu_s": cpu, "records_drain_s": drain,
            "driver_s_per_report": wall / reports, "driver_cpu_s_per_report": cpu / reports}


def bench_driver(cfg: Config, trials: int, trials_large: int, epochs: int, concurrent: int) -> dict[str, Any]:
    if cfg.search is None:
        raise ConfigError("--config", "driver needs a search space file (its searcher and scheduler)")
    if cfg.search.scheduler.type != "asha":
        raise ConfigError("--config", f"driver measures ASHA's search; the config's scheduler is "
                                      f"{cfg.search.scheduler.type!r}")
    cfg = cfg.with_values({"search.max_concurrent": concurrent, "search.resources.cpu": 0.25,
                           "search.scheduler.grace_period": min(cfg.search.scheduler.grace_period, epochs)})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tune-mtard-bench-") as tmp, ray_session():
        searches = [_search(cfg, n, epochs, Path(tmp) / f"search-{n}") for n in (trials, trials_large)]
    small, large = searches
    return {"command": "driver", "config": cfg.name, "epochs": epochs, "max_concurrent": concurrent,
            "sampler": cfg.search.sampler.type, "scheduler": cfg.search.scheduler.type, "searches": searches,
            "trials": trials, "trials_large": trials_large,
            "driver_s_per_report": small["driver_s_per_report"],
            "driver_s_per_report_large": large["driver_s_per_report"],
            "driver_cpu_s_per_report": small["driver_cpu_s_per_report"],
            "driver_cpu_s_per_report_large": large["driver_cpu_s_per_report"],
            "growth": large["driver_s_per_report"] / small["driver_s_per_report"],
            "growth_cpu": large["driver_cpu_s_per_report"] / small["driver_cpu_s_per_report"],
            "machine": machine_info(torch.device("cpu"), load_before)}


def print_driver(result: dict[str, Any]) -> None:
    print(f"driver benchmark: {result['config']}, {result['sampler']} + {result['scheduler']}, {result['epochs']} "
          f"epochs a trial, {result['max_concurrent']} at a time, synthetic trials")
    print(machine_line(result["machine"]))
    print(f"{'trials':>8} {'reports':>8} {'recorded':>9} {'fit s':>8} {'s/report':>10} {'cpu s/report':>13} "
          f"{'drain s':>8}")
    for s in result["searches"]:
        print(f"{s['trials']:>8} {s['reports']:>8} {s['recorded_reports']:>9} {s['tuner_fit_s']:>8.1f} "
              f"{s['driver_s_per_report'] * 1000:>8.2f}ms {s['driver_cpu_s_per_report'] * 1000:>11.2f}ms "
              f"{s['records_drain_s']:>8.1f}")
    print(f"growth per report from {result['trials']} to {result['trials_large']} trials: "
          f"{result['growth']:.2f}x wall, {result['growth_cpu']:.2f}x driver CPU (must be <= 1.5x)")
