"""Names of the metrics a run reports, in one place (docs/search.md, "Records").

Accuracies are fractions in [0, 1] everywhere. Every validated epoch reports :data:`EPOCH_METRICS` to Ray
Tune and MLflow (``step`` = epoch); ``metrics.json`` of a run holds the final validation metrics and, per
attack of the final test evaluation, :data:`TEST_ACC` and :data:`TEST_W_ROBUST_ACC`.
"""

from __future__ import annotations

EPOCH = "epoch"
VAL_CLEAN_ACC = "val_clean_acc"
VAL_ROBUST_ACC = "val_robust_acc"  # PGD with eval.pgd_steps
VAL_W_ROBUST_ACC = "val_w_robust_acc"
VALIDATION = (VAL_CLEAN_ACC, VAL_ROBUST_ACC, VAL_W_ROBUST_ACC)

# One row of balance_trace.csv per optimiser step: the step's losses and entropies (measured before the
# update), then the temperatures and weights after it (docs/algorithm.md, "Balance trace").
TRACE_COLUMNS = ("loss_adv", "loss_nat", "entropy_adv", "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat")
TRACE_HEADER = ("step", "epoch") + TRACE_COLUMNS
EPOCH_MEANS = TRACE_COLUMNS[:4]  # reported as the epoch's mean
EPOCH_ENDS = TRACE_COLUMNS[4:]  # reported as the epoch's last value

LR = "lr"
EPOCH_TIME_S = "epoch_time_s"
EPOCH_METRICS = VALIDATION + TRACE_COLUMNS + (EPOCH_TIME_S, LR)


def w_robust_acc(clean: float, robust: float, clean_weight: float) -> float:
    """W-Robust Acc = ``clean_weight * clean + (1 - clean_weight) * robust``."""
    return clean_weight * clean + (1.0 - clean_weight) * robust


# Final test evaluation, one pair per attack: TEST_ACC.format("pgd20") == "test_pgd20_acc".
TEST_ACC = "test_{}_acc"
TEST_W_ROBUST_ACC = "test_w_robust_acc_{}"  # W-Robust Acc with that attack as the robust accuracy
TEST_N_EXAMPLES = "test_n_examples"

# Balance diagnostics of a trial (docs/sensitivity.md, "Balance diagnostics"), computed from its trace at
# each report: the entropy gap as a metric, each flag as a 0/1 metric and, when raised, a tag "true".
ENTROPY_GAP = "entropy_gap"
ENTROPY_GAP_PERSISTS = "entropy_gap_persists"
LOSS_DOMINATES = "loss_dominates"
DIAGNOSTIC_FLAGS = (ENTROPY_GAP_PERSISTS, LOSS_DOMINATES)
DIAGNOSTICS = (ENTROPY_GAP,) + DIAGNOSTIC_FLAGS
FLAG_COUNT = "n_{}"  # summary.json: FLAG_COUNT.format("loss_dominates") trials ended with the flag raised
