"""Sensitivity of a search (docs/sensitivity.md): which searched keys move ``search.metric``, and where their
best values lie, from the search's Optuna study.

Which trials are compared. ASHA stops most trials at different budgets, and a metric after 3 epochs does
not compare with one after 30 (nor do the parameters that win early always win late). So the trials are
compared at one epoch: the deepest epoch that at least :func:`min_trials` of them reached, each with the
value it reported at that epoch (its Optuna intermediate value). When that many trials ran the full
``train.epochs``, this is the last epoch, i.e. the complete trials at their final value. Failed trials are
never used; trials of an interrupted search count with the epochs they reported.

Importances are Optuna's fANOVA (seeded, so reruns agree) on an in-memory study that holds the compared
trials as COMPLETE with their value at that epoch (Optuna's evaluators and plots read COMPLETE trials
only). With fewer trials than :func:`min_trials` at every epoch, or no spread in their values, there are
no importances and no contour: the report says why instead of ranking noise. Slice plots show every
trial at its last report, coloured by the epochs it reached (Optuna's own slice plot colours by trial
number only), the compared trials ringed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_mtard import atomic, files, tracking
from tune_mtard.config import Config
from tune_mtard.plots import plot_slice_by_epochs, pyplot
from tune_mtard.search.fidelity import asha_fidelity
from tune_mtard.search.study_storage import optuna_storage_url
from tune_mtard.search.trials import TrialSummary

MIN_TRIALS = 5  # the fewest trials importances are computed from, however few keys are searched
FANOVA_SEED = 0
NEGLIGIBLE = 0.05  # importances below this share are reported as hardly mattering
EDGE = 0.05  # a best trial this close to a bound (share of the range), its region beside it: widen the range


def min_trials(n_params: int) -> int:
    """Trials needed at one epoch for importances: at least :data:`MIN_TRIALS`, and one more than the searched
    keys (fewer points than a linear model of the keys needs cannot tell their effects apart)."""
    return max(MIN_TRIALS, n_params + 1)


@dataclass
class TrialPoint:
    """One trial of the study that did not fail: its values of ``search.metric`` by epoch."""

    number: int  # Optuna's trial number
    trial_id: str  # Ray Tune's trial id (``#<number>`` when the study does not know it)
    params: dict[str, Any]
    distributions: dict[str, Any]  # name -> optuna distribution
    values: dict[int, float]  # epoch -> search.metric reported then
    epochs: int  # epochs reached

    @property
    def last_value(self) -> float:
        return self.values[max(self.values)]


@dataclass
class SensitivityReport:
    """What :func:`analyze_search` found and wrote; ``epoch`` is None when no epoch had enough trials."""

    search: str
    metric: str
    mode: str
    full_epochs: int
    needed: int  # min_trials of this space
    reached: dict[int, int]  # epochs reached -> trials that stopped there
    epoch: int | None = None
    compared: list[str] = field(default_factory=list)  # trial ids compared at ``epoch``
    importances: dict[str, float] = field(default_factory=dict)  # most important first; empty: not computed
    regions: dict[str, str] = field(default_factory=dict)  # key -> its best region, in words
    note: str = ""  # why there are no importances, when there are none
    files: list[Path] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None  # ASHA's fidelity (tune_mtard/search/fidelity.py); None without ASHA

    @property
    def n_trials(self) -> int:
        return sum(self.reached.values())

    def selection(self) -> str:
        """Which trials the importances and regions use, and why, in one sentence."""
        if self.epoch is None:
            return (f"No epoch was reached by {self.needed} trials (of {self.n_trials} that did not fail), "
                    "so no trials are compared.")
        which = ("the complete trials, at their final value" if self.epoch >= self.full_epochs else
                 f"each at the {self.metric} it reported after epoch {self.epoch} of {self.full_epochs}")
        return (f"{len(self.compared)} of {self.n_trials} trials that did not fail, {which}: epoch "
                f"{self.epoch} is the deepest that at least {self.needed} trials reached (max({MIN_TRIALS}, "
                f"searched keys + 1)), and values after different numbers of epochs do not compare.")


def load_points(folder: Path, cfg: Config, trials: list[TrialSummary] | None = None) -> list[TrialPoint]:
    """The trials of the search's study that did not fail and reported the metric. ``trials`` (the driver's
    view) also leaves out the trials Ray saw fail and gives the epochs each trial ran."""
    import optuna

    # ray and optuna load at import of these: only a running search needs them
    from tune_mtard.search.searcher import RAY_TRIAL_ATTR

    failed = {t.trial_id for t in trials or [] if t.failed}
    epochs_run = {t.trial_id: t.epochs for t in trials or []}
    with _quiet_optuna():
        study = optuna.load_study(study_name=cfg.name, storage=optuna_storage_url(cfg, folder))
    single = len(study.directions) == 1
    points = []
    for t in study.get_trials(deepcopy=False):
        trial_id = str(t.user_attrs.get(RAY_TRIAL_ATTR, f"#{t.number}"))
        if t.state == optuna.trial.TrialState.FAIL or trial_id in failed:
            continue
        values = {int(step): float(v) for step, v in t.intermediate_values.items() if math.isfinite(v)}
        if not values and t.state == optuna.trial.TrialState.COMPLETE and single and t.value is not None:
            values = {cfg.train.epochs: float(t.value)}
        if values and all(key in t.params for key in cfg.space or {}):
            points.append(TrialPoint(t.number, trial_id, dict(t.params), dict(t.distributions), values,
                                     max(max(values), epochs_run.get(trial_id, 0))))
    return points


def trials_by_epoch(points: list[TrialPoint]) -> dict[int, int]:
    """Epoch -> how many trials reported a value after it."""
    counts: dict[int, int] = {}
    for p in points:
        for epoch in p.values:
            counts[epoch] = counts.get(epoch, 0) + 1
    return counts


def compared_epoch(points: list[TrialPoint], needed: int) -> int | None:
    """The deepest epoch after which at least ``needed`` trials reported a value."""
    return max((e for e, n in trials_by_epoch(points).items() if n >= needed), default=None)


def analyze_search(folder: str | Path, cfg: Config, trials: list[TrialSummary] | None = None) -> SensitivityReport:
    """Importances, slice plots, the contour of the top two keys and ``sensitivity.md``, written into the
    search's ``folder`` (replacing an earlier analysis). ``trials``: the search's trials when the caller has
    them (the driver at the end of a search); else the study alone is read."""
    assert cfg.search is not None and cfg.space
    folder = Path(folder)
    params = list(cfg.space)
    points = load_points(folder, cfg, trials)
    report = SensitivityReport(search=cfg.name, metric=cfg.search.metric, mode=cfg.search.mode,
                               full_epochs=cfg.train.epochs, needed=min_trials(len(params)),
                               reached=dict(sorted(Counter(p.epochs for p in points).items())))
    report.epoch = compared_epoch(points, report.needed)
    report.fidelity = asha_fidelity({p.trial_id: p.values for p in points}, cfg)
    compared = [p for p in points if report.epoch in p.values]
    report.compared = [p.trial_id for p in compared]
    for stale in [files.SENSITIVITY_MD, files.IMPORTANCES_PNG, files.CONTOUR_PNG, files.SLICE_PNG.format("*")]:
        for path in folder.glob(stale):
            path.unlink()

    if not points:
        report.note = f"No trial has reported {report.metric} yet (failed trials aside): nothing to analyze."
    elif report.epoch is None:
        most = max(trials_by_epoch(points).values(), default=0)
        report.note = (f"Importances need {report.needed} trials compared after the same number of epochs; at "
                       f"most {most} of the {len(points)} trials that did not fail reached a common epoch. "
                       "Importances from fewer would be noise, so none are given. Run more trials "
                       "(search.num_samples), or analyze again once more have run.")
    elif len({p.values[report.epoch] for p in compared}) < 2:
        report.note = (f"All {len(compared)} trials compared have the same {report.metric} after epoch "
                       f"{report.epoch}: there is no variation for the keys to explain.")
    else:
        study = _study_of(compared, report.epoch, cfg.search.mode)
        report.importances = _importances(study, params)
        report.regions = best_regions(compared, report.epoch, cfg)
        target = f"{report.metric} after epoch {report.epoch}"
        report.files.append(_optuna_plot(folder / files.IMPORTANCES_PNG, f"{cfg.name}: importances for {target}",
                                         "plot_param_importances", study, evaluator=_evaluator(), params=params,
                                         target_name=target))
        top_two = list(report.importances)[:2]
        if len(top_two) == 2 and all(len({repr(p.params[k]) for p in compared}) > 1 for k in top_two):
            report.files.append(_optuna_plot(folder / files.CONTOUR_PNG, f"{cfg.name}: {target}, the two most "
                                             "important keys", "plot_contour", study, params=top_two,
                                             target_name=target))
    for key in params if points else []:
        report.files.append(_slice(folder, key, points, set(report.compared), report))
    md = folder / files.SENSITIVITY_MD
    atomic.write_text(md, render_markdown(report))
    report.files.insert(0, md)
    return report


def log_sensitivity(run: tracking.RunHandle, report: SensitivityReport) -> None:
    """Put the analysis on an MLflow run (a search's parent run, whose handle journals it): its files under
    ``sensitivity/``, each importance as a metric ``importance.<key>``, and the epoch and trials compared as tags."""
    run.log_artifacts(report.files, files.SENSITIVITY_ARTIFACTS)
    run.log_metrics({f"importance.{k}": v for k, v in report.importances.items()}, step=0)
    run.set_tags({"sensitivity.epoch": "" if report.epoch is None else report.epoch,
                  "sensitivity.trials_compared": len(report.compared)})
    if report.fidelity is not None:
        run.log_metrics({f"asha_fidelity.rung_{rung}": rho for rung, rho in report.fidelity["spearman"].items()
                         if math.isfinite(rho)}, step=0)
        run.set_tags({"asha_fidelity": report.fidelity["sentence"]})


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every in-memory study it creates and warns that its plots are experimental: not news here."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _study_of(points: list[TrialPoint], epoch: int, mode: str) -> Any:
    """An in-memory study of the compared trials, COMPLETE with their value at ``epoch``."""
    import optuna

    with _quiet_optuna():
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for p in points:
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=p.values[epoch],
                                                  params=p.params, distributions=p.distributions,
                                                  user_attrs={"trial_id": p.trial_id}))
    return study


def _evaluator() -> Any:
    from optuna.importance import FanovaImportanceEvaluator

    return FanovaImportanceEvaluator(seed=FANOVA_SEED)


def _importances(study: Any, params: list[str]) -> dict[str, float]:
    import optuna

    with _quiet_optuna():
        found = optuna.importance.get_param_importances(study, evaluator=_evaluator(), params=params)
    return {key: float(value) for key, value in found.items()}


def _optuna_plot(path: Path, title: str, name: str, study: Any, **kwargs: Any) -> Path:
    """One of Optuna's matplotlib plots, saved; matplotlib's settings (Optuna switches the style) restored."""
    plt = pyplot()
    import optuna.visualization.matplotlib as optuna_plots

    with _quiet_optuna(), plt.rc_context():
        ax = getattr(optuna_plots, name)(study, **kwargs)
        for side in ("left", "center", "right"):
            ax.set_title(title if side == "center" else "", loc=side, fontsize="medium")
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
    return path


def _slice(folder: Path, key: str, points: list[TrialPoint], compared: set[str], report: SensitivityReport) -> Path:
    path = folder / files.SLICE_PNG.format(key)
    dist = points[0].distributions.get(key) if points else None
    categories = getattr(dist, "choices", None)
    ring = f"compared after epoch {report.epoch}" if report.epoch is not None else ""
    plot_slice_by_epochs([p.params[key] for p in points], [p.last_value for p in points],
                         [p.epochs for p in points], [p.trial_id in compared for p in points], path,
                         xlabel=key, ylabel=f"{report.metric} at the last report", max_epochs=report.full_epochs,
                         title=f"{report.search}: {key} (colour: epochs reached)",
                         log=bool(getattr(dist, "log", False)), outline_label=ring,
                         categories=None if categories is None else list(categories))
    return path


def best_regions(points: list[TrialPoint], epoch: int, cfg: Config) -> dict[str, str]:
    """Where each searched key lies in the top quartile of the compared trials, in words."""
    best_first = sorted(points, key=lambda p: p.values[epoch], reverse=cfg.search.mode == "max")
    top = best_first[:max(1, math.ceil(len(points) / 4))]
    regions = {}
    for key, dist in (cfg.space or {}).items():
        values = [p.params[key] for p in top]
        if dist.type == "categorical":
            counts = {c: values.count(c) for c in dict.fromkeys(values)}
            ranked = sorted(counts.items(), key=lambda item: -item[1])
            regions[key] = ", ".join(f"{c} ({n} of {len(top)})" for c, n in ranked)
            continue
        low, high = min(values), max(values)
        text = f"{_fmt(low)} to {_fmt(high)}" if low != high else _fmt(low)
        regions[key] = f"{text}, {_where(dist, (low + high) / 2 if not dist.log else math.sqrt(low * high))}"
        edge = _edge(dist, low, high, best_first[0].params[key])
        if edge:
            regions[key] += (f"; the best trial sits at the {edge} edge of the searched range, so the best value "
                             "may lie beyond it")
    return regions


def _position(dist: Any, value: float) -> float:
    """Where ``value`` lies in the searched range, 0 (low) to 1 (high), on a log scale for log keys."""
    if dist.log:
        return math.log(value / dist.low) / math.log(dist.high / dist.low)
    return (value - dist.low) / (dist.high - dist.low)


def _where(dist: Any, value: float) -> str:
    position = _position(dist, value)
    part = "low" if position < 1 / 3 else "high" if position > 2 / 3 else "middle"
    return f"the {part} third of {_fmt(dist.low)} to {_fmt(dist.high)}" + (" (log scale)" if dist.log else "")


def _edge(dist: Any, low: float, high: float, best: float) -> str:
    """``low`` / ``high`` when the whole best region lies in that third of the range and the best trial at
    its edge: the range may cut the optimum off."""
    region, position = (_position(dist, low), _position(dist, high)), _position(dist, best)
    if region[1] < 1 / 3 and position <= EDGE:
        return "low"
    return "high" if region[0] > 2 / 3 and position >= 1 - EDGE else ""


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def render_markdown(report: SensitivityReport) -> str:
    """``sensitivity.md``: the trials used, the ranking and the best region of each key, in words."""
    direction = "higher" if report.mode == "max" else "lower"
    lines = [f"# Sensitivity of search `{report.search}`", "",
             f"Metric: `{report.metric}` ({direction} is better). Importances: Optuna's fANOVA (seed "
             f"{FANOVA_SEED}). How to read this page and its plots: docs/sensitivity.md.", "",
             "## Trials compared", "", report.selection(), ""]
    if report.reached:
        counts = ", ".join(f"{n} reached {e}" for e, n in report.reached.items())
        lines += [f"Trials by the epochs they reached: {counts} (the full budget is {report.full_epochs}).", ""]
    if report.compared:
        lines += ["Compared: " + ", ".join(f"`{t}`" for t in report.compared) + ".", ""]
    lines += ["## Ranking", ""]
    if not report.importances:
        lines += [report.note, ""]
    else:
        ranked = list(report.importances.items())
        lines += [f"{i}. `{key}`: {share:.2f}" for i, (key, share) in enumerate(ranked, 1)] + [""]
        top, share = ranked[0]
        words = f"`{top}` matters most ({share:.0%} of the importance)"
        if len(ranked) > 1:
            words += ", then " + ", ".join(f"`{k}` ({s:.0%})" for k, s in ranked[1:3])
        minor = [f"`{k}`" for k, s in ranked if s < NEGLIGIBLE]
        lines += [words + "."] + ([f"Below {NEGLIGIBLE:.0%}, hardly moving the metric after epoch {report.epoch}: "
                                   + ", ".join(minor) + "."] if minor else []) + [""]
        n_top = max(1, math.ceil(len(report.compared) / 4))
        lines += ["## Best region of each key", "", f"The values of the top quartile: the {n_top} best of the "
                  f"{len(report.compared)} trials compared.", ""]
        lines += [f"- `{key}`: {report.regions[key]}" for key in report.importances] + [""]
    if report.fidelity is not None:
        f = report.fidelity
        rhos = ", ".join(f"rung {rung}: {rho:.2f}" for rung, rho in f["spearman"].items())
        lines += ["## ASHA's fidelity", "", f"Spearman correlation of each rung's {report.metric} with the final one, "
                  f"over the {f['n_trials']} trials that reached the last rung (epoch {f['last_rung']:g})"
                  + (f": {rhos}." if rhos else "."), "", f["sentence"], ""]
    lines += ["## Files", ""]
    for path in report.files:
        lines.append(f"- `{path.name}`: {_describe(path.name, report)}")
    lines.append("")
    return "\n".join(lines)


def _describe(name: str, report: SensitivityReport) -> str:
    if name == files.IMPORTANCES_PNG:
        return "the importance of each searched key (fANOVA share of the metric's variance)"
    if name == files.CONTOUR_PNG:
        return f"the metric over the two most important keys, {' and '.join(list(report.importances)[:2])}"
    return "the metric at each trial's last report against one key, coloured by the epochs the trial reached"
