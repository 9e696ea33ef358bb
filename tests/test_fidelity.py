"""ASHA's fidelity: each rung's rank correlation with the final values, on hand-computed cases
(docs/sensitivity.md, "ASHA's fidelity"). The end-to-end record is checked on a real search in test_budget.py."""

from __future__ import annotations

import math

import pytest

from tune_mtard.config import load_config
from tune_mtard.search.fidelity import asha_fidelity, spearman, value_at


def test_spearman_is_the_rank_correlation_with_average_ranks_for_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [0.5, 0.5, 2] against [0, 1, 2]: Pearson of those ranks = 0.866
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_a_rungs_value_is_the_first_report_at_or_after_it():
    assert value_at({2: 0.1, 4: 0.3}, 3) == 0.3
    assert value_at({3: 0.2, 4: 0.3}, 3) == 0.2
    assert value_at({1: 0.2}, 3) is None


def digits_config():
    return load_config("digits.yaml", check_files=False)  # ASHA: grace 3, reduction 3, 30 epochs: rungs 3, 9, 27


def test_a_rung_whose_ranks_reversed_at_the_end_is_named_in_a_plain_sentence():
    histories = {  # four trials reached the last rung (27); rung 3's order is the reverse of the final one
        "a": {3: 0.9, 9: 0.1, 27: 0.1, 30: 0.1},
        "b": {3: 0.8, 9: 0.2, 27: 0.2, 30: 0.2},
        "c": {3: 0.7, 9: 0.3, 27: 0.3},
        "d": {3: 0.6, 9: 0.4, 27: 0.4, 30: 0.5},
        "e": {3: 0.1},  # stopped at the first rung: not among those compared
    }
    record = asha_fidelity(histories, digits_config())
    assert record["rungs"] == [3, 9, 27] and record["n_trials"] == 4
    assert record["spearman"]["3"] == pytest.approx(-1.0)
    assert record["spearman"]["9"] == pytest.approx(1.0)
    assert record["sentence"] == ("Rung 3 ranks did not predict final ranks (Spearman -1.00 over 4 trials); "
                                  "raise grace_period.")


def test_early_ranks_that_held_say_so_and_too_few_trials_give_no_number():
    held = {t: {3: v, 9: v, 27: v} for t, v in (("a", 0.1), ("b", 0.2), ("c", 0.3))}
    record = asha_fidelity(held, digits_config())
    assert record["spearman"] == {"3": pytest.approx(1.0), "9": pytest.approx(1.0)}
    assert record["sentence"].startswith("Early ranks predicted final ranks")
    few = asha_fidelity({"a": {3: 0.1, 27: 0.2}, "b": {3: 0.3}}, digits_config())
    assert few["spearman"] == {} and "too few" in few["sentence"]


def test_a_search_without_asha_or_without_a_rung_below_its_epochs_has_no_fidelity():
    cfg = load_config("digits.yaml", ["search.scheduler.type=fifo"], check_files=False)
    assert asha_fidelity({"a": {30: 0.5}}, cfg) is None
    short = load_config("digits.yaml", ["train.epochs=3", "search.scheduler.grace_period=10"], check_files=False)
    assert asha_fidelity({"a": {3: 0.5}}, short) is None
