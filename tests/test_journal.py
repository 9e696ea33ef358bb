"""The search's record journal (tune_mtard/search/journal.py): records reach MLflow once, in order, after an
outage too, and a kill mid-append loses nothing that was journaled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune_mtard import files, tracking
from tune_mtard.search import journal, journal_ops


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
    reopened = journal.RecordJournal(tmp_path)
    assert [e["op"] for e in reopened.pending()] == ["tags"]
    reopened.append("status", "t1", status="FINISHED")  # a line of its own, after the torn one is cut
    assert [e["op"] for e in journal.RecordJournal(tmp_path).pending()] == ["tags", "status"]
    with (tmp_path / files.RECORDS_JOURNAL).open("a") as f:
        f.write('{"seq": 2, "op\n{"done": 0}\n')  # a line in the middle that is not an entry: not a kill
    with pytest.raises(ValueError, match="line 3"):
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


def test_an_untag_record_removes_the_tags_and_sending_it_again_is_harmless(tmp_path):
    uri, client, experiment = store(tmp_path)
    j = journal.RecordJournal(tmp_path / "search")
    j.append("run", "t1", experiment_id=experiment, name="t1", tags={"trial_id": "t1"})
    j.append("tags", "t1", values={"failure_kind": "infra", "failure": "ActorDiedError", "node_id": "n1"})
    j.append("untag", "t1", names=["failure_kind", "failure", "not_there"])
    assert journal.replay(j, client) == 0
    again = journal.RecordJournal(tmp_path / "search")
    again.done = {e["seq"] for e in again.entries if e["op"] != "untag"}
    assert journal.replay(again, client) == 0  # a driver killed before journaling its "done"
    tags = client.get_run(j.run_ids["t1"]).data.tags
    assert "failure_kind" not in tags and "failure" not in tags and tags["node_id"] == "n1"


def test_a_prune_record_deletes_the_child_runs_of_unknown_trials_when_it_is_sent(tmp_path):
    uri, client, experiment = store(tmp_path)
    j = journal.RecordJournal(tmp_path / "search")
    j.append("run", journal.PARENT_KEY, experiment_id=experiment, name="search", tags={})
    assert journal.replay(j, client) == 0
    parent = j.run_ids[journal.PARENT_KEY]
    for key, tags in (("known", {}), ("orphan", {}), ("rerun", {"confirm": "true"})):
        j.append("run", key, experiment_id=experiment, name=key,
                 tags={journal_ops.PARENT_TAG: parent, journal_ops.TRIAL_ID_TAG: key, **tags})
    j.append("prune_children", journal.PARENT_KEY, keep=["known"])
    assert journal.replay(j, client) == 0
    again = journal.RecordJournal(tmp_path / "search")
    again.done -= {len(again.entries) - 1}  # the prune sent again after a kill: nothing more to delete
    assert journal.replay(again, client) == 0
    live = {r.info.run_name for r in client.search_runs([experiment])}
    assert live == {"search", "known", "rerun"}


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


# ---- an outage of a real tracking server while trials train ------------------------------------------------


def test_a_search_outlives_a_killed_mlflow_server_and_records_sync_brings_every_record_over(tmp_path):
    import csv
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient
    from searchkit import child_env
    from services import free_port, mlflow_server

    server_folder, port = tmp_path / "server", free_port()
    server_folder.mkdir()
    folder = tmp_path / "results" / "outage"
    with mlflow_server(server_folder, port) as (uri, _):
        search = subprocess.Popen(
            [sys.executable, "-m", "tune_mtard.search", "--space", "digits.yaml", "--num-samples", "2", "--max-epochs",
             "3", "--storage", str(tmp_path / "results"), "--tracking-uri", uri, "--no-progress",
             "--set", "name=outage", "--set", "mlflow.experiment=outage", "--set", "search.max_concurrent=1",
             "--set", "search.scheduler.type=fifo", "--set", f"teachers.cache_dir={tmp_path / 'teachers'}",
             "--set", "device=cpu", "--set", f"data.root={tmp_path}"],
            env=child_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 400
        journal_file = folder / files.RECORDS_JOURNAL
        while '"op": "metrics", "key"' not in (journal_file.read_text() if journal_file.is_file() else ""):
            assert search.poll() is None and time.monotonic() < deadline, "the search ended before a trial reported"
            time.sleep(0.2)
    # the server is down from the first epoch of the first trial on
    out, err = search.communicate(timeout=600)
    assert search.returncode == journal.EXIT_RECORDS_PENDING, err[-3000:]
    summary = json.loads((folder / files.SUMMARY_JSON).read_text())
    assert summary["status"] == "finished" and summary["records"] == "pending" and summary["n_failed"] == 0
    assert (folder / files.BEST_CONFIG).is_file() and summary["best_trial_id"] in out
    assert sum("is not answering" in line for line in err.splitlines()) == 1, err[-3000:]
    with open(folder / files.TRIALS_CSV) as f:
        epochs = {row["trial_id"]: int(row["epochs"]) for row in csv.DictReader(f)}
    assert len(epochs) == 2 and set(epochs.values()) == {3}

    with mlflow_server(server_folder, port) as (uri, _):  # back, on the same backend
        sync = subprocess.run([sys.executable, "-m", "tune_mtard", "records", "sync", "--search", str(folder)],
                              env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert json.loads((folder / files.SUMMARY_JSON).read_text())["records"] == "complete"
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("outage").experiment_id
        runs = client.search_runs([experiment])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        children = {r.data.tags["trial_id"]: r for r in runs if r is not parent}
        assert sorted(children) == sorted(epochs) and len(runs) == 3  # no duplicate run
        for trial_id, run in children.items():
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_w_robust_acc")]
            assert sorted(steps) == list(range(1, epochs[trial_id] + 1))  # every epoch, once
            assert run.info.status == "FINISHED"
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"balance_trace.csv", "balance_trace.png", "model"} <= names
            assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/student.pt"]
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["best_trial_id"] == summary["best_trial_id"]
        assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
