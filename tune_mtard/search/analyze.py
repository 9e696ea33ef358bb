"""``analyze --experiment DIR``: rewrite the sensitivity analysis of a finished or interrupted search and put
it on the search's MLflow parent run when its store can be reached (docs/sensitivity.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_mtard import files, tracking
from tune_mtard.config import absolute_tracking_uri, load_config
from tune_mtard.errors import ConfigError
from tune_mtard.search.lock import SearchLock
from tune_mtard.search.remote import Mirror, mirror_folder
from tune_mtard.search.sensitivity import SensitivityReport, analyze_search, log_sensitivity
from tune_mtard.search.storage_fs import is_uri, open_storage
from tune_mtard.services import mask_secrets, masked_uri


@dataclass
class AnalyzeRequest:
    experiment: str  # the search's folder, <storage>/<name>
    tracking_uri: str | None = None  # None: the MLflow store the search recorded to


@dataclass
class Analyzed:
    report: SensitivityReport
    folder: Path
    run_id: str | None  # the parent run the files were logged to; None: not logged
    not_logged: str = ""  # why not


def analyze_experiment(request: AnalyzeRequest) -> Analyzed:
    """Check the folder is a search's (ConfigError, exit 2, otherwise), analyze it, log the result.

    An object store's search folder (``s3://bucket/prefix/name``) is analyzed in this machine's copy of its
    files, the one its driver used (docs/cluster.md, "Object storage"), under the search's lock: the files
    come from the bucket and the analysis goes back to it."""
    if is_uri(request.experiment):
        storage = open_storage(request.experiment, key="--experiment")
        folder = mirror_folder(storage.uri)
        with SearchLock(folder, "--experiment"):
            mirror = Mirror(storage, folder)
            mirror.pull()
            done = _analyze(request, folder)
            mirror.push()
            return done
    folder = Path(request.experiment).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError("--experiment", f"{folder}: no such folder")
    return _analyze(request, folder)


def _analyze(request: AnalyzeRequest, folder: Path) -> Analyzed:
    if not (folder / files.SPACE).is_file():
        raise ConfigError("--experiment", f"{folder} is not a tune-mtard search folder (no {files.SPACE})")
    cfg = load_config(folder / files.SPACE, check_files=False)
    if cfg.search is None or not cfg.space:
        raise ConfigError("--experiment", f"{folder / files.SPACE} has no space section: not a search's")
    # optuna loads at import of this: only a search folder that is really analyzed needs it
    from tune_mtard.search.study_storage import check_reachable, optuna_storage_url, study_exists

    url = optuna_storage_url(cfg, folder)
    if cfg.search.optuna_storage:
        check_reachable(url)
    if not study_exists(url, cfg.name):
        where = cfg.search.optuna_storage or files.OPTUNA_DB
        raise ConfigError("--experiment", f"{folder} holds no Optuna study {cfg.name!r} in {where}: "
                                          "the search has not started a trial")
    report = analyze_search(folder, cfg)
    uri = absolute_tracking_uri(request.tracking_uri) if request.tracking_uri else cfg.mlflow.tracking_uri
    client, run_id, reason = parent_run(folder, uri)
    if client is None:
        return Analyzed(report, folder, None, reason)
    log_sensitivity(tracking.RunHandle(client, run_id), report)
    return Analyzed(report, folder, run_id)


def parent_run(folder: Path, tracking_uri: str) -> tuple[Any, str | None, str]:
    """``(client, run id, "")`` of the search's parent run, or ``(None, None, why)`` when it cannot be reached.
    A local store (sqlite file, folder) that does not exist is not reachable, rather than created empty."""
    id_file = folder / files.PARENT_RUN_ID
    if not id_file.is_file():
        return None, None, f"no {files.PARENT_RUN_ID} in {folder}"
    run_id = id_file.read_text().strip()
    schemes = ("sqlite:///", "file://")
    local = next((tracking_uri[len(s):] for s in schemes if tracking_uri.startswith(s)),
                 tracking_uri if "://" not in tracking_uri else None)
    if local is not None and not Path(local).exists():
        return None, None, f"{masked_uri(tracking_uri)}: no such store"
    try:
        client = tracking.client_for(tracking_uri)
        run = client.get_run(run_id)
    except Exception as exc:  # unreachable server, unknown run, a database of something else: files stay local
        lines = str(exc).strip().splitlines()
        return None, None, mask_secrets(f"{tracking_uri}: {lines[0] if lines else type(exc).__name__}")
    if run.info.lifecycle_stage == "deleted":
        return None, None, f"{masked_uri(tracking_uri)}: the parent run {run_id} is deleted"
    return client, run_id, ""
