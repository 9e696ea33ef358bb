"""After a search: the top-k trials by validation score, evaluated on the test split (``search.final_eval``).

Selection happens on validation data only. This module reports how the already-chosen trials fare on
test data (e.g. under AutoAttack); nothing it measures feeds back into which trial is best.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tune_mtard import atomic, tracking
from tune_mtard.config import Config
from tune_mtard.data import DataBundle
from tune_mtard.evaluation import final_test_metrics
from tune_mtard.files import FINAL_EVAL_CSV, STUDENT
from tune_mtard.perf import resolve_device
from tune_mtard.search.recorder import child_run_id
from tune_mtard.search.trials import TrialSummary, rank_trials

log = logging.getLogger(__name__)


@dataclass
class FinalEvalResult:
    """One evaluated trial: its rank by validation (1 = the best trial), validation score and test metrics."""

    trial_id: str
    rank: int
    val_metric: float
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate_trial(cfg: Config, trial: TrialSummary, data: DataBundle, device: torch.device) -> dict[str, float]:
    """``test_<attack>_acc`` and ``test_w_robust_acc_<attack>`` of the trial's final student.

    The trial's own run config (base config plus its sampled values) gives the arch, epsilon and eval
    settings; ``search.final_eval`` gives the attacks and the number of test examples.
    """
    final = cfg.search.final_eval
    trial_cfg = trial.run_config(cfg, {"eval.final_attacks": list(final.attacks),
                                       "eval.final_n_examples": final.n_examples})
    model = trial.load_student(trial_cfg, data).to(device).eval()
    return final_test_metrics(trial_cfg, model, data, device)


def evaluate_top_trials(cfg: Config, trials: list[TrialSummary], data: DataBundle, client, parent_run_id: str,
                        folder: str | Path, first: str | None = None) -> list[FinalEvalResult]:
    """Evaluate the ``search.final_eval.top_k`` best trials on the first ``search.final_eval.n_examples`` test examples.

    Trials are ranked by :func:`~tune_mtard.search.trials.rank_trials`, whose first trial is the best one
    (full-epoch trials first by ``search.metric``, then the rest; failed trials never), so rank 1 is the
    best trial; ``first`` puts a trial first instead (a seed-confirmed winner). This never changes
    which trial is best: selection stays on validation, and test results are only reported, never ranked
    on. A trial without a saved student, or whose evaluation fails, is skipped with a warning and the next
    one taken.

    Each trial's ``test_<attack>_acc`` and ``test_w_robust_acc_<attack>`` (``clean`` always included) go to
    its MLflow child run; ``<folder>/final_eval.csv`` (trial, rank, validation metric, test metrics) goes to
    the parent run, with the best trial's metrics as ``top1_test_<...>``. Returns the evaluated trials in
    rank order.
    """
    s = cfg.search
    device = resolve_device(cfg.device)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    results: list[FinalEvalResult] = []
    ranked = rank_trials(trials, s.metric, s.mode, cfg.train.epochs)
    ranked = [t for t in ranked if t.trial_id == first] + [t for t in ranked if t.trial_id != first]
    for rank, trial in enumerate(ranked, start=1):
        if len(results) >= s.final_eval.top_k:
            break
        if trial.checkpoint is None or not trial.checkpoint.exists(STUDENT):
            log.warning("final evaluation: trial %s (rank %d) has no saved student; skipped", trial.trial_id, rank)
            continue
        try:
            metrics = evaluate_trial(cfg, trial, data, device)
        except Exception as exc:  # the search's own records are already written; one bad trial must not lose them
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("final evaluation: trial %s (rank %d) failed: %s", trial.trial_id, rank, reason)
            continue
        results.append(FinalEvalResult(trial.trial_id, rank, trial.metric(s.metric), metrics))
        run_id = child_run_id(client, experiment_id, parent_run_id, trial.trial_id)
        if run_id is None:
            log.warning("final evaluation: no MLflow child run for trial %s", trial.trial_id)
        else:
            tracking.log_metrics(client, run_id, metrics, step=trial.epochs)
        print(f"final evaluation, rank {rank} (trial {trial.trial_id}, {s.metric} {trial.metric(s.metric):.4f}): "
              + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("_acc") or "w_robust" in k),
              flush=True)

    path = Path(folder) / FINAL_EVAL_CSV
    write_csv(results, path, s.metric)
    tracking.log_artifacts(client, parent_run_id, [path])
    top = next((r for r in results if r.rank == 1), None)
    if top is not None:
        tracking.log_metrics(client, parent_run_id,
                             {f"top1_{k}": v for k, v in top.metrics.items() if k.startswith("test_")}, step=0)
    return results


def write_csv(results: list[FinalEvalResult], path: Path, val_metric: str) -> None:
    metric_keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "rank", val_metric] + metric_keys)
        for r in results:
            row: list[Any] = [r.trial_id, r.rank, r.val_metric] + [r.metrics.get(k, "") for k in metric_keys]
            writer.writerow(row)
