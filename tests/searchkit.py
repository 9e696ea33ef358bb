"""What the search tests share: a tiny space, the flags of a tiny search, and readers of the three records
(Ray Tune's folder, the Optuna study, the MLflow store) that do not go through the code under test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from tune_mtard.config import load_config

EPOCHS = 3
NUM_SAMPLES = 5
SPACE_KEYS = ("balance.beta", "balance.tau_max", "train.lr")
SEARCH_SECTIONS = f"""\
search:
  num_samples: {NUM_SAMPLES}
  max_concurrent: 2
  metric: val_w_robust_acc
  mode: max
  resources: {{cpu: 1, gpu: 0}}
  scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
  sampler: {{type: tpe, seed: 0, n_startup_trials: 2}}
  storage: ./tune_results
space:
  balance.beta:    {{type: float, low: 0.5, high: 3.0}}
  balance.tau_max: {{type: float, low: 2.0, high: 20.0}}
  train.lr:        {{type: float, low: 0.01, high: 0.2, log: true}}
"""
EPOCH_METRICS = ("val_clean_acc", "val_robust_acc", "val_w_robust_acc", "loss_adv", "loss_nat", "entropy_adv",
                 "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "epoch_time_s")
SPEC_TRACE_HEADER = "step,epoch,loss_adv,loss_nat,entropy_adv,entropy_nat,tau_adv,tau_nat,w_adv,w_nat"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def child_env() -> dict[str, str]:
    """The environment as it is now: after ``ray.init`` it holds the token mode that joining our Ray needs."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def search_args(space: Path, root: Path, name: str, *extra: str) -> list[str]:
    return ["--space", str(space), "--storage", str(root / "results"), "--tracking-uri", tracking_uri(root),
            "--no-progress", "--set", f"name={name}", "--set", f"mlflow.experiment={name}",
            "--set", f"train.epochs={EPOCHS}", *extra]


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def base_run_config(space: Path, root: Path, name: str):
    """What the search's base run config must be: the space file with the same overrides."""
    cfg = load_config(space, [f"name={name}", f"mlflow.experiment={name}", f"train.epochs={EPOCHS}",
                              f"mlflow.tracking_uri={tracking_uri(root)}"], check_files=False)
    return cfg.run_config()


# ---- reading a search folder back, independently of the code under test ------------------------------


def ray_reports(folder: Path) -> dict[str, list[dict]]:
    """Every report of every trial folder, from Ray's own result.json files: trial id -> rows in order.

    A trial can have two folders: a resumed Ray names anew the folder of a trial its snapshot held as pending.
    """
    reports = {}
    for result in folder.glob("train_bmtard_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            reports.setdefault(rows[0]["trial_id"], []).extend(rows)
    return {tid: sorted(rows, key=lambda r: r["timestamp"]) for tid, rows in reports.items()}


def ray_trial_ids(folder: Path) -> set[str]:
    """The trials of the experiment as Ray Tune knows them (its experiment state)."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id for t in ExperimentAnalysis(str(folder)).trials}


def optuna_trials(folder: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    return study.get_trials(deepcopy=False)


def mlflow_runs(root: Path, name: str):
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def expected_best(reports: dict[str, list[dict]]) -> tuple[set[str], float]:
    """docs/search.md: highest metric at the last report among full-epoch trials (all trials if none)."""
    last = {tid: rows[-1] for tid, rows in reports.items()}
    full = {tid: r for tid, r in last.items() if r["epoch"] >= EPOCHS} or last
    top = max(r["val_w_robust_acc"] for r in full.values())
    return {tid for tid, r in full.items() if r["val_w_robust_acc"] == top}, top


def flat(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
