"""Balance diagnostics (docs/sensitivity.md, "Balance diagnostics"): crafted traces raise exactly the
documented flags and nothing else; methods without a quantity, or whose balancer does not move, get none."""

from __future__ import annotations

import math

import pytest
import torch

from tune_mtard.config import from_dict, load_config
from tune_mtard.diagnostics import (
    Diagnostician,
    csv_values,
    diagnose,
    diagnose_epochs,
    entropy_gaps,
    flag_counts,
    flag_tags,
    trace_columns,
)
from tune_mtard.errors import ConfigError
from tune_mtard.metrics import TRACE_HEADER

STEPS = 4  # steps per epoch of the crafted traces


def config(**values):
    """The default config (tau in [1, 10], thresholds at their defaults) with dotted keys set."""
    raw: dict = {}
    for key, value in values.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return from_dict(raw, check_files=False)


def trace(epochs: int, **columns) -> dict[str, list[float]]:
    """A trace of ``epochs`` epochs of STEPS steps; each column a constant or a function of (epoch, step)."""
    defaults = dict(loss_adv=0.2, loss_nat=0.2, entropy_adv=-0.10, entropy_nat=-0.10,
                    tau_adv=lambda e, s: 1.0 + 0.01 * (e * STEPS + s), tau_nat=1.0,
                    w_adv=lambda e, s: 0.5 + 0.001 * s, w_nat=lambda e, s: 0.5 - 0.001 * s)
    defaults.update(columns)
    out: dict[str, list[float]] = {name: [] for name in TRACE_HEADER}
    for e in range(1, epochs + 1):
        for s in range(STEPS):
            out["step"].append((e - 1) * STEPS + s + 1)
            out["epoch"].append(e)
            for name in TRACE_HEADER[2:]:
                value = defaults[name]
                out[name].append(float(value(e, s) if callable(value) else value))
    return out


def by_epoch(values: dict[int, float]):
    return lambda e, s: values[e]


def flags(d) -> tuple:
    return d.entropy_gap_persists, d.loss_dominates


def test_entropy_gap_is_the_absolute_difference_of_the_epoch_mean_entropies():
    # entropy_adv alternates -0.30 / -0.10 within an epoch (mean -0.20); entropy_nat is -0.05 then -0.15.
    t = trace(2, entropy_adv=lambda e, s: -0.30 if s % 2 else -0.10, entropy_nat=by_epoch({1: -0.05, 2: -0.15}))
    assert entropy_gaps(t) == pytest.approx({1: 0.15, 2: 0.05})
    assert [d.entropy_gap for d in diagnose_epochs(t, config())] == pytest.approx([0.15, 0.05])


def test_a_balanced_trace_raises_no_flag():
    # The gap halves every epoch while tau_adv moves inside its range; the weights stay near 0.5.
    t = trace(4, entropy_adv=by_epoch({1: -0.20, 2: -0.15, 3: -0.125, 4: -0.1125}), entropy_nat=-0.10)
    assert [flags(d) for d in diagnose_epochs(t, config())] == [(None, False), (False, False),
                                                                 (False, False), (False, False)]
    assert diagnose(t, config()).tags() == {}


def softer_robust_teacher(epochs: int = 3, **columns):
    """The robust teacher's soft labels stay softer (its tau pinned at tau_min = 1, where the balancer pushes
    it), the gap does not narrow; tau_nat rises freely."""
    base = dict(entropy_adv=-0.20, entropy_nat=-0.10, tau_adv=1.0,
                tau_nat=lambda e, s: 1.0 + 0.01 * (e * STEPS + s))
    return trace(epochs, **{**base, **columns})


def test_a_gap_that_persists_while_the_softer_teachers_temperature_sits_at_tau_min_is_flagged():
    diagnoses = diagnose_epochs(softer_robust_teacher(), config())
    assert [flags(d) for d in diagnoses] == [(None, False), (True, False), (True, False)]
    assert diagnoses[-1].held_at_bound == ("tau_adv at tau_min",)
    assert diagnoses[-1].tags() == {"entropy_gap_persists": "true"}
    assert diagnoses[-1].metrics() == {"entropy_gap": pytest.approx(0.1), "entropy_gap_persists": 1.0,
                                       "loss_dominates": 0.0}


def test_a_gap_that_persists_while_the_sharper_teachers_temperature_sits_at_tau_max_is_flagged():
    # tau in [0.5, 10]: the clean teacher (softer) has tau_nat free at 0.8, the robust one is pinned at 10.
    t = trace(3, entropy_adv=-0.05, entropy_nat=-0.12, tau_adv=10.0, tau_nat=lambda e, s: 0.8 + 0.001 * s)
    d = diagnose(t, config(**{"balance.tau_min": 0.5, "balance.tau_init": 1.0}))
    assert flags(d) == (True, False)
    assert d.held_at_bound == ("tau_adv at tau_max",)


def test_a_temperature_at_a_bound_it_is_pushed_away_from_raises_nothing():
    # tau_adv sits at tau_max, but the robust teacher is the softer one: the balancer lowers tau_adv.
    t = softer_robust_teacher(tau_adv=10.0)
    assert flags(diagnose(t, config())) == (False, False)


def test_a_persisting_gap_with_both_temperatures_inside_the_range_raises_nothing():
    # tau_lr is the limit here, not the range: no temperature sits at a bound.
    t = softer_robust_teacher(tau_adv=lambda e, s: 3.0 - 0.01 * (e * STEPS + s))
    assert flags(diagnose(t, config(**{"balance.tau_min": 0.5}))) == (False, False)


def test_a_gap_that_narrowed_enough_raises_nothing_and_the_narrowing_threshold_is_the_config_key():
    t = softer_robust_teacher(entropy_adv=by_epoch({1: -0.20, 2: -0.16, 3: -0.14}))  # gap 0.10 -> 0.04
    assert flags(diagnose(t, config())) == (False, False)  # 0.04 <= 0.5 * 0.10
    assert flags(diagnose(t, config(**{"diagnostics.gap_narrowing": 0.3}))) == (True, False)


def test_a_gap_within_the_tolerance_counts_as_closed():
    # A tiny gap from the start never halves, but it is 2% of the entropies: closed.
    t = softer_robust_teacher(entropy_adv=-0.102, entropy_nat=-0.100)
    assert flags(diagnose(t, config())) == (False, False)
    assert flags(diagnose(t, config(**{"diagnostics.gap_tolerance": 0.01}))) == (True, False)


def test_one_loss_weight_above_the_threshold_for_the_whole_last_epoch_is_flagged():
    t = trace(2, w_adv=lambda e, s: (0.7 if e == 1 else 0.93) + 0.01 * s,
              w_nat=lambda e, s: (0.3 if e == 1 else 0.07) - 0.01 * s)
    diagnoses = diagnose_epochs(t, config())
    assert [d.loss_dominates for d in diagnoses] == [False, True]
    assert diagnoses[-1].dominant_loss == "loss_adv"
    assert diagnoses[-1].tags() == {"loss_dominates": "true"}


def test_a_weight_that_dipped_below_the_threshold_once_in_the_epoch_is_not_dominating():
    t = trace(1, w_nat=lambda e, s: 0.89 if s == 2 else 0.95, w_adv=lambda e, s: 0.11 if s == 2 else 0.05)
    assert diagnose(t, config()).loss_dominates is False
    d = diagnose(t, config(**{"diagnostics.dominant_weight": 0.85}))
    assert (d.loss_dominates, d.dominant_loss) == (True, "loss_nat")


@pytest.mark.parametrize("method, columns", [
    ("pgd-at: fixed weights 1 / 0, no teachers", dict(
        w_adv=1.0, w_nat=0.0, entropy_adv=math.nan, entropy_nat=math.nan, tau_adv=math.nan, tau_nat=math.nan)),
    ("ard: one teacher, fixed temperature and weights", dict(
        w_adv=5 / 6, w_nat=1 / 6, entropy_adv=math.nan, entropy_nat=math.nan, tau_adv=30.0, tau_nat=math.nan)),
    ("b-mtard with both balancers off", dict(entropy_adv=-0.2, entropy_nat=-0.1, tau_adv=1.0, tau_nat=1.0,
                                             w_adv=0.5, w_nat=0.5)),
    ("fixed temperatures (mtard), weights missing", dict(entropy_adv=-0.2, tau_adv=1.0, tau_nat=1.0,
                                                       w_adv=math.nan, w_nat=math.nan)),
])
def test_no_flag_where_the_trace_lacks_a_column_or_the_balancer_does_not_move(method, columns):
    d = diagnose(trace(3, **columns), config())
    assert flags(d) == (None, None), method
    assert d.tags() == {}
    assert set(d.metrics()) == {"entropy_gap"}


def test_nan_entropies_give_a_nan_gap_and_no_gap_flag_while_the_weights_are_still_judged():
    t = trace(3, entropy_adv=math.nan, entropy_nat=math.nan, w_adv=lambda e, s: 0.95 + 0.001 * s,
              w_nat=lambda e, s: 0.05 - 0.001 * s)
    d = diagnose(t, config())
    assert math.isnan(d.entropy_gap)
    assert flags(d) == (None, True)


def test_a_tensor_trace_gives_the_same_diagnosis_as_its_columns():
    columns = softer_robust_teacher()
    tensor = torch.tensor([[columns[name][i] for name in TRACE_HEADER] for i in range(len(columns["step"]))],
                          dtype=torch.float64)
    assert trace_columns(tensor) == columns
    assert diagnose(tensor, config()) == diagnose(columns, config())
    assert diagnose(torch.empty(0, len(TRACE_HEADER)), config()).epoch == 0


def test_diagnosing_epoch_by_epoch_reads_each_row_once_and_judges_as_the_whole_trace_does():
    """A trial's diagnostician sees the trace grow by an epoch at a time; each epoch's diagnosis equals the one
    the whole trace up to that epoch gives (the first epoch's gap and the balancers' first moves are kept)."""
    for columns, cfg in ((softer_robust_teacher(), config()),
                         (trace(4, tau_adv=1.0, w_adv=lambda e, s: 0.95 if e else 0.5,
                                w_nat=lambda e, s: 0.05 if e else 0.5), config())):
        tensor = torch.tensor([[columns[name][i] for name in TRACE_HEADER] for i in range(len(columns["step"]))],
                              dtype=torch.float64)
        diagnostician = Diagnostician(cfg)
        for end in range(STEPS, len(tensor) + 1, STEPS):
            assert diagnostician.latest(tensor[:end]) == diagnose(tensor[:end], cfg)
            assert diagnostician.seen == end
        assert diagnostician.latest(tensor) == diagnose(tensor, cfg)  # no new rows: the same, nothing re-read
        assert [d.epoch for d in Diagnostician(cfg).update(columns)] == [d.epoch for d in diagnose_epochs(tensor, cfg)]


def test_reported_metrics_become_tags_csv_cells_and_summary_counts():
    raised = {"entropy_gap": 0.1, "entropy_gap_persists": 1.0, "loss_dominates": 0.0}
    dominated = {"entropy_gap": float("nan"), "loss_dominates": 1.0}
    nothing = {"val_w_robust_acc": 0.5}
    assert flag_tags(raised) == {"entropy_gap_persists": "true"}
    assert flag_tags(nothing) == {}
    assert csv_values(raised) == {"entropy_gap": "0.1", "entropy_gap_persists": "true", "loss_dominates": "false"}
    assert csv_values(dominated) == {"entropy_gap": "", "entropy_gap_persists": "", "loss_dominates": "true"}
    assert flag_counts([raised, dominated, nothing]) == {"n_entropy_gap_persists": 1, "n_loss_dominates": 1}


def test_the_thresholds_are_config_keys_with_documented_defaults_and_validated():
    d = config().diagnostics
    assert (d.gap_narrowing, d.gap_tolerance, d.dominant_weight) == (0.5, 0.05, 0.9)
    for key, bad in (("gap_narrowing", 0), ("gap_tolerance", 1.0), ("dominant_weight", 1.0),
                     ("dominant_weight", 0.5)):
        with pytest.raises(ConfigError) as error:
            config(**{f"diagnostics.{key}": bad})
        assert error.value.key == f"diagnostics.{key}"


def test_a_real_run_reports_the_gap_of_its_logged_epoch_entropies(tiny_config, tiny_digits, tiny_teachers):
    from tune_mtard.engine import Trainer

    trainer = Trainer(tiny_config, tiny_digits, tiny_teachers)
    history = trainer.fit()
    diagnoses = diagnose_epochs(trainer.trace, tiny_config)
    assert [d.epoch for d in diagnoses] == [1, 2]
    for d, metrics in zip(diagnoses, history, strict=False):
        assert d.entropy_gap == pytest.approx(abs(metrics["entropy_adv"] - metrics["entropy_nat"]), rel=1e-6)
    assert diagnoses[0].entropy_gap_persists is None and diagnoses[1].entropy_gap_persists is not None


def test_diagnostics_keys_can_be_set_from_the_command_line_syntax(tiny_config_path):
    cfg = load_config(tiny_config_path, ["diagnostics.dominant_weight=0.95"], check_files=False)
    assert cfg.diagnostics.dominant_weight == 0.95
