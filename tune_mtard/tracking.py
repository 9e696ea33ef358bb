"""MLflow records: one run lifecycle, params as dotted config keys, metrics by epoch, artifacts.

All writes go through one :class:`mlflow.MlflowClient` in one process (a search's driver, or the
``train`` / ``compare`` command), so a sqlite store never sees two writers. :func:`open_run` is the one
way a run is opened: it always ends the run FINISHED, FAILED or KILLED, so a failure is never recorded
as a result (docs/search.md, "Records").
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_mtard.errors import Interrupted
from tune_mtard.services import mask_secrets, masked_uri

if TYPE_CHECKING:  # mlflow takes over a second to import: commands that reject bad input never pay it
    from mlflow.tracking import MlflowClient

    from tune_mtard.config.sections import MlflowConfig

MAX_PARAM_LENGTH = 6000
_BATCH = 900  # MLflow accepts at most 1000 entries per log_batch

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"


def client_for(tracking_uri: str) -> MlflowClient:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3 opens an experiment on its GenAI overview unless it is marked as model development.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_PORT = 5000  # mlflow ui's default


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment called ``name``, created (or restored from the bin) if needed, marked as model development."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        found = experiment.experiment_id
    else:
        found = client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    if experiment is None or experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(found, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found


def ui_link(tracking_uri: str, experiment: str, port: int = UI_PORT) -> str:
    """The MLflow UI's page of the experiment's runs table (not its GenAI overview): on a tracking server its
    own address; for a local store, where ``mlflow ui`` serves it by default."""
    base = (masked_uri(tracking_uri).rstrip("/") if tracking_uri.startswith(("http://", "https://"))
            else f"http://127.0.0.1:{port}")
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def ui_hint(tracking_uri: str, experiment_name: str) -> str:
    """What a command prints at its end: how to open its runs in the MLflow UI, with the direct link."""
    client = client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment_name)
    link = ui_link(tracking_uri, found.experiment_id if found else "0")
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI:   {link}"
    return f"MLflow UI:   mlflow ui --backend-store-uri {masked_uri(tracking_uri)}   then open {link}"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database file (``mlruns/<experiment>``), not in
    whatever folder the command ran from; other stores keep their server's default."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):])
        return (database.parent / "mlruns" / experiment).resolve().as_uri()
    return None


def log_params(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """Params not already on the run (MLflow refuses to change a param), values cut to MLflow's limit."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    params = [Param(k, mask_secrets(str(v))[:MAX_PARAM_LENGTH]) for k, v in values.items() if k not in existing]
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i : i + _BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int,
                timestamp_ms: int | None = None) -> None:
    """The numeric, non-NaN entries of ``metrics`` at ``step``; anything else is skipped. A given timestamp makes
    sending them again harmless (MLflow stores an identical metric once)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    entries = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))]
    for i in range(0, len(entries), _BATCH):
        client.log_batch(run_id, metrics=entries[i : i + _BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, mask_secrets(str(v))) for k, v in tags.items()])


TEXT_ARTIFACTS = (".yaml", ".yml", ".json", ".csv", ".md", ".txt")


def log_artifacts(client: MlflowClient, run_id: str, paths: Iterable[str | Path],
                  artifact_path: str | None = None) -> None:
    """Upload files; a text file naming a URI with a password goes up as a copy with the password masked."""
    for path in paths:
        path = Path(path)
        text = path.read_text(errors="replace") if path.suffix in TEXT_ARTIFACTS else None
        if text is None or mask_secrets(text) == text:
            client.log_artifact(run_id, str(path), artifact_path)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            masked = Path(tmp) / path.name
            masked.write_text(mask_secrets(text))
            client.log_artifact(run_id, str(masked), artifact_path)


def status_for(error: BaseException | None) -> str:
    """How a run that ended with ``error`` (None: it ended normally) is recorded."""
    if error is None:
        return FINISHED
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        return KILLED
    return FAILED


@dataclass
class RunHandle:
    """An open MLflow run: where its records go. ``failed`` ends it FAILED even without an exception."""

    client: MlflowClient
    run_id: str
    failed: bool = False
    reopened: bool = False  # a resume continues this run: its params and first records are already there
    experiment_id: str = ""  # the experiment it is in (where a command opens the runs under it)

    def log_params(self, values: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, values)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        log_artifacts(self.client, self.run_id, paths, artifact_path)

    def logged_steps(self, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}


@contextlib.contextmanager
def command_run(mlflow: MlflowConfig, name: str, command: str, folder: Path, folder_tag: str = "tune_mtard.out",
                id_file: Path | None = None, resume: bool = False) -> Iterator[RunHandle]:
    """The run of one command (``train``, ``compare``, ``search``...): in the experiment ``mlflow.experiment``
    of ``mlflow.tracking_uri`` (created if needed), tagged with the command and its output folder.

    On ``resume`` the run named by ``id_file`` (when it exists) is continued rather than a new one opened;
    ``handle.reopened`` says which. The run ends as :func:`open_run` ends it.
    """
    client = client_for(mlflow.tracking_uri)
    experiment = experiment_id(client, mlflow.experiment)
    reopen = id_file.read_text().strip() if resume and id_file is not None and id_file.is_file() else None
    with open_run(client, experiment, name, reopen=reopen,
                  tags={"tune_mtard.command": command, folder_tag: str(folder)}) as run:
        run.reopened, run.experiment_id = reopen is not None, experiment
        yield run


@contextlib.contextmanager
def open_run(client: MlflowClient, experiment: str, name: str, tags: dict[str, Any] | None = None,
             reopen: str | None = None) -> Iterator[RunHandle]:
    """A run from start to its end status: FINISHED when the block ends normally (and ``failed`` is not set),
    KILLED on an interrupt, FAILED on any other exception, which propagates.

    ``reopen`` continues an existing run (a resume) instead of creating one; ``tags`` are set either way.
    """
    if reopen is not None:
        client.update_run(reopen, status=RUNNING)
        run_id = reopen
    else:
        run_id = client.create_run(experiment, run_name=name).info.run_id
    handle = RunHandle(client, run_id)
    if tags:
        handle.set_tags(tags)
    try:
        yield handle
    except BaseException as error:
        client.set_terminated(run_id, status_for(error))
        raise
    client.set_terminated(run_id, FAILED if handle.failed else FINISHED)
