"""The balancers follow docs/algorithm.md, steps 4 and 5, on cases computed by hand."""

import math

import pytest
import torch

from tune_mtard.balance import EntropyBalance, LossBalance, mean_plogp


def pair(values):
    return tuple(float(v) for v in values)


def test_entropy_balance_cools_the_higher_entropy_teacher_and_warms_the_other():
    eb = EntropyBalance(lr=0.1, tau_min=1.0, tau_max=2.0, tau_init=1.5)
    # e_adv / e_nat - 1 = 1 > 0: tau_adv goes down; e_nat / e_adv - 1 = -0.5 < 0: tau_nat goes up
    assert pair(eb.update(-2.0, -1.0)) == pytest.approx((1.4, 1.6))
    assert pair(eb.update(-1.0, -4.0)) == pytest.approx((1.5, 1.5))


def test_entropy_balance_leaves_equal_entropies_alone():
    eb = EntropyBalance(lr=0.1, tau_min=1.0, tau_max=2.0, tau_init=1.5)
    assert pair(eb.update(-0.7, -0.7)) == pytest.approx((1.5, 1.5))


def test_entropy_balance_clips_at_both_bounds():
    eb = EntropyBalance(lr=0.1, tau_min=1.0, tau_max=2.0, tau_init=1.0)
    assert pair(eb.update(-2.0, -1.0)) == pytest.approx((1.0, 1.1))  # tau_adv held at tau_min
    eb = EntropyBalance(lr=0.1, tau_min=1.0, tau_max=2.0, tau_init=2.0)
    assert pair(eb.update(-1.0, -2.0)) == pytest.approx((2.0, 1.9))  # tau_adv held at tau_max


def test_entropy_balance_starts_from_tau_init_clipped_into_the_bounds():
    assert float(EntropyBalance(lr=0.1, tau_min=1.0, tau_max=2.0, tau_init=5.0).tau_adv) == 2.0
    assert float(EntropyBalance(lr=0.1, tau_min=1.0, tau_max=2.0, tau_init=0.1).tau_nat) == 1.0


def test_entropy_balance_rejects_tau_min_above_tau_max():
    with pytest.raises(ValueError):
        EntropyBalance(lr=0.1, tau_min=3.0, tau_max=2.0, tau_init=2.0)


def test_entropy_balance_step_follows_its_settable_lr():
    eb = EntropyBalance(lr=0.1, tau_min=1.0, tau_max=10.0, tau_init=5.0)
    eb.lr = 0.01  # what a learning-rate milestone does
    assert pair(eb.update(-2.0, -1.0)) == pytest.approx((4.99, 5.01))


def test_entropy_balance_accepts_tensors_and_returns_values_float_accepts():
    eb = EntropyBalance(lr=0.5, tau_min=1.0, tau_max=10.0, tau_init=2.0)
    tau_adv, tau_nat = eb.update(torch.tensor(-3.0), torch.tensor(-1.0))
    assert (float(tau_adv), float(tau_nat)) == pytest.approx((1.5, 2.5))


def test_loss_balance_first_step_sets_l0_and_keeps_equal_weights():
    lb = LossBalance(lr=0.5, beta=2.0)
    assert pair(lb.update(2.0, 1.0)) == pytest.approx((0.5, 0.5))
    assert lb.state_dict()["loss_adv_0"] == pytest.approx(2.0)
    assert lb.state_dict()["loss_nat_0"] == pytest.approx(1.0)


def test_loss_balance_moves_weights_towards_relative_losses_to_the_power_beta():
    lb = LossBalance(lr=0.5, beta=2.0)
    lb.update(2.0, 1.0)
    # r_adv = (1/2)^2 = 0.25, r_nat = 1; targets 0.2 / 0.8; w = 0.5 - 0.5 * (0.5 - target)
    assert pair(lb.update(1.0, 1.0)) == pytest.approx((0.35, 0.65))
    # r_adv = (0.5/2)^2 = 1/16, r_nat = (0.5/1)^2 = 1/4; targets 0.2 / 0.8
    assert pair(lb.update(0.5, 0.5)) == pytest.approx((0.35 - 0.5 * 0.15, 0.65 + 0.5 * 0.15))


def test_loss_balance_with_beta_one_uses_plain_ratios():
    lb = LossBalance(lr=1.0, beta=1.0)
    lb.update(1.0, 1.0)
    assert pair(lb.update(0.25, 0.75)) == pytest.approx((0.25, 0.75))


def test_loss_balance_clips_a_negative_weight_at_zero_and_renormalises():
    lb = LossBalance(lr=1.5, beta=1.0)
    lb.update(1.0, 1.0)
    # target_adv = 0.001/1.001; w_adv = 0.5 - 1.5*(0.5 - 0.000999) < 0 -> 0; w_nat > 1 -> renormalised to 1
    w_adv, w_nat = pair(lb.update(0.001, 1.0))
    assert w_adv == 0.0
    assert w_nat == pytest.approx(1.0)


def test_loss_balance_weights_always_sum_to_one():
    lb = LossBalance(lr=0.3, beta=1.7)
    for loss_adv, loss_nat in [(2.0, 1.0), (1.5, 0.4), (1.9, 0.2), (0.3, 0.9)]:
        w_adv, w_nat = pair(lb.update(loss_adv, loss_nat))
        assert w_adv + w_nat == pytest.approx(1.0)
        assert w_adv >= 0 and w_nat >= 0


def test_loss_balance_state_dict_round_trip_keeps_l0_and_continues_identically():
    lb = LossBalance(lr=0.2, beta=1.5)
    for losses in [(2.0, 1.0), (1.5, 0.9), (1.2, 0.8)]:
        lb.update(*losses)
    lb.lr = 0.02
    restored = LossBalance(lr=0.9, beta=9.0)
    restored.load_state_dict(lb.state_dict())
    assert restored.state_dict() == lb.state_dict()
    assert restored.lr == 0.02 and restored.beta == 1.5
    assert pair(restored.update(1.0, 0.7)) == pair(lb.update(1.0, 0.7))


def test_entropy_balance_state_dict_round_trip():
    eb = EntropyBalance(lr=0.1, tau_min=1.0, tau_max=5.0, tau_init=2.0)
    eb.update(-2.0, -1.0)
    restored = EntropyBalance(lr=0.5, tau_min=1.0, tau_max=9.0, tau_init=1.0)
    restored.load_state_dict(eb.state_dict())
    assert restored.state_dict() == eb.state_dict()
    assert pair(restored.update(-1.0, -3.0)) == pair(eb.update(-1.0, -3.0))


def test_mean_plogp_matches_the_hand_computed_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    expected = (0.25 * math.log(0.25 + 1e-5) + 0.75 * math.log(0.75 + 1e-5)) / 2
    assert float(mean_plogp(logits, 1.0)) == pytest.approx(expected, rel=1e-6)
    # a higher temperature flattens p: more entropy, a more negative value
    assert float(mean_plogp(logits, 4.0)) < float(mean_plogp(logits, 1.0))
