"""The search's MLflow records, journaled first and sent after (docs/search.md, "Records").

Every record of a search (a run created, params, metrics of an epoch, tags, artifacts, a run's end
status) is appended to ``records.jsonl`` in the search folder, flushed and fsynced, before anything is
sent. A :class:`RecordWriter` thread sends the entries in order with bounded retries, and appends a
``done`` line for each one MLflow took. While MLflow is down the entries stay pending; the Tune loop never
waits on MLflow and never sees its errors. Replaying is idempotent: a run is found again by its journal
key (tag ``tune_mtard.record_key``) before one is created, a metric keeps the timestamp it was journaled
with (MLflow stores an identical metric once), params already on a run are skipped, and tags, artifacts
and statuses overwrite themselves. Artifacts are copied into ``records/`` beside the journal until sent; a
``trace`` entry keeps a trial's ``state.pt`` there, from which the writer makes its ``balance_trace.csv`` and plot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_mtard import atomic, files, tracking
from tune_mtard.config import load_config
from tune_mtard.errors import ConfigError
from tune_mtard.search.journal_ops import apply
from tune_mtard.services import check_tracking_uri, masked_uri

KEPT_FILES = ("artifacts", "trace")  # entries whose files are copied beside the journal until sent
ATTEMPTS = 3  # tries of one entry before it stays pending for the next round
RETRY_S = 1.0  # between tries of an entry
OUTAGE_RETRY_S = 5.0  # between rounds while MLflow is down


class RecordJournal:
    """``records.jsonl``: one JSON entry a line. A last line cut short by a kill is ignored."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / files.RECORDS_JOURNAL
        self.artifacts = self.folder / files.RECORDS_ARTIFACTS
        self._lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self.done: set[int] = set()
        self.run_ids: dict[str, str] = {}  # journal key -> MLflow run id
        # Indexes kept as entries arrive, so no question a Tune callback asks reads the whole journal: the
        # driver's cost per report stays flat as the search grows (docs/search.md, "What the driver costs").
        self._first_pending = 0  # every entry before it is done
        self._steps: dict[str, set[int]] = {}  # key -> epochs with a metrics entry
        self._runs: set[str] = set()  # keys with a run entry
        self._ends: dict[str, tuple[int | None, str | None]] = {}  # key -> (last epochs_run, last status)
        for line in read_lines(self.path):
            self._take(line)
        drop_torn_tail(self.path)

    def _take(self, entry: dict[str, Any]) -> None:
        if "done" in entry:
            self.done.add(entry["done"])
            while self._first_pending < len(self.entries) and self.entries[self._first_pending]["seq"] in self.done:
                self._first_pending += 1
        elif "bind" in entry:
            self.run_ids[entry["bind"]] = entry["run_id"]
        else:
            self.entries.append(entry)
            key, op = entry["key"], entry["op"]
            epochs, status = self._ends.get(key, (None, None))
            if op == "metrics":
                self._steps.setdefault(key, set()).add(entry["step"])
            elif op == "run":
                self._runs.add(key)
                status = tracking.RUNNING
            elif op == "status":
                status = entry["status"]
            elif op == "tags" and "epochs_run" in entry["values"]:
                epochs = int(entry["values"]["epochs_run"])
            self._ends[key] = (epochs, status)

    def _write(self, entry: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._take(entry)

    def append(self, op: str, key: str, **fields: Any) -> int:
        """Journal one record of the run ``key``; returns its sequence number."""
        with self._lock:
            seq = len(self.entries)
            if op in KEPT_FILES:  # the files go with the entry: a temporary file may be gone when it is sent
                kept = self.artifacts / str(seq)
                kept.mkdir(parents=True, exist_ok=True)
                fields["paths"] = [str(shutil.copy2(path, kept / Path(path).name)) for path in fields["paths"]]
            self._write({"seq": seq, "op": op, "key": key, **fields})
            return seq

    def bind(self, key: str, run_id: str) -> None:
        """The MLflow run id of the journal key ``key``."""
        with self._lock:
            if self.run_ids.get(key) != run_id:
                self._write({"bind": key, "run_id": run_id})

    def mark_done(self, seq: int) -> None:
        with self._lock:
            self._write({"done": seq})
        entry = self.entries[seq]
        if entry["op"] in KEPT_FILES:
            shutil.rmtree(self.artifacts / str(seq), ignore_errors=True)

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.entries[self._first_pending:] if e["seq"] not in self.done]

    def logged_steps(self, key: str) -> set[int]:
        """The epochs journaled for the run ``key`` (sent or pending)."""
        return set(self._steps.get(key, ()))

    def has_step(self, key: str, step: int) -> bool:
        return step in self._steps.get(key, ())

    def has_run(self, key: str) -> bool:
        return key in self.run_ids or key in self._runs

    def finished_epochs(self, key: str) -> int | None:
        """The epochs the run ``key`` was last ended FINISHED with (its files are journaled), else None."""
        epochs, status = self._ends.get(key, (None, None))
        return epochs if status == tracking.FINISHED else None


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The journal's entries; a torn last line (the driver was killed while appending) is dropped."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    entries = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1 and any(rest.strip() for rest in lines[number + 1:]):
                raise ValueError(f"{path}: line {number + 1} is not a journal entry") from None
    return entries


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so the next entry starts a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def replay(journal: RecordJournal, client, attempts: int = ATTEMPTS, retry_s: float = RETRY_S) -> int:
    """Send the pending entries in order; stops at the first that fails ``attempts`` times. Returns how many
    are still pending."""
    for entry in journal.pending():
        for attempt in range(attempts):
            try:
                apply(client, journal, entry)
                break
            except Exception:
                if attempt == attempts - 1:
                    return len(journal.pending())
                time.sleep(retry_s)
        journal.mark_done(entry["seq"])
    return 0


class RecordWriter(threading.Thread):
    """Sends a journal's entries to MLflow in the background. During an outage it says so once, in one line,
    and tries again every ``OUTAGE_RETRY_S`` seconds."""

    def __init__(self, journal: RecordJournal, tracking_uri: str):
        super().__init__(name="mlflow-record-writer", daemon=True)
        self.journal = journal
        self.tracking_uri = tracking_uri
        self._wake = threading.Event()
        self._closing = threading.Event()
        self.idle = threading.Event()
        self.told = False
        self._client = None

    def notify(self) -> None:
        self.idle.clear()
        self._wake.set()

    def run(self) -> None:
        while not self._closing.is_set():
            self._wake.clear()
            try:
                if self._client is None:
                    self._client = tracking.client_for(self.tracking_uri)
                left = replay(self.journal, self._client)
            except Exception:
                left = len(self.journal.pending())
            if left and not self.told:
                print(f"MLflow at {masked_uri(self.tracking_uri)} is not answering: the search goes on and its "
                      f"records wait in {self.journal.path} (sent when it is back, or with: tune-mtard records "
                      f"sync --search {self.journal.folder})", file=sys.stderr, flush=True)
                self.told = True
            if not left:
                self.idle.set()
            self._wake.wait(OUTAGE_RETRY_S if left else None)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every entry to be sent; whether none is pending."""
        self.notify()
        deadline = time.monotonic() + timeout_s
        while self.journal.pending() and time.monotonic() < deadline:
            self.idle.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self._wake.set()
        return not self.journal.pending()

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self.join(timeout=OUTAGE_RETRY_S * 2)


_WRITERS: dict[Path, RecordWriter] = {}


def writer_for(folder: str | Path, tracking_uri: str) -> RecordWriter:
    """The driver's one writer of a search folder's journal, started on first use."""
    folder = Path(folder).resolve()
    writer = _WRITERS.get(folder)
    if writer is None or not writer.is_alive():
        writer = _WRITERS[folder] = RecordWriter(RecordJournal(folder), tracking_uri)
        writer.start()
    return writer


def close_writer(folder: str | Path) -> None:
    writer = _WRITERS.pop(Path(folder).resolve(), None)
    if writer is not None:
        writer.close()


def record(folder: str | Path, tracking_uri: str, op: str, key: str, **fields: Any) -> int:
    """Journal one record and wake the writer."""
    writer = writer_for(folder, tracking_uri)
    seq = writer.journal.append(op, key, **fields)
    writer.notify()
    return seq


def metrics_entry(values: dict[str, Any]) -> dict[str, Any]:
    """A metrics entry's fields: its timestamp is fixed now, so a replay adds no second row."""
    return {"values": {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "timestamp": int(time.time() * 1000)}


PARENT_KEY = "parent"  # the journal key of the search's parent run
DRAIN_S = 30.0  # how long the end of a search waits for its records to reach MLflow
EXIT_RECORDS_PENDING = 3  # a finished search whose MLflow records are not all sent yet (docs/cli.md)


@dataclass
class JournaledRun(tracking.RunHandle):
    """The parent run of a search, its writes journaled (reads, such as ``logged_steps``, go to MLflow)."""

    folder: str = "."

    def _record(self, op: str, key: str = PARENT_KEY, **fields: Any) -> None:
        record(self.folder, self.client.tracking_uri, op, key, **fields)

    def log_params(self, values: dict[str, Any]) -> None:
        self._record("params", values=dict(values))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._record("metrics", step=int(step), **metrics_entry(metrics))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._record("tags", values={k: str(v) for k, v in tags.items()})

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        self._record("artifacts", paths=[str(p) for p in paths], artifact_path=artifact_path)

    def kill_running_children(self) -> int:
        """After an interrupt: the child runs still open in the journal end KILLED (a resume reopens them)."""
        last: dict[str, str] = {}
        for e in writer_for(self.folder, self.client.tracking_uri).journal.entries:
            if e["key"] != PARENT_KEY and e["op"] in ("run", "status"):
                last[e["key"]] = e.get("status", tracking.RUNNING)
        running = [key for key, status in last.items() if status == tracking.RUNNING]
        for key in running:
            self._record("status", key, status=tracking.KILLED)
        return len(running)

    def prune_children(self, trial_ids: set[str]) -> None:
        """The search's child runs of no trial in ``trial_ids`` deleted, once MLflow takes the record
        (:func:`delete_orphaned_child_runs`)."""
        self._record("prune_children", keep=sorted(trial_ids))

    def tag_child(self, trial_id: str, tags: dict[str, Any]) -> None:
        """Tags on the child run of ``trial_id`` (its journal key)."""
        self._record("tags", trial_id, values={k: str(v) for k, v in tags.items()})

    def untag_child(self, trial_id: str, names: Iterable[str]) -> None:
        """Tags removed from the child run of ``trial_id`` (those of a failure it is retried after)."""
        self._record("untag", trial_id, names=list(names))


@contextlib.contextmanager
def open_journaled_run(client, folder: str | Path, experiment_id: str, name: str, tags: dict[str, Any],
                       reopen: str | None = None) -> Iterator[JournaledRun]:
    """:func:`tracking.open_run` for a search's parent run: created (or reopened) at once, while the tracking
    server is known to answer; its records and its end status (FINISHED, FAILED or KILLED) journaled."""
    if reopen is not None:
        client.update_run(reopen, status=tracking.RUNNING)
        run_id = reopen
    else:
        run_id = client.create_run(experiment_id, run_name=name).info.run_id
    writer_for(folder, client.tracking_uri).journal.bind(PARENT_KEY, run_id)
    handle = JournaledRun(client, run_id, folder=str(Path(folder).resolve()))
    handle.set_tags(tags)
    try:
        yield handle
    except BaseException as error:
        handle._record("status", status=tracking.status_for(error))
        raise
    handle._record("status", status=tracking.FAILED if handle.failed else tracking.FINISHED)


def bounded_http_retries() -> None:
    """The writer retries on its own: each MLflow HTTP call of the driver gives up in seconds, not minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def settle(folder: str | Path, tracking_uri: str, timeout_s: float = DRAIN_S) -> str:
    """At the end of a search: wait for the records to reach MLflow, then say in ``summary.json`` whether they
    all did (``records: complete | pending``). Returns that word."""
    writer = writer_for(folder, tracking_uri)
    records = "complete" if writer.drain(timeout_s) else "pending"
    close_writer(folder)
    summary_path = Path(folder) / files.SUMMARY_JSON
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        atomic.write_text(summary_path, json.dumps({**summary, "records": records}, indent=2))
    if records == "pending":
        print(f"MLflow records pending: {len(writer.journal.pending())} are in {writer.journal.path}; once "
              f"{masked_uri(tracking_uri)} answers, send them with: tune-mtard records sync --search {folder}",
              file=sys.stderr, flush=True)
    return records


@dataclass
class Settled:
    pending: bool = False


@contextlib.contextmanager
def settled(folder: str | Path, tracking_uri: str) -> Iterator[Settled]:
    """The block's records settled (:func:`settle`) when it ends, however it ends."""
    result = Settled()
    try:
        yield result
    finally:
        result.pending = settle(folder, tracking_uri) == "pending"


def sync(folder: str | Path, tracking_uri: str) -> int:
    """``records sync``: send a search's pending records; how many are still pending."""
    folder = Path(folder)
    journal = RecordJournal(folder)
    left = replay(journal, tracking.client_for(tracking_uri))
    summary_path = folder / files.SUMMARY_JSON
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        atomic.write_text(summary_path, json.dumps({**summary, "records": "pending" if left else "complete"},
                                                   indent=2))
    return left


def sync_search(folder: str | Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """``records sync``: the tracking URI used and how many records are still pending. A folder without a
    journal, or a tracking server that does not answer, is a ConfigError naming it."""
    folder = Path(folder)
    if not (folder / files.RECORDS_JOURNAL).is_file():
        raise ConfigError("--search", f"{folder}: no {files.RECORDS_JOURNAL} (not the folder of a search)")
    if tracking_uri is None:
        tracking_uri = load_config(folder / files.SPACE, check_files=False).mlflow.tracking_uri
    check_tracking_uri(tracking_uri, "--tracking-uri")
    return masked_uri(tracking_uri), sync(folder, tracking_uri)
