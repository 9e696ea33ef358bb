"""Methods side by side: ``python -m tune_mtard.compare --config FILE --methods LIST [--seeds 0,1,2]``.

Every method (and B-MTARD ablation) trains through the same loop from the same base config: the same
data split, teachers, PGD, schedule and evaluation; only ``method`` (and, for the ablations,
``balance.entropy`` / ``balance.loss``) and ``seed`` change. Each trained student is evaluated on the
test split with ``--attacks``. Writes ``<out>/comparison.csv`` (one row per method and seed),
``<out>/comparison_summary.csv`` (mean and standard deviation over seeds) and ``<out>/comparison.md``
(the table it prints), each run's files under ``<out>/<method>/seed<N>/``, and logs one MLflow parent
run with one child run per method and seed.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import torch
import torch.nn as nn

from tune_mtard import tracking
from tune_mtard.cli import ArgumentParser, add_set_flag, run
from tune_mtard.config import ATTACKS, AUTO, Config, Method, absolute_tracking_uri, load_config, to_yaml
from tune_mtard.data import DataBundle, load_data
from tune_mtard.engine import EpochResult, Trainer, resolve_device
from tune_mtard.errors import ConfigError
from tune_mtard.models import save_checkpoint
from tune_mtard.teachers import needed_roles, prepare_teachers, teacher_path
from tune_mtard.train import final_test_metrics, final_val_metrics

# What each name in --methods sets on the base config. `b-mtard` runs with both balancers on, whatever
# the base config says, so that its row and the ablations' rows mean what their names say.
VARIANTS: dict[str, dict[str, Any]] = {
    **{m.value: {"method": m.value} for m in Method if m is not Method.BMTARD},
    "b-mtard": {"method": "b-mtard", "balance.entropy": True, "balance.loss": True},
    "b-mtard-no-ebb": {"method": "b-mtard", "balance.entropy": False, "balance.loss": True},
    "b-mtard-no-nlb": {"method": "b-mtard", "balance.entropy": True, "balance.loss": False},
    "b-mtard-none": {"method": "b-mtard", "balance.entropy": False, "balance.loss": False},
}

ATTACK_TITLES = {"clean": "Clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW-inf", "aa": "AutoAttack",
                 "square": "Square"}

FINISHED, FAILED = "FINISHED", "FAILED"


@dataclass
class RunResult:
    """One (method, seed) run: its status, its final metrics (fractions) and its MLflow run."""

    method: str
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    error: str = ""


# ------------------------------------------------------------------------------------ parsing input


def parse_methods(text: str) -> list[str]:
    return _parse_names(text, "--methods", "method", VARIANTS)


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


def parse_attacks(text: str) -> list[str]:
    return _parse_names(text, "--attacks", "attack", ATTACKS)


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
    for seed in seeds:
        for method in methods:
            try:
                configs[method, seed] = base.with_values({**VARIANTS[method], "seed": seed})
            except ConfigError as exc:
                raise ConfigError(exc.key, f"{exc.message} (in the config of {method}, seed {seed})") from None
    return configs


def check_teacher_files(cfg: Config) -> None:
    """Teachers given as paths must exist; ``auto`` ones are trained when missing."""
    for role in needed_roles(cfg):
        teacher = getattr(cfg.teachers, role)
        if teacher.checkpoint != AUTO and not teacher_path(cfg, role).is_file():
            raise ConfigError(f"teachers.{role}.checkpoint",
                              f"file not found: {teacher_path(cfg, role)} "
                              "(train it with python -m tune_mtard.teachers, or set checkpoint: auto)")


# ------------------------------------------------------------------------------------- aggregation


def metric_keys(attacks: Sequence[str]) -> list[str]:
    """The table's columns as metric names: clean, each attack, then W-Robust Acc for each robust attack."""
    robust = [a for a in attacks if a != "clean"]
    return ["test_clean_acc"] + [f"test_{a}_acc" for a in robust] + [f"test_w_robust_acc_{a}" for a in robust]


def column_titles(attacks: Sequence[str]) -> list[str]:
    robust = [a for a in attacks if a != "clean"]
    return (["Clean"] + [ATTACK_TITLES[a] for a in robust]
            + [f"W-Robust ({ATTACK_TITLES[a]})" for a in robust])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of a single value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[RunResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: the number of finished and failed seeds, and mean/std of every final metric."""
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        done = [r for r in runs if r.status == FINISHED]
        row: dict[str, Any] = {"method": method, "seeds_finished": len(done), "seeds_failed": len(runs) - len(done)}
        keys = [k for k in (done[0].metrics if done else {}) if k.startswith(("test_", "val_")) or k == "train_time_s"]
        for key in keys:
            if key == "test_n_examples":
                continue
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r.metrics[key] for r in done])
        rows.append(row)
    return rows


def markdown_table(summary: Sequence[dict[str, Any]], attacks: Sequence[str], seeds: Sequence[int],
                   n_test: int, epsilon: float, clean_weight: float) -> str:
    """The comparison as a markdown table: accuracies in %, mean ± std over the seeds."""
    keys, titles = metric_keys(attacks), column_titles(attacks)
    over = (f"mean ± sample std over seeds {', '.join(str(s) for s in seeds)}" if len(seeds) > 1
            else f"seed {seeds[0]}")
    lines = [
        f"Test accuracy in % (n = {n_test}, eps = {epsilon:.4g}), {over}; "
        f"W-Robust = {clean_weight:g} * clean + {1 - clean_weight:g} * robust.",
        "",
        "| method | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    for row in summary:
        name = row["method"]
        if row["seeds_failed"]:
            name += f" ({row['seeds_failed']} of {row['seeds_finished'] + row['seeds_failed']} seeds failed)"
        if row["seeds_finished"] == 0:
            cells = ["failed"] * len(keys)
        else:
            cells = [_percent(row[f"{k}_mean"], row[f"{k}_std"], len(seeds) > 1) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(mean: float, std: float, with_std: bool) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if with_std else f"{100 * mean:.2f}"


def write_results(out: Path, results: Sequence[RunResult], summary: Sequence[dict[str, Any]], table: str) -> list[Path]:
    """``comparison.csv`` (one row per run), ``comparison_summary.csv`` and ``comparison.md``."""
    per_run = out / "comparison.csv"
    metric_names = list(dict.fromkeys(k for r in results for k in r.metrics))
    _write_csv(per_run, ["method", "seed", "status", "mlflow_run_id", *metric_names, "error"],
               [{"method": r.method, "seed": r.seed, "status": r.status, "mlflow_run_id": r.run_id,
                 **r.metrics, "error": r.error} for r in results])
    summary_path = out / "comparison_summary.csv"
    _write_csv(summary_path, list(dict.fromkeys(k for row in summary for k in row)), summary)
    markdown = out / "comparison.md"
    markdown.write_text(table)
    return [per_run, summary_path, markdown]


def _write_csv(path: Path, header: list[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------ running


def train_and_test(method: str, cfg: Config, data: DataBundle, teachers: dict[str, nn.Module],
                   device: torch.device, run_dir: Path, client, run_id: str) -> dict[str, float]:
    """One run: train, evaluate on the test split, write its files and log it to its MLflow run."""
    roles = needed_roles(cfg)
    trainer = Trainer(cfg, data, teachers.get("clean") if "clean" in roles else None,
                      teachers.get("robust") if "robust" in roles else None, device=device)

    def on_epoch_end(t: Trainer, result: EpochResult) -> None:
        if result.validated:
            m = result.metrics
            tracking.log_metrics(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=result.epoch)
            print(f"  {method} seed {cfg.seed} epoch {result.epoch:3d}  val clean {m['val_clean_acc']:.4f}  "
                  f"robust {m['val_robust_acc']:.4f}  w-robust {m['val_w_robust_acc']:.4f}  "
                  f"{m['epoch_time_s']:.1f}s", flush=True)

    start = time.perf_counter()
    try:
        trainer.fit(on_epoch_end)
        trainer.student.eval()
        metrics: dict[str, float] = final_val_metrics(trainer.history)
        metrics.update(final_test_metrics(cfg, trainer.model, data, device))
        metrics["train_time_s"] = round(time.perf_counter() - start, 2)
    finally:
        trainer.write_trace(run_dir / "balance_trace.csv")
    save_checkpoint(trainer.student, run_dir / "student.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    tracking.plot_trace(run_dir / "balance_trace.csv", run_dir / "balance_trace.png")
    # The val_* values are the last epoch's, already logged at this step.
    tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if not k.startswith("val_")},
                         step=trainer.epoch)
    tracking.log_artifacts(client, run_id, [run_dir / name for name in
                                            ("balance_trace.csv", "balance_trace.png", "config.yaml", "metrics.json")])
    return metrics


def run_one(method: str, seed: int, cfg: Config, data: DataBundle, teachers: dict[str, nn.Module],
            device: torch.device, out: Path, client, experiment: str, parent_id: str, data_seed: int) -> RunResult:
    """One (method, seed) as a child run of the comparison; a failure is recorded, not raised."""
    run_dir = out / method / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    run_id = client.create_run(experiment, run_name=f"{cfg.name}-{method}-seed{seed}", tags={
        "mlflow.parentRunId": parent_id, "tune_mtard.command": "compare", "compare.method": method,
        "compare.seed": str(seed), "compare.data_seed": str(data_seed)}).info.run_id
    tracking.log_params(client, run_id, tracking.config_params(cfg))
    try:
        metrics = train_and_test(method, cfg, data, teachers, device, run_dir, client, run_id)
    except Exception as exc:  # one failed method must not cost the others their results
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        traceback.print_exc()
        tracking.set_tags(client, run_id, {"error": error[:5000]})
        client.set_terminated(run_id, FAILED)
        return RunResult(method, seed, FAILED, run_id=run_id, error=error)
    except BaseException:
        client.set_terminated(run_id, "KILLED")
        raise
    client.set_terminated(run_id, FINISHED)
    return RunResult(method, seed, FINISHED, metrics, run_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tune_mtard.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config or search space file (the base config)")
    parser.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--attacks", default=None,
                        help=f"test attacks, comma-separated from {', '.join(ATTACKS)} (default: eval.final_attacks)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<name>-compare)")
    add_set_flag(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: mlflow.tracking_uri)")
    args = parser.parse_args(argv)

    # Everything is checked before anything runs, is written or is logged.
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    base = load_config(args.config, args.overrides, check_files=False).run_config()
    if args.attacks is not None:
        base = base.with_values({"eval.final_attacks": parse_attacks(args.attacks)})
    if args.tracking_uri:
        base.mlflow.tracking_uri = absolute_tracking_uri(args.tracking_uri)
    attacks = list(dict.fromkeys(["clean", *base.eval.final_attacks]))
    configs = run_configs(base, methods, seeds)
    teacher_cfg = None
    with_teachers = [c for c in configs.values() if needed_roles(c)]
    if with_teachers:  # one config whose method needs every teacher any of the runs needs
        teacher_cfg = base.with_values({"method": max(with_teachers, key=lambda c: len(needed_roles(c))).method.value})
        check_teacher_files(teacher_cfg)
    out = Path(args.out or Path("runs") / f"{base.name}-compare").resolve()
    if (out / "comparison.csv").exists():
        raise ConfigError("--out", f"{out} already holds a comparison; choose another --out")
    data = load_data(base.data.dataset, base.data.root, base.data.download, base.data.val_fraction, base.seed)
    n_test = min(base.eval.final_n_examples or len(data.test), len(data.test))
    device = resolve_device(base.device)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(base))
    client = tracking.client_for(base.mlflow.tracking_uri)
    experiment = tracking.experiment_id(client, base.mlflow.experiment)
    parent_id = client.create_run(experiment, run_name=f"{base.name}-compare", tags={
        "tune_mtard.command": "compare", "tune_mtard.out": str(out)}).info.run_id
    tracking.log_params(client, parent_id, {
        "compare.methods": ",".join(methods), "compare.seeds": ",".join(map(str, seeds)),
        "compare.attacks": ",".join(attacks),
        **{k: v for k, v in tracking.config_params(base).items() if k not in ("method", "seed")}})
    print(f"compare {base.name}: {', '.join(methods)} x seeds {', '.join(map(str, seeds))} on "
          f"{base.data.dataset}, {base.train.epochs} epochs each on {device}; output in {out}; "
          f"MLflow parent run {parent_id}", flush=True)

    results: list[RunResult] = []
    try:
        teachers = prepare_teachers(teacher_cfg, data, device, progress=False) if teacher_cfg else {}
        for i, ((method, seed), cfg) in enumerate(configs.items(), start=1):
            print(f"[{i}/{len(configs)}] {method} seed {seed}", flush=True)
            result = run_one(method, seed, cfg, data, teachers, device, out, client, experiment, parent_id, base.seed)
            results.append(result)
            if result.status == FINISHED:
                shown = "  ".join(f"{k[5:]} {result.metrics[k]:.4f}" for k in metric_keys(attacks))
                print(f"[{i}/{len(configs)}] {method} seed {seed}: {shown}  "
                      f"({result.metrics['train_time_s']:.0f}s)", flush=True)
            else:
                print(f"[{i}/{len(configs)}] {method} seed {seed} FAILED: {result.error}", flush=True)
            summary = summarize(results, [m for m in methods if any(r.method == m for r in results)])
            table = markdown_table(summary, attacks, seeds, n_test, base.attack.epsilon, base.eval.clean_weight)
            files = write_results(out, results, summary, table)  # after every run: a cut-short comparison keeps its rows
    except BaseException:
        client.set_terminated(parent_id, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else FAILED)
        raise

    failed = [r for r in results if r.status == FAILED]
    summary_metrics = {f"{row['method']}/{key}": value for row in summary for key, value in row.items()
                       if key != "method" and isinstance(value, (int, float)) and not math.isnan(value)}
    tracking.log_metrics(client, parent_id, summary_metrics, step=0)
    tracking.log_artifacts(client, parent_id, [*files, out / "config.yaml"])
    tracking.set_tags(client, parent_id, {"compare.failed_runs": str(len(failed))})
    client.set_terminated(parent_id, FAILED if failed else FINISHED)
    print(f"\n{table}\nfiles in {out}: comparison.csv comparison_summary.csv comparison.md")
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed: "
              + "; ".join(f"{r.method} seed {r.seed}: {r.error}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(main)
