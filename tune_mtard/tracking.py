"""MLflow records: runs, params as dotted config keys, per-epoch metrics, and the balance-trace plot.

All writes go through one :class:`mlflow.MlflowClient` in one process (a search's driver, or the
``train`` command), so a sqlite store never sees two writers.
"""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable

from typing import TYPE_CHECKING

from tune_mtard.config import Config

if TYPE_CHECKING:  # mlflow takes over a second to import: commands that reject bad input never pay it
    from mlflow.tracking import MlflowClient

MAX_PARAM_LENGTH = 6000
_BATCH = 900  # MLflow accepts at most 1000 entries per log_batch


def client_for(tracking_uri: str) -> "MlflowClient":
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: "MlflowClient", name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database file (``mlruns/<experiment>``), not in
    whatever folder the command ran from; other stores keep their server's default."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):])
        return (database.parent / "mlruns" / experiment).resolve().as_uri()
    return None


def params_of(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in values.items()]


def log_params(client: "MlflowClient", run_id: str, values: dict[str, Any]) -> None:
    existing = client.get_run(run_id).data.params
    fresh = {k: v for k, v in values.items() if k not in existing}
    params = params_of(fresh)
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i : i + _BATCH])


def log_metrics(client: "MlflowClient", run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = _now_ms()
    entries = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not math.isnan(float(v))]
    for i in range(0, len(entries), _BATCH):
        client.log_batch(run_id, metrics=entries[i : i + _BATCH])


def set_tags(client: "MlflowClient", run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def config_params(cfg: Config) -> dict[str, Any]:
    return cfg.run_config().flat()


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def plot_trace(trace_csv: str | Path, png: str | Path) -> None:
    """tau and w over optimiser steps, the two balancing algorithms at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns: dict[str, list[float]] = {}
    with Path(trace_csv).open() as f:
        reader = csv.DictReader(f)
        for row in reader:
            for key, value in row.items():
                columns.setdefault(key, []).append(float(value))
    steps = columns.get("step", [])
    fig, (ax_tau, ax_w) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name in ("tau_adv", "tau_nat"):
        ax_tau.plot(steps, columns.get(name, []), label=name)
    ax_tau.set_ylabel("temperature")
    ax_tau.legend()
    for name in ("w_adv", "w_nat"):
        ax_w.plot(steps, columns.get(name, []), label=name)
    ax_w.set_ylabel("loss weight")
    ax_w.set_xlabel("step")
    ax_w.legend()
    fig.suptitle("B-MTARD balance trace")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def log_artifacts(client: "MlflowClient", run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_text(client: "MlflowClient", run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path))
