"""Balance diagnostics: the paper's failure signatures read off a run's balance trace (docs/sensitivity.md,
"Balance diagnostics").

Per epoch E of the trace (thresholds under ``diagnostics.*``):

- ``entropy_gap``: ``|entropy_adv - entropy_nat|``, both the epoch's mean over its steps, in the trace's
  units (mean over classes of p log(p + 1e-5)). These are the epoch's ``entropy_adv`` / ``entropy_nat``
  metrics; one step's entropies are one batch's and too noisy to judge a trend by.
- ``entropy_gap_persists`` (Entropy-Based Balance is held back by the temperature range), from epoch 2 on:
  the gap has not narrowed (``gap_E > gap_narrowing * gap_1``), is not closed
  (``gap_E > gap_tolerance * max(|entropy_adv|, |entropy_nat|)``), and at the end of the epoch a temperature
  sits at the bound the balancer pushes it against: the softer teacher's (lower mean p log p) at
  ``balance.tau_min``, or the sharper teacher's at ``balance.tau_max``.
- ``loss_dominates`` (Normalization Loss Balance is not balancing): the same loss weight, ``w_adv`` or
  ``w_nat``, is above ``dominant_weight`` at every step of the epoch.

A flag judges a balancer only where the trace shows one at work: a flag is None (not judged) when a column
it needs is NaN (the method has no such quantity) or when the temperatures (weights) have not changed since
the first step (fixed by the method, or the balancer is off).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tune_mtard.config import Config
from tune_mtard.metrics import DIAGNOSTIC_FLAGS, ENTROPY_GAP, EPOCH, FLAG_COUNT, TRACE_HEADER

_BOUND_TOLERANCE = 1e-6  # relative: the trace holds float32 temperatures, the config float64 bounds


@dataclass(frozen=True)
class Diagnosis:
    """The diagnostics of one epoch. A flag is True (raised), False (checked, not raised) or None (not judged)."""

    epoch: int
    entropy_gap: float = math.nan
    entropy_gap_persists: bool | None = None
    loss_dominates: bool | None = None
    held_at_bound: tuple[str, ...] = ()  # when entropy_gap_persists: e.g. "tau_nat at tau_min"
    dominant_loss: str | None = None  # when loss_dominates: "loss_adv" or "loss_nat"

    def metrics(self) -> dict[str, float]:
        """For ``tune.report`` and MLflow (``step`` = epoch): the gap (NaN without entropies) and each judged
        flag as 1.0 or 0.0."""
        out = {ENTROPY_GAP: self.entropy_gap}
        for name in DIAGNOSTIC_FLAGS:
            flag = getattr(self, name)
            if flag is not None:
                out[name] = float(flag)
        return out

    def tags(self) -> dict[str, str]:
        """MLflow tags of the raised flags, ``{"loss_dominates": "true"}``; none for the others."""
        return {name: "true" for name in DIAGNOSTIC_FLAGS if getattr(self, name)}


def trace_columns(trace: Any) -> dict[str, list[float]]:
    """The columns of a trace by :data:`TRACE_HEADER` name, from a dict of columns (``read_trace``) or a
    float tensor or array with one row per step (the trainer's ``(steps, len(TRACE_HEADER))`` tensor)."""
    if isinstance(trace, Mapping):
        return {name: [float(v) for v in trace[name]] for name in TRACE_HEADER}
    return dict(zip(TRACE_HEADER, trace.T.tolist(), strict=True))


def epoch_spans(columns: Mapping[str, Sequence[float]]) -> dict[int, range]:
    """Each epoch's rows, in order (a trace holds an epoch's steps together)."""
    spans: dict[int, list[int]] = {}
    for i, epoch in enumerate(columns[EPOCH]):
        spans.setdefault(int(epoch), [i, i])[1] = i
    return {epoch: range(first, last + 1) for epoch, (first, last) in spans.items()}


def _mean(values: Sequence[float], rows: range) -> float:
    return math.fsum(values[i] for i in rows) / len(rows)


def _gap(columns: Mapping[str, Sequence[float]], rows: range) -> float:
    return abs(_mean(columns["entropy_adv"], rows) - _mean(columns["entropy_nat"], rows))


def entropy_gaps(trace: Any) -> dict[int, float]:
    """``entropy_gap`` of every epoch of the trace (NaN for a method without teacher entropies)."""
    columns = trace_columns(trace)
    return {epoch: _gap(columns, rows) for epoch, rows in epoch_spans(columns).items()}


BALANCER_COLUMNS = ("tau_adv", "tau_nat", "w_adv", "w_nat")


class Diagnostician:
    """Diagnoses a trace's epochs as they end, reading each row once: :meth:`update` with the trace so far
    judges only the rows added since the last call, keeping what the judgement needs of the earlier ones
    (the first epoch's gap, the first row's balancer values and whether each has moved since). A trial calls
    it at every epoch, so its cost over a trial is linear in the trace, not quadratic."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.seen = 0  # rows of the trace already judged
        self.first_epoch: int | None = None
        self.first_gap = math.nan
        self.first_values: dict[str, float] = {}
        self.moved = dict.fromkeys(BALANCER_COLUMNS, False)  # changed from the first row by the last epoch's end
        self.last = Diagnosis(epoch=0)  # the latest epoch's diagnosis

    def latest(self, trace: Any) -> Diagnosis:
        """The diagnosis of the trace's last epoch, judging only the rows added since the last call."""
        self.update(trace)
        return self.last

    def update(self, trace: Any) -> list[Diagnosis]:
        """The diagnosis of every epoch the trace holds past the rows already judged (whole epochs, in order)."""
        if isinstance(trace, Mapping):
            columns = {name: [float(v) for v in trace[name][self.seen:]] for name in TRACE_HEADER}
        else:
            columns = trace_columns(trace[self.seen:])
        self.seen += len(columns[EPOCH])
        found = []
        for epoch, rows in epoch_spans(columns).items():
            if self.first_epoch is None:
                self.first_epoch, self.first_gap = epoch, _gap(columns, rows)
                self.first_values = {name: columns[name][rows[0]] for name in BALANCER_COLUMNS}
            for name in BALANCER_COLUMNS:
                self.moved[name] = self.moved[name] or any(columns[name][i] != self.first_values[name] for i in rows)
            found.append(self._judge(columns, epoch, rows))
        self.last = found[-1] if found else self.last
        return found

    def _judge(self, columns: Mapping[str, Sequence[float]], epoch: int, rows: range) -> Diagnosis:
        gap = _gap(columns, rows)
        persists, held = _gap_persists(columns, rows, gap, self.first_gap, epoch == self.first_epoch,
                                       self.moved["tau_adv"] or self.moved["tau_nat"], self.cfg)
        dominates, dominant = _loss_dominates(columns, rows, self.moved["w_adv"] or self.moved["w_nat"],
                                              self.cfg.diagnostics.dominant_weight)
        return Diagnosis(epoch=epoch, entropy_gap=gap, entropy_gap_persists=persists, loss_dominates=dominates,
                         held_at_bound=held, dominant_loss=dominant)


def diagnose(trace: Any, cfg: Config) -> Diagnosis:
    """The diagnostics of the trace's last epoch: what a trial reports with that epoch's metrics."""
    return Diagnostician(cfg).latest(trace)


def diagnose_epochs(trace: Any, cfg: Config) -> list[Diagnosis]:
    """The diagnostics of every epoch, each judged on the trace up to its end (as it was at that report)."""
    return Diagnostician(cfg).update(trace)


def _gap_persists(columns: Mapping[str, Sequence[float]], rows: range, gap: float, first_gap: float,
                  first_epoch: bool, moved: bool, cfg: Config) -> tuple[bool | None, tuple[str, ...]]:
    tau = {name: columns[name][rows[-1]] for name in ("tau_adv", "tau_nat")}
    if first_epoch or not moved or any(math.isnan(v) for v in (gap, first_gap, *tau.values())):
        return None, ()
    d = cfg.diagnostics
    entropy_adv, entropy_nat = _mean(columns["entropy_adv"], rows), _mean(columns["entropy_nat"], rows)
    closed = gap <= d.gap_tolerance * max(abs(entropy_adv), abs(entropy_nat))
    if closed or gap <= d.gap_narrowing * first_gap:
        return False, ()
    # The balancer lowers the softer teacher's temperature (sharpens it) and raises the sharper one's.
    softer, sharper = ("tau_adv", "tau_nat") if entropy_adv < entropy_nat else ("tau_nat", "tau_adv")
    b = cfg.balance
    held = tuple(f"{name} at {bound}" for name, bound, value in ((softer, "tau_min", b.tau_min),
                                                                 (sharper, "tau_max", b.tau_max))
                 if abs(tau[name] - value) <= _BOUND_TOLERANCE * max(1.0, abs(value)))
    return bool(held), held


def _loss_dominates(columns: Mapping[str, Sequence[float]], rows: range, moved: bool,
                    threshold: float) -> tuple[bool | None, str | None]:
    """Whether one weight stayed above ``threshold`` all epoch, and whose loss it weighs."""
    weights = {"loss_adv": columns["w_adv"], "loss_nat": columns["w_nat"]}
    if any(math.isnan(w[i]) for w in weights.values() for i in rows) or not moved:
        return None, None
    for loss, w in weights.items():
        if all(w[i] > threshold for i in rows):
            return True, loss
    return False, None


def _flag(metrics: Mapping[str, Any], name: str) -> bool | None:
    value = metrics.get(name)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(float(value))


def flag_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The tags of the flags raised in a trial's reported metrics (its last report: how the trial ended)."""
    return {name: "true" for name in DIAGNOSTIC_FLAGS if _flag(metrics, name)}


def csv_values(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The ``trials.csv`` cells of :data:`~tune_mtard.metrics.DIAGNOSTICS`, in that order, from a trial's
    reported metrics: the gap, each flag ``true`` / ``false``, and empty where there is no value or the flag
    was not judged."""
    gap = metrics.get(ENTROPY_GAP)
    flags = {name: _flag(metrics, name) for name in DIAGNOSTIC_FLAGS}
    return {ENTROPY_GAP: "" if gap is None or math.isnan(float(gap)) else repr(float(gap)),
            **{name: "" if flag is None else str(flag).lower() for name, flag in flags.items()}}


def flag_counts(trial_metrics: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``summary.json`` counts, ``{"n_entropy_gap_persists": k, "n_loss_dominates": m}``: the trials (one
    reported-metrics mapping each, their last report) that ended with the flag raised."""
    counts = {FLAG_COUNT.format(name): 0 for name in DIAGNOSTIC_FLAGS}
    for metrics in trial_metrics:
        for name in DIAGNOSTIC_FLAGS:
            counts[FLAG_COUNT.format(name)] += bool(_flag(metrics, name))
    return counts
