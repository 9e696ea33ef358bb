"""`python -m tune_mtard.compare`: methods side by side on `digits`, records in CSV, markdown and MLflow."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tune_mtard import pipeline
from tune_mtard.cli import compare
from tune_mtard.cli.common import run
from tune_mtard.config import load_config
from tune_mtard.engine import Trainer
from tune_mtard.workflows import compare as comparison_lib

METHODS = ["natural", "pgd-at", "b-mtard"]
EPOCHS = 4


def tiny_config(folder: Path, epochs: int = EPOCHS) -> Path:
    """A `digits` run config that trains in seconds: small teachers, few epochs, eps 0.2."""
    config = {
        "name": "tiny",
        "device": "cpu",
        "data": {"dataset": "digits", "val_fraction": 0.15, "batch_size": 64},
        "student": {"arch": "digits_cnn"},
        "teachers": {
            "clean": {"arch": "digits_cnn_large", "checkpoint": "auto", "recipe": "natural", "epochs": 2, "lr": 0.05,
                      "batch_size": 64},
            "robust": {"arch": "digits_cnn_large", "checkpoint": "auto", "recipe": "trades", "epochs": 2, "lr": 0.05,
                       "batch_size": 64},
            "cache_dir": str(folder / "teachers"),
        },
        "attack": {"epsilon": 0.2, "step_size": 0.05, "steps": 5},
        "train": {"epochs": epochs, "lr": 0.05},
        "eval": {"n_examples": 100, "pgd_step_size": 0.05, "final_attacks": ["clean", "pgd20"]},
        "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "tiny"},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return rows[0], rows[2:]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def runs_of(tracking_db: Path, experiment: str = "tiny"):
    client = MlflowClient(f"sqlite:///{tracking_db}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One comparison of natural, pgd-at and b-mtard (seed 0), run once for the tests below."""
    folder = tmp_path_factory.mktemp("compare")
    out = folder / "out"
    code = compare.main(["--config", str(tiny_config(folder)), "--methods", ",".join(METHODS),
                         "--seeds", "0", "--out", str(out)])
    return code, folder, out


def test_compare_prints_one_row_per_method_with_clean_attack_and_w_robust_columns(comparison):
    code, _, out = comparison
    assert code == 0
    header, rows = read_markdown_table((out / "comparison.md").read_text())
    assert header == ["method", "Clean", "PGD-20", "W-Robust (PGD-20)"]
    assert [row[0] for row in rows] == METHODS
    for row in rows:
        assert len(row) == len(header)
        clean, pgd, w_robust = (float(cell) for cell in row[1:])
        assert 0 <= pgd <= clean <= 100
        assert w_robust == pytest.approx((clean + pgd) / 2, abs=0.011)  # clean_weight 0.5, cells in %


def test_natural_training_has_the_best_clean_and_the_worst_robust_accuracy(comparison):
    _, _, out = comparison
    summary = {row["method"]: row for row in read_csv(out / "comparison_summary.csv")}
    clean = {m: float(summary[m]["test_clean_acc_mean"]) for m in METHODS}
    robust = {m: float(summary[m]["test_pgd20_acc_mean"]) for m in METHODS}
    assert max(clean, key=clean.get) == "natural", clean
    assert min(robust, key=robust.get) == "natural", robust


def test_compare_writes_a_csv_row_per_method_and_seed_and_each_runs_files(comparison):
    _, _, out = comparison
    rows = read_csv(out / "comparison.csv")
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [(m, "0", "FINISHED") for m in METHODS]
    for row in rows:
        for key in ("test_clean_acc", "test_pgd20_acc", "test_w_robust_acc_pgd20", "val_w_robust_acc"):
            assert 0 <= float(row[key]) <= 1
        run_dir = out / row["method"] / "seed0"
        for name in ("metrics.json", "balance_trace.csv", "config.yaml", "student.pt"):
            assert (run_dir / name).is_file()
        assert load_config(run_dir / "config.yaml", check_files=False).method == row["method"]


def test_mlflow_holds_one_parent_and_one_child_per_method_and_seed(comparison):
    _, folder, out = comparison
    client, runs = runs_of(folder / "mlflow.db")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["tiny-compare"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "comparison.csv", "comparison_summary.csv", "comparison.md"}
    assert "b-mtard/test_w_robust_acc_pgd20_mean" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    assert sorted(c.data.params["method"] for c in children) == sorted(METHODS)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["seed"] == "0"
        assert "balance.beta" in child.data.params
        assert "test_clean_acc" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "val_w_robust_acc")) == EPOCHS
        assert "balance_trace.csv" in {a.path for a in client.list_artifacts(child.info.run_id)}


def test_ablations_switch_the_balancers_and_keep_everything_else(tmp_path):
    base = load_config(tiny_config(tmp_path), check_files=False)
    configs = comparison_lib.run_configs(base, ["b-mtard", "b-mtard-no-ebb", "b-mtard-no-nlb", "b-mtard-none"], [3])
    switches = {m: (c.balance.entropy, c.balance.loss) for (m, _), c in configs.items()}
    assert switches == {"b-mtard": (True, True), "b-mtard-no-ebb": (False, True),
                        "b-mtard-no-nlb": (True, False), "b-mtard-none": (False, False)}
    for cfg in configs.values():
        assert cfg.seed == 3 and cfg.method == "b-mtard"
        assert cfg.train == base.train and cfg.attack == base.attack


@pytest.mark.parametrize("flags, names", [
    (["--methods", "natural,foo"], "--methods"),
    (["--methods", "natural", "--seeds", "0,x"], "--seeds"),
    (["--methods", "natural", "--seeds", "1,1"], "--seeds"),
    (["--methods", "natural", "--attacks", "pgd7"], "--attacks"),
    (["--methods", "natural", "--set", "train.epochs=0"], "train.epochs"),
    (["--methods", "natural", "--set", "balance.nope=1"], "balance.nope"),
    (["--methods", "natural", "--set", "train.workers=2"], "train.workers"),  # one process per run
    (["--methods", "natural", "--tune", "1", "--set", "train.workers=2"], "train.workers"),
    ([], "--methods"),
])
def test_bad_input_exits_2_with_one_line_before_anything_is_written(tmp_path, capsys, flags, names):
    config = tiny_config(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(compare.main, ["--config", str(config), "--out", str(out), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and names in err
    assert not out.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "teachers").exists()


def test_the_command_rejects_an_unknown_method_with_exit_code_2(tmp_path):
    config = tiny_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "tune_mtard.compare", "--config", str(config),
                             "--methods", "natural,b-mtard-no-balance"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "b-mtard-no-balance" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_failed_run_is_recorded_failed_and_the_others_still_run(tmp_path, monkeypatch):
    class PgdAtFails(Trainer):
        def fit(self, *args, **kwargs):
            if self.cfg.method == "pgd-at":
                raise RuntimeError("injected failure")
            return super().fit(*args, **kwargs)

    monkeypatch.setattr(pipeline, "Trainer", PgdAtFails)
    out = tmp_path / "out"
    code = compare.main(["--config", str(tiny_config(tmp_path, epochs=1)), "--methods", "pgd-at,natural",
                         "--seeds", "0", "--out", str(out), "--set", "eval.final_n_examples=64"])
    assert code == 1
    _, rows = read_markdown_table((out / "comparison.md").read_text())
    assert rows[0][0].startswith("pgd-at") and rows[0][1:] == ["failed"] * 3
    assert rows[1][0] == "natural" and float(rows[1][1]) > 0
    statuses = {r["method"]: (r["status"], r["error"]) for r in read_csv(out / "comparison.csv")}
    assert statuses == {"pgd-at": ("FAILED", "RuntimeError: injected failure"), "natural": ("FINISHED", "")}
    _, runs = runs_of(tmp_path / "mlflow.db")
    by_method = {r.data.tags.get("compare.method", "parent"): r.info.status for r in runs}
    assert by_method == {"parent": "FAILED", "pgd-at": "FAILED", "natural": "FINISHED"}


def test_a_diverging_run_is_failed_in_one_line_without_a_traceback(tmp_path, capsys):
    out = tmp_path / "out"
    code = compare.main(["--config", str(tiny_config(tmp_path, epochs=1)), "--methods", "natural",
                         "--seeds", "0", "--out", str(out), "--set", "train.lr=1e6"])
    assert code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    [row] = read_csv(out / "comparison.csv")
    assert row["status"] == "FAILED" and row["error"].startswith("diverged: the loss or balancer state became "
                                                                  "non-finite at step ")
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert {r.info.status for r in runs} == {"FAILED"}
    assert [r.data.tags["error"] for r in runs if "compare.method" in r.data.tags] == [row["error"]]
