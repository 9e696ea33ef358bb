"""``balance_trace.csv``: one row per optimiser step, header :data:`~tune_mtard.metrics.TRACE_HEADER`
(docs/algorithm.md, "Balance trace")."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from tune_mtard import atomic
from tune_mtard.metrics import TRACE_HEADER


def write_trace(trace: torch.Tensor, path: str | Path) -> None:
    """Write a ``(steps, len(TRACE_HEADER))`` tensor; step and epoch as integers, ``nan`` where a method has no
    value."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TRACE_HEADER)
        for row in trace.tolist():
            writer.writerow([int(row[0]), int(row[1])] + [_fmt(v) for v in row[2:]])


def read_trace(path: str | Path) -> dict[str, list[float]]:
    """The columns of a trace file, by name."""
    columns: dict[str, list[float]] = {name: [] for name in TRACE_HEADER}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            for name in TRACE_HEADER:
                columns[name].append(float(row[name]))
    return columns


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else repr(value)
