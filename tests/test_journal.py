"""The search's record journal (tune_mtard/search/journal.py): records reach MLflow once, in order, after an
outage too, and a kill mid-append loses nothing that was journaled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune_mtard import files, tracking
from tune_mtard.search import journal


def store(tmp_path: Path) -> tuple[str, object, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    return uri, client, tracking.experiment_id(client, "unit")


def test_appended_records_are_flushed_lines_read_back_in_order(tmp_path):
    j = journal.RecordJournal(tmp_path)
    j.append("run", "t1", experiment_id="0", name="t1", tags={})
    j.append("metrics", "t1", step=1, values={"val_clean_acc": 0.5}, timestamp=1000)
    again = journal.RecordJournal(tmp_path)
    assert [(e["seq"], e["op"]) for e in again.pending()] == [(0, "run"), (1, "metrics")]
    assert again.logged_steps("t1") == {1} and again.has_run("t1") and not again.has_run("t2")


def test_a_torn_last_line_is_dropped_and_a_torn_middle_line_is_refused(tmp_path):
    j = journal.RecordJournal(tmp_path)
    j.append("tags", "t1", values={"a": "1"})
    with (tmp_path / files.RECORDS_JOURNAL).open("a") as f:
        f.write('{"seq": 1, "op": "ta')  # the driver was killed while appending
    assert [e["op"] for e in journal.RecordJournal(tmp_path).pending()] == ["tags"]
    with (tmp_path / files.RECORDS_JOURNAL).open("a") as f:
        f.write('\n{"done": 0}\n')
    with pytest.raises(ValueError, match="line 2"):
        journal.RecordJournal(tmp_path)


def test_replay_sends_each_record_once_and_a_second_replay_adds_no_row_or_run(tmp_path):
    uri, client, experiment = store(tmp_path)
    j = journal.RecordJournal(tmp_path / "search")
    artifact = tmp_path / "trace.csv"
    artifact.write_text("step\n1\n")
    j.append("run", "t1", experiment_id=experiment, name="t1", tags={"trial_id": "t1"})
    j.append("params", "t1", values={"balance.beta": 1.5})
    for step in (1, 2):
        j.append("metrics", "t1", step=step, values={"val_clean_acc": 0.1 * step}, timestamp=1000 + step)
    j.append("artifacts", "t1", paths=[str(artifact)])
    artifact.unlink()  # the journal kept its own copy
    j.append("status", "t1", status=tracking.FINISHED)
    assert journal.replay(j, client) == 0
    run_id = j.run_ids["t1"]
    # a driver killed after sending but before journaling "done": everything is sent again (but the artifact,
    # whose copy goes only once its "done" is journaled)
    replayed = journal.RecordJournal(tmp_path / "search")
    replayed.done = {e["seq"] for e in replayed.entries if e["op"] == "artifacts"}
    replayed.run_ids.clear()
    assert journal.replay(replayed, client) == 0
    runs = client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == tracking.FINISHED
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_clean_acc")) == [(1, 0.1), (2, 0.2)]
    assert runs[0].data.params == {"balance.beta": "1.5"}
    assert [a.path for a in client.list_artifacts(run_id)] == ["trace.csv"]


def test_a_record_mlflow_refuses_stays_pending_with_everything_after_it(tmp_path):
    j = journal.RecordJournal(tmp_path / "search")
    j.append("run", "t1", experiment_id="0", name="t1", tags={})
    j.append("metrics", "t1", step=1, values={"val_clean_acc": 0.5}, timestamp=1)
    down = tracking.client_for("http://127.0.0.1:9")
    assert journal.replay(j, down, attempts=1, retry_s=0) == 2
    assert len(journal.RecordJournal(tmp_path / "search").pending()) == 2


def test_settle_says_in_the_summary_whether_the_records_reached_mlflow(tmp_path, monkeypatch):
    uri, client, experiment = store(tmp_path)
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / files.SUMMARY_JSON).write_text(json.dumps({"status": "finished"}))
    journal.record(folder, uri, "run", "t1", experiment_id=experiment, name="t1", tags={})
    assert journal.settle(folder, uri, timeout_s=60) == "complete"
    assert json.loads((folder / files.SUMMARY_JSON).read_text()) == {"status": "finished", "records": "complete"}
    monkeypatch.setattr(journal, "OUTAGE_RETRY_S", 0.1)
    down = "http://127.0.0.1:9"
    journal.record(folder, down, "tags", "t1", values={"x": "1"})
    assert journal.settle(folder, down, timeout_s=3) == "pending"
    assert json.loads((folder / files.SUMMARY_JSON).read_text())["records"] == "pending"
    assert journal.sync(folder, uri) == 0
    assert json.loads((folder / files.SUMMARY_JSON).read_text())["records"] == "complete"
    assert client.get_run(journal.RecordJournal(folder).run_ids["t1"]).data.tags["x"] == "1"
