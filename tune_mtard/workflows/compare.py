"""Methods side by side: what the ``compare`` command does (docs/methods.md, "Comparing methods").

Every method (and B-MTARD ablation) trains through the same loop from the same base config: the same
data split, teachers, PGD, schedule and evaluation; only ``method`` (and, for the ablations,
``balance.entropy`` / ``balance.loss``) and ``seed`` change. Each trained student is evaluated on the
test split with ``--attacks``. Writes ``<out>/comparison.csv`` (one row per method and seed),
``<out>/comparison_summary.csv`` (mean and standard deviation over seeds) and ``<out>/comparison.md``
(the table it prints), each run's files under ``<out>/<method>/seed<N>/``, and logs one MLflow parent
run with one child run per method and seed.
"""

from __future__ import annotations

import contextlib
import csv
import math
import statistics
import sys
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import torch.nn as nn

from tune_mtard import atomic, files, tracking
from tune_mtard.attacks import ATTACKS, attack_title
from tune_mtard.config import Config, load_config, to_yaml
from tune_mtard.data import DataBundle, load_data
from tune_mtard.errors import ConfigError, RunFailed
from tune_mtard.methods import variants
from tune_mtard.metrics import (
    TEST_ACC,
    TEST_N_EXAMPLES,
    TEST_W_ROBUST_ACC,
    VAL_CLEAN_ACC,
    VAL_ROBUST_ACC,
    VAL_W_ROBUST_ACC,
)
from tune_mtard.perf import resolve_device
from tune_mtard.pipeline import new_trainer, run_pipeline
from tune_mtard.services import check_tracking_uri
from tune_mtard.teachers import TeacherSet, check_teacher_files, prepare_teachers, roles_for

FINISHED, FAILED = "FINISHED", "FAILED"


@dataclass
class CompareRequest:
    """What the ``compare`` command asks for (docs/cli.md, "compare")."""

    config: str
    methods: str
    seeds: str = "0,1,2"
    attacks: str | None = None
    out: str | None = None
    overrides: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    tune: int | None = None  # trials of each method's search first (docs/methods.md, "Tuned comparisons")
    tune_epochs: int | None = None
    resume: bool = False
    plan: bool = False  # with tune: forecast the cost, run nothing


@dataclass
class SeedRun:
    """One (method, seed) run: its status, its final metrics (fractions) and its MLflow run."""

    method: str
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    error: str = ""


# ------------------------------------------------------------------------------------ parsing input


def parse_methods(text: str) -> list[str]:
    return _parse_names(text, "--methods", "method", variants())


def parse_seeds(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("--seeds", "expected a comma-separated list of seeds, e.g. 0,1,2")
    seeds = []
    for part in parts:
        if not part.isdigit():
            raise ConfigError("--seeds", f"expected non-negative integers, got {part!r}")
        seeds.append(int(part))
    _no_repeats(seeds, "--seeds")
    return seeds


def parse_attack_names(text: str) -> list[str]:
    return _parse_names(text, "--attacks", "attack", ATTACKS.names())


def _parse_names(text: str, flag: str, kind: str, valid: Collection[str]) -> list[str]:
    """A comma-separated list of distinct names, each one of ``valid``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(flag, f"expected a comma-separated list of {kind}s")
    for name in names:
        if name not in valid:
            raise ConfigError(flag, f"unknown {kind} {name!r} (valid: {', '.join(valid)})")
    _no_repeats(names, flag)
    return names


def _no_repeats(items: Sequence[Any], flag: str) -> None:
    for i, item in enumerate(items):
        if item in items[:i]:
            raise ConfigError(flag, f"{item!r} given twice")


def run_configs(base: Config, methods: Sequence[str], seeds: Sequence[int]) -> dict[tuple[str, int], Config]:
    """The validated config of every (method, seed): the base config with the variant's keys and the seed.

    Seed by seed, so a comparison cut short has every method for its first seeds.
    """
    configs = {}
    settings = variants()
    for seed in seeds:
        for method in methods:
            try:
                configs[method, seed] = base.with_values({**settings[method], "seed": seed})
            except ConfigError as exc:
                raise ConfigError(exc.key, f"{exc.message} (in the config of {method}, seed {seed})") from None
    return configs


# ------------------------------------------------------------------------------------- aggregation


def metric_keys(attacks: Sequence[str]) -> list[str]:
    """The table's columns as metric names: clean, each attack, then W-Robust Acc for each robust attack."""
    robust = [a for a in attacks if a != "clean"]
    return ([TEST_ACC.format("clean")] + [TEST_ACC.format(a) for a in robust]
            + [TEST_W_ROBUST_ACC.format(a) for a in robust])


def column_titles(attacks: Sequence[str]) -> list[str]:
    robust = [a for a in attacks if a != "clean"]
    return (["Clean"] + [attack_title(a) for a in robust]
            + [f"W-Robust ({attack_title(a)})" for a in robust])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of a single value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[SeedRun], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: the number of finished and failed seeds, and mean/std of every final metric."""
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        done = [r for r in runs if r.status == FINISHED]
        row: dict[str, Any] = {"method": method, "seeds_finished": len(done), "seeds_failed": len(runs) - len(done)}
        keys = [k for k in (done[0].metrics if done else {}) if k.startswith(("test_", "val_")) or k == "train_time_s"]
        for key in keys:
            if key == TEST_N_EXAMPLES:
                continue
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r.metrics[key] for r in done])
        rows.append(row)
    return rows


def markdown_table(summary: Sequence[dict[str, Any]], attacks: Sequence[str], seeds: Sequence[int],
                   n_test: int, epsilon: float, clean_weight: float,
                   extra: dict[str, dict[str, str]] | None = None) -> str:
    """The comparison as a markdown table: accuracies in %, mean ± std over the seeds.

    ``extra`` adds columns after the method's name (title -> method -> cell: a tuned comparison's values and
    budget); a row's ``note`` follows the method's name.
    """
    keys, titles = metric_keys(attacks), column_titles(attacks)
    extra = extra or {}
    over = (f"mean ± sample std over seeds {', '.join(str(s) for s in seeds)}" if len(seeds) > 1
            else f"seed {seeds[0]}")
    lines = [
        f"Test accuracy in % (n = {n_test}, eps = {epsilon:.4g}), {over}; "
        f"W-Robust = {clean_weight:g} * clean + {1 - clean_weight:g} * robust.",
        "",
        "| method | " + " | ".join([*extra, *titles]) + " |",
        "|---|" + "---|" * len(extra) + "---:|" * len(titles),
    ]
    for row in summary:
        name = row["method"]
        if row.get("note"):
            name += f" ({row['note']})"
        if row["seeds_failed"]:
            name += f" ({row['seeds_failed']} of {row['seeds_finished'] + row['seeds_failed']} seeds failed)"
        if row["seeds_finished"] == 0:
            cells = ["failed"] * len(keys)
        else:
            cells = [_percent(row[f"{k}_mean"], row[f"{k}_std"], len(seeds) > 1) for k in keys]
        cells = [column.get(row["method"], "") for column in extra.values()] + cells
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(mean: float, std: float, with_std: bool) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if with_std else f"{100 * mean:.2f}"


def write_results(out: Path, results: Sequence[SeedRun], summary: Sequence[dict[str, Any]], table: str) -> list[Path]:
    """``comparison.csv`` (one row per run), ``comparison_summary.csv`` and ``comparison.md``."""
    per_run = out / files.COMPARISON_CSV
    metric_names = list(dict.fromkeys(k for r in results for k in r.metrics))
    _write_csv(per_run, ["method", "seed", "status", "mlflow_run_id", *metric_names, "error"],
               [{"method": r.method, "seed": r.seed, "status": r.status, "mlflow_run_id": r.run_id,
                 **r.metrics, "error": r.error} for r in results])
    summary_path = out / files.COMPARISON_SUMMARY_CSV
    _write_csv(summary_path, list(dict.fromkeys(k for row in summary for k in row)), summary)
    markdown = out / files.COMPARISON_MD
    atomic.write_text(markdown, table)
    return [per_run, summary_path, markdown]


def read_results(path: Path) -> list[SeedRun]:
    """The runs a ``comparison.csv`` holds (what a resumed comparison does not run again)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fixed = ("method", "seed", "status", "mlflow_run_id", "error")
    return [SeedRun(row["method"], int(row["seed"]), row["status"],
                      {k: float(v) for k, v in row.items() if k not in fixed and v != ""}, row["mlflow_run_id"],
                      row["error"]) for row in rows]


def _write_csv(path: Path, header: list[str], rows: Sequence[dict[str, Any]]) -> None:
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------ running


def _error_line(exc: Exception) -> str:
    """A failure in one line: a RunFailed (divergence) speaks for itself; anything else is named by its type."""
    text = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0] if text else type(exc).__name__


def run_one(method: str, seed: int, cfg: Config, data: DataBundle, teachers: dict[str, nn.Module], out: Path,
            client, experiment: str, parent_id: str, data_seed: int, tags: dict[str, str] | None = None) -> SeedRun:
    """One (method, seed) through the run pipeline, as a child run of the comparison (with ``tags`` too); a
    failure is recorded (FAILED, with its error as a tag), not raised; an interrupt ends it KILLED and propagates."""
    run_dir = out / method / f"seed{seed}"
    tags = {"mlflow.parentRunId": parent_id, "tune_mtard.command": "compare", "compare.method": method,
            "compare.seed": str(seed), "compare.data_seed": str(data_seed), **(tags or {})}

    def show(result) -> None:
        if result.validated:
            m = result.metrics
            print(f"  {method} seed {seed} epoch {result.epoch:3d}  val clean {m[VAL_CLEAN_ACC]:.4f}  "
                  f"robust {m[VAL_ROBUST_ACC]:.4f}  w-robust {m[VAL_W_ROBUST_ACC]:.4f}  "
                  f"{m['epoch_time_s']:.1f}s", flush=True)

    run_id = ""
    try:
        with tracking.open_run(client, experiment, f"{cfg.name}-{method}-seed{seed}", tags=tags) as run:
            run_id = run.run_id
            run.log_params(cfg.flat())
            try:
                result = run_pipeline(new_trainer(cfg, data, teachers, run_dir), data, run_dir, run=run, on_epoch=show)
            except Exception as exc:
                run.set_tags({"error": _error_line(exc)[:5000]})
                raise
    except Exception as exc:  # one failed method must not cost the others their results
        if not isinstance(exc, RunFailed):  # a crash: its traceback; a divergence says all in its line
            traceback.print_exc()
        return SeedRun(method, seed, FAILED, run_id=run_id, error=_error_line(exc))
    return SeedRun(method, seed, FINISHED, result.metrics, run_id)


def refuse_workers(base: Config) -> None:
    """compare trains each of its runs in one process: ``train.workers`` > 1 is refused (exit 2), not ignored."""
    if base.train.workers > 1:
        raise ConfigError("train.workers", f"compare trains each run in one process, so it takes only 1, got "
                                           f"{base.train.workers} (train and search run on several workers)")


def plan_comparison(request: CompareRequest) -> tuple[Config, list[str], list[int], dict[tuple[str, int], Config],
                                                      Path]:
    """Everything checked before anything runs, is written or is logged: the base config, methods, seeds,
    each run's config and the output folder."""
    for flag, given in (("--tune-epochs", request.tune_epochs is not None), ("--resume", request.resume)):
        if given:
            raise ConfigError(flag, "only with --tune (a tuned comparison)")
    methods = parse_methods(request.methods)
    seeds = parse_seeds(request.seeds)
    base = base_config(request).run_config()
    refuse_workers(base)
    resolve_device(base.device)
    configs = run_configs(base, methods, seeds)
    check_teacher_files(base, roles_for({c.method for c in configs.values()}))
    out = Path(request.out or Path("runs") / f"{base.name}-compare").resolve()
    if (out / files.COMPARISON_CSV).exists():
        raise ConfigError("--out", f"{out} already holds a comparison; choose another --out")
    return base, methods, seeds, configs, out


def base_config(request: CompareRequest) -> Config:
    """The config file with ``--set``, ``--attacks`` and ``--tracking-uri`` applied, validated; its run config is
    the comparison's base config (its ``search`` and ``spaces`` sections serve ``--tune``)."""
    flags = {"eval.final_attacks": ("--attacks", parse_attack_names(request.attacks))} if request.attacks else {}
    if request.tracking_uri:
        flags["mlflow.tracking_uri"] = ("--tracking-uri", request.tracking_uri)
    base = load_config(request.config, request.overrides, check_files=False, flags=flags)
    check_tracking_uri(base.mlflow.tracking_uri, "--tracking-uri" if request.tracking_uri else "mlflow.tracking_uri")
    return base


def compare(request: CompareRequest) -> int:
    """The ``compare`` command: every (method, seed) run, the table, the files and the MLflow records
    (``--tune`` is :func:`tune_mtard.workflows.tuned_compare.compare_tuned`)."""
    if request.plan and (request.tune is None or request.resume):
        raise ConfigError("--plan", "plans a new tuned comparison: it needs --tune N and cannot take --resume")
    base, methods, seeds, configs, out = plan_comparison(request)
    attacks = final_attacks(base)
    data = load_data(base)

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / files.RUN_CONFIG, to_yaml(base))
    header = (f"compare {base.name}: {', '.join(methods)} x seeds {', '.join(map(str, seeds))} on "
              f"{base.data.dataset}, {base.train.epochs} epochs each on {resolve_device(base.device)}")
    with comparison_run(base, data, out, f"{base.name}-compare", comparison_params(base, methods, seeds, attacks),
                        header, {c.method for c in configs.values()}) as (parent, teachers):
        n_test = test_examples(base, data)

        def tabulate(results: Sequence[SeedRun]) -> tuple[list[dict[str, Any]], str]:
            summary = summarize(results, [m for m in methods if any(r.method == m for r in results)])
            return summary, markdown_table(summary, attacks, seeds, n_test, base.attack.epsilon, base.eval.clean_weight)

        results = run_seeds(configs, data, teachers.models, out, parent, base.seed, attacks, tabulate)
        failed = record_comparison(parent, base, out, results, *tabulate(results))
    return report_failures(failed, len(results))


@contextlib.contextmanager
def comparison_run(base: Config, data: DataBundle, out: Path, name: str, params: dict[str, Any], header: str,
                   methods: Iterable[str], id_file: Path | None = None,
                   resume: bool = False) -> Iterator[tuple[tracking.RunHandle, TeacherSet]]:
    """The parent run of a comparison (``compare``, or ``compare --tune`` with ``id_file`` to resume it): opened,
    its params logged, the ``header`` line printed with the output folder and run id, then the teachers of
    ``methods`` prepared, recorded and announced."""
    with tracking.command_run(base.mlflow, name, "compare", out, id_file=id_file, resume=resume) as parent:
        if id_file is not None:
            atomic.write_text(id_file, parent.run_id)
        parent.log_params(params)
        print(f"{header}; output in {out}; MLflow parent run {parent.run_id}", flush=True)
        teachers = prepare_teachers(base, data, resolve_device(base.device), progress=False, roles=roles_for(methods))
        parent.log_metrics(teachers.quality_metrics(), step=0)
        teachers.announce()
        yield parent, teachers


def test_examples(base: Config, data: DataBundle) -> int:
    """How many test examples the final evaluation of each run measures."""
    return min(base.eval.final_n_examples or len(data.test), len(data.test))


def final_attacks(base: Config) -> list[str]:
    """The attacks of the final test evaluation, ``clean`` first."""
    return list(dict.fromkeys(["clean", *base.eval.final_attacks]))


def comparison_params(base: Config, methods: Sequence[str], seeds: Sequence[int],
                      attacks: Sequence[str]) -> dict[str, Any]:
    """The parent run's params: what was compared, and the base config's dotted keys."""
    return {"compare.methods": ",".join(methods), "compare.seeds": ",".join(map(str, seeds)),
            "compare.attacks": ",".join(attacks),
            **{k: v for k, v in base.flat().items() if k not in ("method", "seed")}}


def run_seeds(configs: dict[tuple[str, int], Config], data: DataBundle, teachers: dict[str, nn.Module], out: Path,
              parent: tracking.RunHandle, data_seed: int, attacks: Sequence[str], tabulate,
              done: Sequence[SeedRun] = (), tags: dict[str, dict[str, str]] | None = None) -> list[SeedRun]:
    """Every (method, seed) of ``configs`` that ``done`` lacks, in order, through :func:`run_one`; the tables
    (``tabulate(results)`` -> summary rows and markdown) are rewritten after every run, so a comparison cut
    short keeps its rows. ``tags`` adds tags to each method's runs."""
    results = list(done)
    todo = {key: cfg for key, cfg in configs.items() if not any((r.method, r.seed) == key for r in done)}
    for i, ((method, seed), cfg) in enumerate(todo.items(), start=1):
        print(f"[{i}/{len(todo)}] {method} seed {seed}", flush=True)
        result = run_one(method, seed, cfg, data, teachers, out, parent.client, parent.experiment_id, parent.run_id,
                         data_seed,
                         (tags or {}).get(method))
        results.append(result)
        if result.status == FINISHED:
            shown = "  ".join(f"{k[5:]} {result.metrics[k]:.4f}" for k in metric_keys(attacks))
            print(f"[{i}/{len(todo)}] {method} seed {seed}: {shown}  ({result.metrics['train_time_s']:.0f}s)",
                  flush=True)
        else:
            print(f"[{i}/{len(todo)}] {method} seed {seed} FAILED: {result.error}", flush=True)
        write_results(out, results, *tabulate(results))
    return results


def record_comparison(parent, base: Config, out: Path, results: Sequence[SeedRun],
                      summary: Sequence[dict[str, Any]], table: str) -> list[SeedRun]:
    """The tables (files and parent run), the per-method means as metrics; prints the table and how to see the
    runs in the MLflow UI. Returns the failed runs (the parent run is then FAILED)."""
    written = write_results(out, results, summary, table)
    failed = [r for r in results if r.status == FAILED]
    parent.log_metrics({f"{row['method']}/{key}": value for row in summary for key, value in row.items()
                        if key != "method" and isinstance(value, (int, float)) and not math.isnan(value)}, step=0)
    parent.log_artifacts([*written, out / files.RUN_CONFIG])
    parent.set_tags({"compare.failed_runs": str(len(failed))})
    parent.failed = bool(failed)
    print(f"\n{table}\nfiles in {out}: {files.COMPARISON_CSV} {files.COMPARISON_SUMMARY_CSV} {files.COMPARISON_MD}")
    print(tracking.ui_hint(base.mlflow.tracking_uri, base.mlflow.experiment))
    return failed


def report_failures(failed: Sequence[SeedRun], n_runs: int) -> int:
    """Exit code 1, with one line naming each failed run, when some run failed; else 0."""
    if failed:
        print(f"{len(failed)} of {n_runs} runs failed: "
              + "; ".join(f"{r.method} seed {r.seed}: {r.error}" for r in failed), file=sys.stderr)
        return 1
    return 0
