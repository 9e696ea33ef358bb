"""Seed-confirmed winners (docs/search.md, "Seed-confirmed winners").

On a validation split of a few hundred images the best trials differ by less than seed noise. With
``search.confirm: {top_k: K, seeds: S}`` the K best full-budget configurations are trained again on S more
seeds (``seed + 1`` to ``seed + S``: the student's initialisation, data order and attack noise change;
the data split and the teachers stay those of the search), as Ray Tune trials of the same trainable,
recorded like every trial. Each candidate's mean over its original run and the S reruns decides the
winner; a candidate that fails on any seed is not eligible. Cost: K x S more full-budget trials.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_mtard import atomic, files
from tune_mtard.config import Config
from tune_mtard.search.compat import quiet_preset_points
from tune_mtard.search.remote import ray_experiment
from tune_mtard.search.trials import TrialSummary, rank_trials, summarize_results

SEED_KEY = "seed"


@dataclass
class Candidate:
    """One of the K best configurations: its search trial and its value on every seed it ran."""

    trial: TrialSummary
    values: dict[int, float] = field(default_factory=dict)  # seed -> search.metric at the last epoch
    failed_seeds: list[int] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return not self.failed_seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else 0.0

    def record(self) -> dict[str, Any]:
        return {"trial_id": self.trial.trial_id, "mean": self.mean, "std": self.std,
                "per_seed": {str(seed): value for seed, value in sorted(self.values.items())},
                "failed_seeds": self.failed_seeds}


def candidates(cfg: Config, trials: list[TrialSummary]) -> list[Candidate]:
    """The ``confirm.top_k`` best full-budget trials, each with its value on the search's own seed."""
    s = cfg.search
    full = [t for t in rank_trials(trials, s.metric, s.mode, cfg.train.epochs) if t.epochs >= cfg.train.epochs]
    return [Candidate(t, {cfg.seed: t.metric(s.metric)}) for t in full[:s.confirm.top_k]]


def rerun_points(cfg: Config, chosen: list[Candidate]) -> list[dict[str, Any]]:
    """The reruns' configs: each candidate's sampled values on each further seed."""
    return [{**c.trial.sampled, SEED_KEY: cfg.seed + offset}
            for c in chosen for offset in range(1, cfg.search.confirm.seeds + 1)]


def confirm_tuner(cfg: Config, trainable, folder: Path, experiment_id: str, parent_run_id: str, points: list[dict],
                  quiet: bool):
    """A Tuner that runs exactly ``points``, to the end (FIFO), recorded under the search's parent run."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.failures import FailureLines
    from tune_mtard.search.recorder import MlflowTrialRecorder

    quiet_preset_points()
    s = cfg.search
    path, fs = ray_experiment(cfg)  # the seed confirmation's experiment is a folder of the search's
    recorder = MlflowTrialRecorder(cfg.mlflow.tracking_uri, experiment_id, parent_run_id, cfg.train.epochs, cfg.name,
                                   extra_tags={"confirm": "true"}, folder=folder)
    # Every point overrides the (constant) space, which only names the keys: exactly these trials run.
    return tune.Tuner(
        trainable,
        param_space={key: points[0][key] for key in points[0]},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=points),
                                    num_samples=len(points), max_concurrent_trials=s.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=files.CONFIRM_FOLDER, storage_path=path, storage_filesystem=fs,
                                  callbacks=[recorder, FailureLines()],
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0 if quiet else 1),
    )


def tally(cfg: Config, chosen: list[Candidate], grid) -> list[TrialSummary]:
    """Add each rerun's value to its candidate (matched by its sampled values); returns the reruns."""
    reruns = summarize_results(grid)
    for rerun in reruns:
        values = {k: v for k, v in rerun.sampled.items() if k != SEED_KEY}
        candidate = next((c for c in chosen if c.trial.sampled == values), None)
        if candidate is None:
            continue
        seed = int(rerun.sampled[SEED_KEY])
        if rerun.failed or rerun.epochs < cfg.train.epochs:
            candidate.failed_seeds.append(seed)
        else:
            candidate.values[seed] = rerun.metric(cfg.search.metric)
    return reruns


def winner(cfg: Config, chosen: list[Candidate]) -> Candidate | None:
    eligible = [c for c in chosen if c.eligible]
    if not eligible:
        return None
    sign = 1 if cfg.search.mode == "max" else -1
    return max(eligible, key=lambda c: sign * c.mean)


def write_confirm_csv(chosen: list[Candidate], reruns: list[TrialSummary], path: Path, cfg: Config) -> None:
    """One row per run of a candidate: the search trial (its own seed) and every rerun."""
    rerun_of = {}
    for rerun in reruns:
        values = {k: v for k, v in rerun.sampled.items() if k != SEED_KEY}
        rerun_of[rerun.trial_id] = next((c.trial.trial_id for c in chosen if c.trial.sampled == values), "")
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["candidate", "run", "seed", cfg.search.metric, "state"])
        for c in chosen:
            writer.writerow([c.trial.trial_id, c.trial.trial_id, cfg.seed, c.values[cfg.seed], "search"])
        for rerun in reruns:
            writer.writerow([rerun_of[rerun.trial_id], rerun.trial_id, rerun.sampled.get(SEED_KEY),
                             "" if rerun.failed else rerun.metric(cfg.search.metric),
                             "FAIL" if rerun.failed else "COMPLETE"])
