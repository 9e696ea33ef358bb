"""Specification of `python -m tune_mtard.evaluate` (docs/cli.md) and of a search's final test evaluation
(`tune_mtard.final_eval`), on a tiny PGD-AT digits student trained once for this module.

The AutoAttack wrapper itself (settings check on a tampered object, per-stage counts, RNG and grads left
alone) is specified in tests/test_attacks.py; here it is seen through the command.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyautoattack
import pytest
import torch

from tune_mtard.cli.common import run
from tune_mtard.cli.evaluate import main as evaluate_main
from tune_mtard.config import from_dict
from tune_mtard.data import load_data
from tune_mtard.engine import Trainer
from tune_mtard.models import create_model, save_checkpoint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N = 32
WHITE_BOX = ("clean", "fgsm", "pgd20", "cw", "aa")
AA_STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")


def tiny_config(tmp: Path, **values):
    """PGD-AT on digits at eps 0.2 (no teachers needed); the robust teacher's arch is the black-box source's."""
    raw = {
        "name": "eval-tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": "digits", "val_fraction": 0.15, "batch_size": 128},
        "student": {"arch": "digits_cnn"},
        "teachers": {"clean": {"arch": "digits_cnn_large", "checkpoint": "auto"},
                     "robust": {"arch": "digits_cnn_large", "checkpoint": "auto"},
                     "cache_dir": str(tmp / "teachers")},
        "method": "pgd-at",
        "attack": {"epsilon": 0.2, "step_size": 0.05, "steps": 4},
        "train": {"epochs": 3, "lr": 0.05},
        "eval": {"every": 3, "n_examples": 64, "pgd_steps": 5, "pgd_step_size": 0.05, "final_attacks": ["clean"]},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "eval-tiny"},
    }
    return from_dict(raw, check_files=False).with_values(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PGD-AT digits_cnn student (3 epochs), a naturally trained one (not robust, for the black-box attacks to
    show their effect), a naturally trained digits_cnn_large source, their config YAML."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(tmp)
    data = load_data("digits", val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    student = Trainer(cfg, data, device=torch.device("cpu"))
    student.fit()
    save_checkpoint(student.student, tmp / "run" / "student.pt")
    natural = Trainer(cfg.with_values({"method": "natural"}), data, device=torch.device("cpu"))
    natural.fit()
    save_checkpoint(natural.student, tmp / "natural" / "student.pt")
    source_cfg = cfg.with_values({"method": "natural", "student.arch": "digits_cnn_large", "train.epochs": 2})
    source = Trainer(source_cfg, data, device=torch.device("cpu"))
    source.fit()
    save_checkpoint(source.student, tmp / "teachers" / "source.pt")
    cfg.dump(tmp / "config.yaml")
    return {"tmp": tmp, "cfg": cfg, "data": data, "config": tmp / "config.yaml",
            "student": tmp / "run" / "student.pt", "natural": tmp / "natural" / "student.pt",
            "source": tmp / "teachers" / "source.pt"}


@pytest.fixture(scope="module")
def white_box(trained):
    """The real command, as a user runs it, with every white-box attack on the first 32 test examples."""
    out = trained["tmp"] / "white_box.json"
    result = subprocess.run(
        [sys.executable, "-m", "tune_mtard.evaluate", "--config", str(trained["config"]),
         "--checkpoint", str(trained["student"]), "--attacks", ",".join(WHITE_BOX), "--n", str(N),
         "--out", str(out), "--no-progress"],
        cwd=trained["tmp"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"result": result, "record": json.loads(out.read_text())}


def evaluate(*argv: str) -> int:
    """The command in-process: its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        run(evaluate_main, [*argv, "--no-progress"])
    return exit_info.value.code


# ---- the command ---------------------------------------------------------------------------------------


def test_evaluate_prints_a_table_of_every_attack(white_box):
    stdout = white_box["result"].stdout
    assert "attack" in stdout and "accuracy" in stdout and "W-Robust Acc" in stdout
    for name in WHITE_BOX:
        assert f"\n{name} " in stdout
    for stage in ("apgd-ce", "apgd-t", "fab-t", "square"):
        assert f"after {stage}" in stdout


def test_evaluate_writes_json_with_n_and_every_key(white_box, trained):
    record = white_box["record"]
    assert record["n"] == N and record["split"] == "test" and record["epsilon"] == pytest.approx(0.2)
    for name in WHITE_BOX:
        assert 0.0 <= record[f"{name}_acc"] <= 1.0
        assert record[f"seconds_{name}"] >= 0.0
    w = trained["cfg"].eval.clean_weight
    for name in WHITE_BOX[1:]:
        expected = w * record["clean_acc"] + (1 - w) * record[f"{name}_acc"]
        assert record[f"w_robust_acc_{name}"] == pytest.approx(expected)
    for stage in AA_STAGES:
        assert 0.0 <= record[f"aa_{stage}_acc"] <= 1.0
    assert record["notes"] == []  # digits has 10 classes: AutoAttack's 9 target classes, no reduction


def test_evaluate_uses_the_first_n_test_examples_in_order(white_box, trained):
    model = create_model("digits_cnn", 10, 1)
    model.load_state_dict(torch.load(trained["student"], weights_only=True))
    test = trained["data"].test.head(N)
    with torch.no_grad():
        clean = model.eval()(test.floats()).argmax(1).eq(test.labels).float().mean().item()
    assert white_box["record"]["clean_acc"] == pytest.approx(clean)


def test_autoattack_is_at_most_pgd20_and_every_robust_accuracy_at_most_clean(white_box):
    record = white_box["record"]
    assert record["aa_acc"] <= record["pgd20_acc"]
    for name in WHITE_BOX[1:]:
        assert record[f"{name}_acc"] <= record["clean_acc"], name


def test_autoattack_stage_accuracies_are_non_increasing_and_end_at_aa_acc(white_box):
    record = white_box["record"]
    stages = [record[f"aa_{stage}_acc"] for stage in AA_STAGES]
    assert stages == sorted(stages, reverse=True)
    assert stages[0] <= record["clean_acc"]
    assert stages[-1] == record["aa_acc"]


def test_black_box_transfer_and_square_lower_a_natural_models_accuracy(trained, capsys):
    """On a model that is not robust, the attacks show their effect: measured on these 32 test digits, clean 0.94,
    Square (50 queries) 0.56, transfer PGD-20 0.34 and transfer CW 0.38; an attack that did nothing would leave
    the clean accuracy."""
    out = trained["tmp"] / "black_box.json"
    code = evaluate("--config", str(trained["config"]), "--checkpoint", str(trained["natural"]),
                    "--attacks", "square", "--square-queries", "50", "--n", "32",
                    "--source-checkpoint", str(trained["source"]), "--out", str(out))
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["source_arch"] == "digits_cnn_large"  # the config's robust teacher arch
    assert record["square_queries"] == 50
    for name in ("square", "transfer_pgd20", "transfer_cw"):
        assert 0.0 <= record[f"{name}_acc"] <= 1.0
        assert f"w_robust_acc_{name}" in record and f"seconds_{name}" in record
    assert record["clean_acc"] > 0.8
    assert record["square_acc"] <= record["clean_acc"] - 0.15
    assert record["transfer_pgd20_acc"] <= record["clean_acc"] - 0.3
    assert record["transfer_cw_acc"] <= record["clean_acc"] - 0.3
    assert "transfer_pgd20" in capsys.readouterr().out


def test_arch_flag_evaluates_a_teacher_checkpoint_and_writes_next_to_it(trained, capsys):
    code = evaluate("--config", str(trained["config"]), "--checkpoint", str(trained["source"]),
                    "--arch", "digits_cnn_large", "--attacks", "clean", "--n", "8")
    assert code == 0, capsys.readouterr().err
    record = json.loads((trained["source"].parent / "source.eval_test.json").read_text())
    assert record["arch"] == "digits_cnn_large" and record["n"] == 8


BAD_INPUTS = {
    "missing checkpoint": (["--checkpoint", "{tmp}/nowhere.pt"], "--checkpoint"),
    "checkpoint of another arch": (["--checkpoint", "{source}"], "does not match"),
    "unknown attack": (["--attacks", "clean,pgd7"], "pgd7"),
    "transfer without a source": (["--attacks", "transfer_pgd20"], "--source-checkpoint"),
    "bad split": (["--split", "holdout"], "--split"),
    "n below 1": (["--n", "0"], "--n"),
    "unknown arch": (["--arch", "resnet1000"], "--arch"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, trained, capsys):
    flags, named = BAD_INPUTS[case]
    out = trained["tmp"] / f"bad-{case.replace(' ', '-')}.json"
    argv = {"--config": str(trained["config"]), "--checkpoint": str(trained["student"]), "--attacks": "clean,aa",
            "--out": str(out)}
    values = (f.format(tmp=trained["tmp"], source=trained["source"]) for f in flags[1::2])
    argv.update(dict(zip(flags[::2], values, strict=False)))
    code = evaluate(*[item for pair in argv.items() for item in pair])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and named in err
    assert not out.exists()


def test_evaluate_refuses_to_run_a_tampered_autoattack(trained, capsys, monkeypatch):
    standard = pyautoattack.AutoAttack._set_version

    def fewer_square_queries(self, version):
        standard(self, version)
        self.square.n_queries = 1000

    monkeypatch.setattr(pyautoattack.AutoAttack, "_set_version", fewer_square_queries)
    out = trained["tmp"] / "tampered.json"
    code = evaluate("--config", str(trained["config"]), "--checkpoint", str(trained["student"]),
                    "--attacks", "clean,aa", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "square.n_queries is 1000, expected 5000" in err
    assert not out.exists()


# ---- a search's final evaluation ------------------------------------------------------------------------


def test_evaluate_top_trials_logs_test_metrics_to_the_right_child_runs(trained, tmp_path):
    from tune_mtard import tracking
    from tune_mtard.search.final_eval import evaluate_top_trials
    from tune_mtard.search.storage_fs import open_storage
    from tune_mtard.search.trials import TrialSummary, best_trial, rank_trials

    cfg = trained["cfg"].with_values({"search.final_eval": {"top_k": 2, "attacks": ["pgd20"], "n_examples": 16},
                                      "space": {"balance.beta": {"type": "float", "low": 0.5, "high": 3.0}}})
    untrained = create_model("digits_cnn", 10, 1)
    trials = []
    for trial_id, beta, epochs, val, model_path in [
        ("trial_a", 1.0, 3, 0.5, None),                       # full, second best: an untrained student
        ("trial_b", 2.0, 3, 0.7, trained["student"]),        # full, best
        ("trial_c", 2.5, 1, 0.9, trained["student"]),        # stopped early: ranks after every full trial
    ]:
        folder = tmp_path / trial_id
        if model_path is None:
            save_checkpoint(untrained, folder / "student.pt")
        else:
            folder.mkdir()
            (folder / "student.pt").write_bytes(model_path.read_bytes())
        trials.append(TrialSummary(trial_id, {"balance.beta": beta}, False, epochs,
                                   {"val_w_robust_acc": val}, open_storage(str(folder))))

    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("final-eval", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="search").info.run_id
    other_parent = client.create_run(experiment, run_name="another search").info.run_id
    children = {t.trial_id: client.create_run(experiment, run_name=t.trial_id, tags={
        "mlflow.parentRunId": parent, "trial_id": t.trial_id}).info.run_id for t in trials}
    decoy = client.create_run(experiment, run_name="trial_b", tags={
        "mlflow.parentRunId": other_parent, "trial_id": "trial_b"}).info.run_id

    results = evaluate_top_trials(cfg, trials, trained["data"], client, parent, tmp_path)

    assert [(r.trial_id, r.rank) for r in results] == [("trial_b", 1), ("trial_a", 2)]
    assert rank_trials(trials, "val_w_robust_acc", "max", 3)[0] is best_trial(trials, "val_w_robust_acc", "max", 3)
    logged = {trial_id: client.get_run(run_id).data.metrics for trial_id, run_id in children.items()}
    for r in results:
        for key in ("test_clean_acc", "test_pgd20_acc", "test_w_robust_acc_pgd20"):
            assert logged[r.trial_id][key] == pytest.approx(r.metrics[key])
    assert logged["trial_b"]["test_clean_acc"] > logged["trial_a"]["test_clean_acc"]
    assert "test_clean_acc" not in logged["trial_c"]
    assert client.get_run(decoy).data.metrics == {}
    parent_metrics = client.get_run(parent).data.metrics
    assert parent_metrics["top1_test_pgd20_acc"] == pytest.approx(results[0].metrics["test_pgd20_acc"])

    with (tmp_path / "final_eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["trial_id"], row["rank"]) for row in rows] == [("trial_b", "1"), ("trial_a", "2")]
    assert float(rows[0]["val_w_robust_acc"]) == 0.7
    assert float(rows[0]["test_pgd20_acc"]) == pytest.approx(results[0].metrics["test_pgd20_acc"])
    assert "final_eval.csv" in [a.path for a in client.list_artifacts(parent)]
