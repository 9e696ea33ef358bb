"""Specification of the training loop (tune_mtard.engine.Trainer) against docs/algorithm.md and docs/search.md, on
tiny digits runs."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tune_mtard.config import Config
from tune_mtard.engine import EpochResult, Trainer, lr_scale
from tune_mtard.methods import METHODS
from tune_mtard.metrics import TRACE_HEADER
from tune_mtard.trace import write_trace

CPU = torch.device("cpu")
SPEC_TRACE_HEADER = "step,epoch,loss_adv,loss_nat,entropy_adv,entropy_nat,tau_adv,tau_nat,w_adv,w_nat"
COLUMN = {name: i for i, name in enumerate(SPEC_TRACE_HEADER.split(","))}
SPEC_EPOCH_METRICS = {"val_clean_acc", "val_robust_acc", "val_w_robust_acc", "loss_adv", "loss_nat", "entropy_adv",
                      "entropy_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "epoch_time_s"}
TOLERANCE = 1e-5

# Three epochs with one milestone inside (round(0.6 * 3) = 2: the third epoch runs at lr_gamma), temperature bounds
# that the trace reaches, and beta / weight_lr far from their defaults so every term of the updates shows.
BALANCED_RUN = {
    "train.epochs": 3, "train.lr_milestones": [0.6], "train.lr_gamma": 0.5,
    "balance.beta": 2.0, "balance.tau_init": 2.0, "balance.tau_min": 1.95, "balance.tau_max": 2.5,
    "balance.tau_lr": 0.01, "balance.weight_lr": 0.1,
}


def make_trainer(cfg: Config, data, teachers) -> Trainer:
    return Trainer(cfg, data, teachers, device=CPU)


def finished(cfg: Config, data, teachers) -> Trainer:
    trainer = make_trainer(cfg, data, teachers)
    trainer.fit()
    return trainer


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in history]


@pytest.fixture(scope="module")
def balanced_cfg(tiny_config) -> Config:
    return tiny_config.with_values(BALANCED_RUN)


@pytest.fixture(scope="module")
def balanced_run(balanced_cfg, tiny_digits, tiny_teachers) -> Trainer:
    """An uninterrupted 3-epoch B-MTARD run, the reference for the trace and resume checks."""
    return finished(balanced_cfg, tiny_digits, tiny_teachers)


# ---- the balance trace follows docs/algorithm.md step by step -------------------------------------


def expected_tau(tau: float, e_self: float, e_other: float, lr: float, b) -> tuple[float, bool]:
    """Step 4 for one teacher in float64; also whether the sign is too close to call in float32."""
    ratio = e_self / e_other - 1.0
    unclipped = tau - lr * math.copysign(1.0, ratio) * (ratio != 0)
    return min(max(unclipped, b.tau_min), b.tau_max), abs(ratio) < 1e-6


def expected_weights(w_adv: float, w_nat: float, loss_adv: float, loss_nat: float, loss_0: tuple[float, float],
                     lr: float, beta: float) -> tuple[float, float]:
    """Step 5 in float64."""
    r_adv = (loss_adv / loss_0[0]) ** beta
    r_nat = (loss_nat / loss_0[1]) ** beta
    w_adv = max(w_adv - lr * (w_adv - r_adv / (r_adv + r_nat)), 0.0)
    w_nat = max(w_nat - lr * (w_nat - r_nat / (r_adv + r_nat)), 0.0)
    return w_adv / (w_adv + w_nat), w_nat / (w_adv + w_nat)


def test_every_trace_row_follows_the_balance_rules_from_the_row_before(balanced_run, balanced_cfg):
    b, t = balanced_cfg.balance, balanced_cfg.train
    rows = balanced_run.trace.tolist()
    tau = (min(max(b.tau_init, b.tau_min), b.tau_max),) * 2
    w = (0.5, 0.5)
    loss_0 = (rows[0][COLUMN["loss_adv"]], rows[0][COLUMN["loss_nat"]])
    clipped = 0
    for row in rows:
        epoch = int(row[COLUMN["epoch"]])
        scale = t.lr_gamma if epoch == 3 else 1.0
        e_adv, e_nat = row[COLUMN["entropy_adv"]], row[COLUMN["entropy_nat"]]
        tau_adv, close_adv = expected_tau(tau[0], e_adv, e_nat, b.tau_lr * scale, b)
        tau_nat, close_nat = expected_tau(tau[1], e_nat, e_adv, b.tau_lr * scale, b)
        if not close_adv:
            assert row[COLUMN["tau_adv"]] == pytest.approx(tau_adv, abs=TOLERANCE), row
        if not close_nat:
            assert row[COLUMN["tau_nat"]] == pytest.approx(tau_nat, abs=TOLERANCE), row
        clipped += any(abs(v - bound) < TOLERANCE and abs(prev - bound) < TOLERANCE
                       for v, prev in zip((tau_adv, tau_nat), tau, strict=False) for bound in (b.tau_min, b.tau_max))
        w_adv, w_nat = expected_weights(*w, row[COLUMN["loss_adv"]], row[COLUMN["loss_nat"]], loss_0,
                                        b.weight_lr * scale, b.beta)
        assert (row[COLUMN["w_adv"]], row[COLUMN["w_nat"]]) == pytest.approx((w_adv, w_nat), abs=TOLERANCE), row
        assert row[COLUMN["w_adv"]] + row[COLUMN["w_nat"]] == pytest.approx(1.0, abs=TOLERANCE)
        tau = (row[COLUMN["tau_adv"]], row[COLUMN["tau_nat"]])
        w = (row[COLUMN["w_adv"]], row[COLUMN["w_nat"]])
    assert clipped > 0, "the trace never reached a temperature bound: the clipping went unchecked"


def test_balancing_steps_shrink_by_lr_gamma_at_a_milestone(balanced_run, balanced_cfg):
    b, t = balanced_cfg.balance, balanced_cfg.train
    trace = balanced_run.trace
    epochs = trace[:, COLUMN["epoch"]]
    start = torch.full((1, 2), min(max(b.tau_init, b.tau_min), b.tau_max), dtype=torch.float64)
    taus = torch.cat([start, trace[:, [COLUMN["tau_adv"], COLUMN["tau_nat"]]]])
    moves = (taus[1:] - taus[:-1]).abs()
    inside = (taus[1:] > b.tau_min + TOLERANCE) & (taus[1:] < b.tau_max - TOLERANCE)
    before = moves[(epochs < 3)[:, None] & inside & (moves > TOLERANCE)]
    after = moves[(epochs == 3)[:, None] & inside & (moves > TOLERANCE)]
    assert len(before) > 0 and len(after) > 0
    assert before.tolist() == pytest.approx([b.tau_lr] * len(before), abs=TOLERANCE)
    assert after.tolist() == pytest.approx([b.tau_lr * t.lr_gamma] * len(after), abs=TOLERANCE)

    # The weights' steps shrink too: after the milestone, an update at the unscaled weight_lr would not match.
    rows = trace.tolist()
    loss_0 = (rows[0][COLUMN["loss_adv"]], rows[0][COLUMN["loss_nat"]])
    mismatches = [
        abs(expected_weights(prev[COLUMN["w_adv"]], prev[COLUMN["w_nat"]], row[COLUMN["loss_adv"]],
                             row[COLUMN["loss_nat"]], loss_0, b.weight_lr, b.beta)[0] - row[COLUMN["w_adv"]])
        for prev, row in zip(rows, rows[1:], strict=False) if row[COLUMN["epoch"]] == 3
    ]
    assert max(mismatches) > 10 * TOLERANCE


def test_the_balancers_learning_rates_end_at_lr_gamma_after_the_milestone(balanced_run, balanced_cfg):
    b, t = balanced_cfg.balance, balanced_cfg.train
    objective = balanced_run.objective
    assert objective.entropy_balance.lr == pytest.approx(b.tau_lr * t.lr_gamma)
    assert objective.loss_balance.lr == pytest.approx(b.weight_lr * t.lr_gamma)
    assert balanced_run.optimizer.param_groups[0]["lr"] == pytest.approx(t.lr * t.lr_gamma)
    assert [m["lr"] for m in balanced_run.history] == pytest.approx([t.lr, t.lr, t.lr * t.lr_gamma])


def test_the_trace_numbers_steps_one_to_n_and_gives_each_its_epoch(balanced_run, tiny_digits, balanced_cfg):
    steps_per_epoch = math.ceil(len(tiny_digits.train) / balanced_cfg.data.batch_size)
    n = 3 * steps_per_epoch
    trace = balanced_run.trace
    assert trace.shape == (n, len(COLUMN))
    assert trace[:, 0].tolist() == list(range(1, n + 1))
    assert trace[:, 1].tolist() == [1 + i // steps_per_epoch for i in range(n)]
    assert balanced_run.step == n and balanced_run.epoch == 3


def test_the_trace_file_has_exactly_the_spec_header_and_one_row_per_step(balanced_run, tmp_path):
    assert ",".join(TRACE_HEADER) == SPEC_TRACE_HEADER
    path = tmp_path / "balance_trace.csv"
    balanced_run.write_trace(path)
    lines = path.read_text().splitlines()
    assert lines[0] == SPEC_TRACE_HEADER
    rows = list(csv.reader(lines[1:]))
    assert len(rows) == balanced_run.step
    assert [int(r[0]) for r in rows] == list(range(1, balanced_run.step + 1))
    assert torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64).equal(balanced_run.trace)


def test_write_trace_writes_nan_for_columns_a_method_lacks(tmp_path):
    trace = torch.tensor([[1, 1] + [float("nan")] * 4 + [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    write_trace(trace, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "1,1,nan,nan,nan,nan,1.0,1.0,0.0,1.0"


# ---- resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resuming_from_a_saved_trainer_is_bit_identical_to_an_uninterrupted_run(
        stop_after, balanced_run, balanced_cfg, tiny_digits, tiny_teachers, tmp_path):
    interrupted = make_trainer(balanced_cfg, tiny_digits, tiny_teachers)
    for _ in range(stop_after):
        interrupted.train_epoch()
    interrupted.save(tmp_path / "checkpoint.pt")
    torch.manual_seed(12345)  # whatever happened to the global RNG in between must not matter

    resumed = make_trainer(balanced_cfg, tiny_digits, tiny_teachers)
    resumed.load(tmp_path / "checkpoint.pt")
    assert (resumed.epoch, resumed.step) == (interrupted.epoch, interrupted.step)
    resumed.fit()

    expected, actual = balanced_run.student.state_dict(), resumed.student.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert torch.equal(resumed.trace, balanced_run.trace)
    assert without_timing(resumed.history) == without_timing(balanced_run.history)
    assert resumed.objective.state_dict() == balanced_run.objective.state_dict()


def test_a_resumed_run_keeps_the_first_steps_losses_as_l0(balanced_cfg, tiny_digits, tiny_teachers, tmp_path):
    first = make_trainer(balanced_cfg, tiny_digits, tiny_teachers)
    first.train_epoch()
    first.save(tmp_path / "checkpoint.pt")
    resumed = make_trainer(balanced_cfg, tiny_digits, tiny_teachers)
    resumed.load(tmp_path / "checkpoint.pt")
    state = resumed.objective.loss_balance.state_dict()
    assert state["loss_adv_0"] == pytest.approx(float(first.trace[0, COLUMN["loss_adv"]]), rel=1e-6)
    assert state["loss_nat_0"] == pytest.approx(float(first.trace[0, COLUMN["loss_nat"]]), rel=1e-6)


# ---- balancing switched off ----------------------------------------------------------------------


def test_with_entropy_balance_off_both_temperatures_stay_at_tau_init(tiny_config, tiny_digits, tiny_teachers):
    cfg = tiny_config.with_values({"train.epochs": 1, "balance.entropy": False, "balance.tau_init": 3.0,
                                   "balance.tau_lr": 0.1})
    trace = finished(cfg, tiny_digits, tiny_teachers).trace
    assert trace[:, COLUMN["tau_adv"]].eq(3.0).all() and trace[:, COLUMN["tau_nat"]].eq(3.0).all()
    assert not trace[:, COLUMN["w_adv"]].eq(0.5).all()  # the loss balance still runs


def test_with_loss_balance_off_both_weights_stay_at_one_half(tiny_config, tiny_digits, tiny_teachers):
    cfg = tiny_config.with_values({"train.epochs": 1, "balance.loss": False, "balance.weight_lr": 0.5})
    trace = finished(cfg, tiny_digits, tiny_teachers).trace
    assert trace[:, COLUMN["w_adv"]].eq(0.5).all() and trace[:, COLUMN["w_nat"]].eq(0.5).all()
    assert not trace[:, COLUMN["tau_adv"]].eq(1.0).all() or not trace[:, COLUMN["tau_nat"]].eq(1.0).all()


# ---- the learning-rate schedule ------------------------------------------------------------------


def test_lr_milestones_are_fractions_of_the_epochs_and_drop_at_215_260_285_of_300():
    cfg = Config()  # train.epochs 300, milestones [0.7167, 0.8667, 0.95], gamma 0.1
    scales = [lr_scale(cfg, epoch) for epoch in range(300)]
    drops = [epoch for epoch in range(1, 300) if scales[epoch] < scales[epoch - 1]]
    assert drops == [215, 260, 285]
    assert scales[0] == scales[214] == 1.0
    assert scales[215] == pytest.approx(0.1) and scales[259] == pytest.approx(0.1)
    assert scales[260] == pytest.approx(0.01) and scales[285] == pytest.approx(0.001) == scales[299]


def test_lr_milestones_scale_with_the_number_of_epochs():
    cfg = Config().with_values({"train.epochs": 30})
    drops = [e for e in range(1, 30) if lr_scale(cfg, e) < lr_scale(cfg, e - 1)]
    assert drops == [22, 26, 28]  # round(0.7167 * 30), round(0.8667 * 30), round(0.95 * 30)
    assert lr_scale(Config().with_values({"train.lr_milestones": []}), 299) == 1.0


# ---- validation metrics (docs/search.md) ---------------------------------------------------------


def test_each_validation_reports_the_spec_metrics_every_eval_every_epochs(tiny_config, tiny_digits, tiny_teachers):
    cfg = tiny_config.with_values({"train.epochs": 3, "eval.every": 2, "eval.clean_weight": 0.3})
    trainer = make_trainer(cfg, tiny_digits, tiny_teachers)
    results: list[EpochResult] = []
    trainer.fit(lambda t, result: results.append(result))

    assert [r.epoch for r in results] == [1, 2, 3]
    assert results[0].metrics == {"epoch": 1}  # no validation between evaluations
    evaluated = [r for r in results if r.validated]
    assert [r.epoch for r in evaluated] == [2, 3]
    # every 2 epochs, and always after the last one
    assert [len(r.metrics) > 1 for r in results] == [r.validated for r in results]
    assert trainer.history == [r.metrics for r in evaluated]
    steps_per_epoch = trainer.step // 3
    for result in evaluated:
        m = result.metrics
        assert SPEC_EPOCH_METRICS <= m.keys()
        for key in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc"):
            assert 0.0 <= m[key] <= 1.0
        assert m["val_w_robust_acc"] == pytest.approx(0.3 * m["val_clean_acc"] + 0.7 * m["val_robust_acc"])
        rows = trainer.trace[trainer.trace[:, COLUMN["epoch"]] == result.epoch]
        assert len(rows) == steps_per_epoch
        for name in ("loss_adv", "loss_nat", "entropy_adv", "entropy_nat"):
            assert m[name] == pytest.approx(float(rows[:, COLUMN[name]].mean()), rel=1e-6)
        for name in ("tau_adv", "tau_nat", "w_adv", "w_nat"):
            assert m[name] == pytest.approx(float(rows[-1, COLUMN[name]]), rel=1e-6)
        assert m["epoch_time_s"] > 0


def test_validation_uses_the_first_n_validation_examples_and_leaves_training_rng_alone(
        tiny_config, tiny_digits, tiny_teachers):
    trainer = make_trainer(tiny_config, tiny_digits, tiny_teachers)
    state = torch.get_rng_state()
    first = trainer.validate()
    assert torch.equal(torch.get_rng_state(), state)
    assert trainer.validate() == first
    n = tiny_config.eval.n_examples
    assert all(abs(v * n - round(v * n)) < 1e-9 for k, v in first.items() if k != "val_w_robust_acc")


# ---- every method --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_an_epoch_with_finite_losses(method, tiny_config, tiny_digits, tiny_teachers):
    cfg = tiny_config.with_values({"train.epochs": 1, "method": method})
    trainer = make_trainer(cfg, tiny_digits, tiny_teachers)
    x = tiny_digits.train.floats()[:32]
    y = tiny_digits.train.labels[:32]
    loss, row = trainer.objective.step(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert row.shape == (len(COLUMN) - 2,)

    trainer.fit()
    losses = trainer.trace[:, [COLUMN["loss_adv"], COLUMN["loss_nat"]]]
    present = ~losses.isnan().all(0)
    assert present.any(), "the method traces neither loss"
    assert torch.isfinite(losses[:, present]).all()
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    assert SPEC_EPOCH_METRICS <= trainer.history[-1].keys()
