"""What each entry of the search's MLflow journal does in MLflow (:mod:`tune_mtard.search.journal`; docs/search.md,
"Records"): every operation idempotent, so a replay after a crash or an outage sends nothing twice."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_mtard import files, tracking

if TYPE_CHECKING:
    from tune_mtard.search.journal import RecordJournal

RECORD_KEY_TAG = "tune_mtard.record_key"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_ID_TAG = "trial_id"  # a child run's Ray Tune trial id (its journal key too)


def apply(client, journal: RecordJournal, entry: dict[str, Any]) -> None:
    """Send one journal entry to MLflow (idempotent: see the module's docstring)."""
    key, op = entry["key"], entry["op"]
    if op == "run":
        if key not in journal.run_ids:
            found = client.search_runs([entry["experiment_id"]], filter_string=f"tags.`{RECORD_KEY_TAG}` = '{key}'",
                                       max_results=1)
            run_id = found[0].info.run_id if found else client.create_run(
                entry["experiment_id"], run_name=entry["name"], tags={**entry["tags"], RECORD_KEY_TAG: key}).info.run_id
            journal.bind(key, run_id)
        client.update_run(journal.run_ids[key], status=tracking.RUNNING)
        return
    run_id = journal.run_ids[key]
    if op == "params":
        tracking.log_params(client, run_id, entry["values"])
    elif op == "metrics":
        tracking.log_metrics(client, run_id, entry["values"], entry["step"], timestamp_ms=entry["timestamp"])
    elif op == "tags":
        tracking.set_tags(client, run_id, entry["values"])
    elif op == "untag":  # tags a retried trial no longer carries
        present = client.get_run(run_id).data.tags
        for name in entry["names"]:
            if name in present:
                client.delete_tag(run_id, name)
    elif op == "artifacts":
        tracking.log_artifacts(client, run_id, entry["paths"], entry.get("artifact_path"))
    elif op == "trace":
        log_trace(client, run_id, entry["paths"][0], entry["title"])
    elif op == "status":
        client.set_terminated(run_id, entry["status"])
    elif op == "prune_children":
        delete_orphaned_child_runs(client, run_id, set(entry["keep"]))
    else:
        raise ValueError(f"unknown journal entry {op!r}")


def child_runs_filter(parent_run_id: str, trial_id: str | None = None) -> str:
    """The MLflow search filter for the child runs of a search (or for one trial's)."""
    parent = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return parent if trial_id is None else f"tags.{TRIAL_ID_TAG} = '{trial_id}' and {parent}"


def delete_orphaned_child_runs(client, parent_run_id: str, trial_ids: set[str]) -> int:
    """Child runs of trials that a killed driver started but its last snapshot never recorded.

    Ray does not know these trials after a resume (it samples new ones in their place), so their runs
    would be duplicates with no trial behind them.
    """
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=child_runs_filter(parent_run_id), max_results=10_000)
    orphans = [r for r in children
               if r.data.tags.get(TRIAL_ID_TAG) not in trial_ids and r.data.tags.get("confirm") != "true"]
    for run in orphans:
        client.delete_run(run.info.run_id)
    return len(orphans)


def log_trace(client, run_id: str, state_file: str, title: str) -> None:
    """``balance_trace.csv`` and its plot, from a trial's loop state (``state.pt``), as artifacts of the run: the
    writer does it, so the end of a trial costs Ray Tune's event loop a file copy, not the trace and a plot."""
    # torch and matplotlib load in the writer's first trace entry: a journal replay without one needs neither
    import torch

    # matplotlib comes with plots
    from tune_mtard.plots import plot_trace
    from tune_mtard.trace import write_trace

    state = torch.load(state_file, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace_csv, trace_png = Path(tmp) / files.TRACE_CSV, Path(tmp) / files.TRACE_PNG
        write_trace(state["trace"], trace_csv)
        plot_trace(trace_csv, trace_png, title=title)
        tracking.log_artifacts(client, run_id, [str(trace_csv), str(trace_png)])
