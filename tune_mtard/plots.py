"""Plots that runs and searches log (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tune_mtard.trace import read_trace


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend: files only, no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trace(trace_csv: str | Path, png: str | Path, title: str = "balance trace") -> None:
    """The four balance quantities over optimiser steps: losses, soft-label entropies, temperatures and
    weights, so a diverging or stalled balance shows at a glance."""
    plt = pyplot()
    columns = read_trace(trace_csv)
    steps = columns["step"]
    panels = (("loss", ("loss_adv", "loss_nat")), ("mean p log p", ("entropy_adv", "entropy_nat")),
              ("temperature", ("tau_adv", "tau_nat")), ("loss weight", ("w_adv", "w_nat")))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 9), sharex=True)
    for ax, (label, names) in zip(axes, panels, strict=True):
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
    plt = pyplot()
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


def plot_slice_by_epochs(x: Sequence[Any], y: Sequence[float], epochs: Sequence[int], outlined: Sequence[bool],
                         path: str | Path, *, xlabel: str, ylabel: str, title: str, max_epochs: int,
                         log: bool = False, categories: Sequence[Any] | None = None, outline_label: str = "") -> None:
    """One point per trial, ``y`` against ``x``, coloured by the epochs the trial reached (one scale, 1 to
    ``max_epochs``, in every plot), ``outlined`` ones ringed in black. ``categories`` places a categorical
    ``x`` at the positions of its choices."""
    plt = pyplot()
    if categories is not None:
        x = [list(categories).index(v) for v in x]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    points = ax.scatter(x, y, c=epochs, cmap="viridis", vmin=1, vmax=max(max_epochs, 2), s=45, alpha=0.85,
                        edgecolors=["black" if o else "none" for o in outlined], linewidths=1.3)
    if outline_label and any(outlined):
        ax.scatter([], [], facecolors="none", edgecolors="black", linewidths=1.3, label=outline_label)
        ax.legend(loc="best", fontsize="small")
    if categories is not None:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)
    elif log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        # 1, 2, 5 per decade, written plainly: matplotlib's default labels every minor tick of a log axis
        # that spans about one decade, and they overlap.
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(points, ax=ax, label="epochs reached", ticks=MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto(points: list[tuple[str, float, float]], front: list[tuple[str, float, float]], path: str | Path,
                *, xlabel: str, ylabel: str, default: tuple[str, float, float] | None = None,
                modes: tuple[str, str] = ("max", "max")) -> None:
    """Every trial as ``(label, x, y)``, the Pareto front drawn as a step line through its points, and the
    paper-defaults trial marked and labelled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.scatter([p[1] for p in points], [p[2] for p in points], c="tab:gray", alpha=0.6, label="trials")
    if front:
        ordered = sorted(front, key=lambda p: p[1], reverse=modes[0] == "max")
        where = "post" if (modes[0] == "max") == (modes[1] == "max") else "pre"
        ax.step([p[1] for p in ordered], [p[2] for p in ordered], where=where, c="tab:red", lw=1.5)
        ax.scatter([p[1] for p in ordered], [p[2] for p in ordered], c="tab:red", s=50, zorder=3,
                   label=f"Pareto front ({len(front)})")
    if default is not None:
        ax.scatter([default[1]], [default[2]], marker="*", s=250, c="tab:blue", zorder=4, label="paper defaults")
        ax.annotate(f"paper defaults ({default[0]})", (default[1], default[2]), textcoords="offset points",
                    xytext=(6, 6), fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
