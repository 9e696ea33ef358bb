"""Plots that runs and searches log (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tune_mtard.trace import read_trace


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trace(trace_csv: str | Path, png: str | Path, title: str = "balance trace") -> None:
    """The four balance quantities over optimiser steps: losses, soft-label entropies, temperatures and
    weights, so a diverging or stalled balance shows at a glance."""
    plt = _pyplot()
    columns = read_trace(trace_csv)
    steps = columns["step"]
    panels = (("loss", ("loss_adv", "loss_nat")), ("mean p log p", ("entropy_adv", "entropy_nat")),
              ("temperature", ("tau_adv", "tau_nat")), ("loss weight", ("w_adv", "w_nat")))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 9), sharex=True)
    for ax, (label, names) in zip(axes, panels):
        for name in names:
            ax.plot(steps, columns[name], label=name)
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_clean_vs_robust(points: list[tuple[str, float, float]], path: str | Path,
                         best: tuple[str, float, float] | None = None) -> None:
    """Clean against robust validation accuracy, one point per ``(label, clean, robust)``, the best one marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter([p[1] for p in points], [p[2] for p in points], c="tab:blue", label="trials", alpha=0.7)
    if best is not None:
        ax.scatter([best[1]], [best[2]], marker="*", s=300, c="tab:red", label=f"best ({best[0]})")
    ax.set_xlabel("validation clean accuracy")
    ax.set_ylabel("validation robust accuracy (PGD)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
