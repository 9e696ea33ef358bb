"""One full training run: ``python -m tune_mtard.train --config FILE [--out DIR] [--resume]``.

Writes ``DIR/metrics.json``, ``DIR/student.pt``, ``DIR/balance_trace.csv``, ``DIR/config.yaml`` (the
resolved config) and ``DIR/checkpoint.pt`` (the full loop state, every epoch), and logs one MLflow run.
A search space file works too: its ``search`` and ``space`` sections are ignored.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from tune_mtard.cli import ArgumentParser, add_set_flag, run
from tune_mtard.config import Config, absolute_tracking_uri, load_config, to_yaml
from tune_mtard.data import DataBundle, load_data
from tune_mtard.engine import EpochResult, Trainer, resolve_device
from tune_mtard.errors import ConfigError
from tune_mtard.evaluation import evaluate_attacks, w_robust_acc
from tune_mtard.models import save_checkpoint
from tune_mtard.teachers import prepare_teachers
from tune_mtard import tracking

CHECKPOINT = "checkpoint.pt"
RUN_ID_FILE = "mlflow_run_id"


def final_test_metrics(cfg: Config, model: torch.nn.Module, data: DataBundle, device: torch.device,
                       progress: bool = False) -> dict[str, float]:
    """``test_<attack>_acc`` for each of ``eval.final_attacks`` and ``test_w_robust_acc_<attack>`` for the robust ones."""
    e = cfg.eval
    test = data.test.head(e.final_n_examples) if e.final_n_examples else data.test
    x, y = test.floats().to(device), test.labels.to(device)
    names = list(dict.fromkeys(["clean"] + list(e.final_attacks)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        accs = evaluate_attacks(model, x, y, names, epsilon=cfg.attack.epsilon, num_classes=data.num_classes,
                                batch_size=e.batch_size, pgd_step_size=e.pgd_step_size, progress=progress)
    metrics = {f"test_{k}": v for k, v in accs.items()}
    for name in names:
        if name != "clean":
            metrics[f"test_w_robust_acc_{name}"] = w_robust_acc(accs["clean_acc"], accs[f"{name}_acc"], e.clean_weight)
    metrics["test_n_examples"] = len(test)
    return metrics


def final_val_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    last = history[-1] if history else {}
    return {k: last[k] for k in ("val_clean_acc", "val_robust_acc", "val_w_robust_acc") if k in last}


def _check_out(out: Path, resume: bool, cfg: Config) -> None:
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise ConfigError("--out", f"nothing to resume: no {CHECKPOINT} in {out}")
        saved = out / "config.yaml"
        if saved.is_file():
            previous = load_config(saved, check_files=False).flat()
            for key, value in cfg.flat().items():
                if key in ("train.epochs", "data.root", "teachers.cache_dir") or key.startswith("mlflow."):
                    continue  # where things are stored and logged may move; what is trained may not
                if previous.get(key) != value:
                    raise ConfigError(key, f"differs from the run being resumed ({previous.get(key)!r} -> {value!r})")
    elif out.exists() and any((out / name).exists() for name in (CHECKPOINT, "metrics.json")):
        raise ConfigError("--out", f"{out} already holds a run; pass --resume to continue it or choose another --out")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tune_mtard.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config (e.g. an exported best_config.yaml) or search space file")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
    add_set_flag(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: mlflow.tracking_uri)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides).run_config()
    if args.tracking_uri:
        cfg.mlflow.tracking_uri = absolute_tracking_uri(args.tracking_uri)
    out = Path(args.out or Path("runs") / cfg.name).resolve()
    _check_out(out, args.resume, cfg)
    if cfg.perf.threads:
        torch.set_num_threads(cfg.perf.threads)
    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    progress = not args.no_progress and sys.stderr.isatty()
    teachers = prepare_teachers(cfg, data, device, progress=progress)
    trainer = Trainer(cfg, data, teachers.get("clean"), teachers.get("robust"), device=device)
    if args.resume:
        try:
            trainer.load(out / CHECKPOINT)
        except Exception as exc:  # a torn or foreign file is bad input, not a crash
            raise ConfigError(str(out / CHECKPOINT), f"cannot resume from it: {str(exc).splitlines()[0]}") from None

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    client = tracking.client_for(cfg.mlflow.tracking_uri)
    run_id = _mlflow_run(client, cfg, out, args.resume)
    if args.resume:
        _log_missing_epochs(client, run_id, trainer.history)
    print(f"run {cfg.name}: {cfg.method.value} on {cfg.data.dataset}, {cfg.train.epochs} epochs on {device}; "
          f"output in {out}; MLflow run {run_id}")

    def on_epoch_end(t: Trainer, result: EpochResult) -> None:
        t.save(out / CHECKPOINT)
        if result.validated:
            tracking.log_metrics(client, run_id, {k: v for k, v in result.metrics.items() if k != "epoch"},
                                 step=result.epoch)
            m = result.metrics
            print(f"epoch {result.epoch:4d}  val clean {m['val_clean_acc']:.4f}  robust {m['val_robust_acc']:.4f}  "
                  f"w-robust {m['val_w_robust_acc']:.4f}  tau {m['tau_adv']:.3f}/{m['tau_nat']:.3f}  "
                  f"w {m['w_adv']:.3f}/{m['w_nat']:.3f}  {m['epoch_time_s']:.1f}s", flush=True)

    start = time.perf_counter()
    try:
        trainer.fit(on_epoch_end, progress=progress)
        trainer.student.eval()
        metrics: dict[str, Any] = final_val_metrics(trainer.history)
        metrics.update(final_test_metrics(cfg, trainer.model, data, device, progress=progress))
        metrics["epochs"] = trainer.epoch
        metrics["steps"] = trainer.step
        metrics["train_time_s"] = round(time.perf_counter() - start, 2)
        trainer.write_trace(out / "balance_trace.csv")
        save_checkpoint(trainer.student, out / "student.pt")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracking.plot_trace(out / "balance_trace.csv", out / "balance_trace.png")
        logged_at_last_epoch = trainer.history[-1] if trainer.history else {}
        tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items()
                                              if isinstance(v, (int, float)) and k not in logged_at_last_epoch},
                             step=trainer.epoch)
        tracking.log_artifacts(client, run_id, [out / "balance_trace.csv", out / "balance_trace.png",
                                                out / "config.yaml", out / "metrics.json"])
        tracking.log_artifacts(client, run_id, [out / "student.pt"], "model")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        trainer.write_trace(out / "balance_trace.csv")  # the steps done so far are never lost
        client.set_terminated(run_id, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise
    print(_summary(metrics, out))
    return 0


def _mlflow_run(client, cfg: Config, out: Path, resume: bool) -> str:
    """The run's MLflow run: reopened on resume (no duplicate run), created otherwise."""
    id_file = out / RUN_ID_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            pass
    experiment = tracking.experiment_id(client, cfg.mlflow.experiment)
    run_obj = client.create_run(experiment, run_name=cfg.name, tags={"tune_mtard.command": "train",
                                                                      "tune_mtard.out": str(out)})
    run_id = run_obj.info.run_id
    tracking.log_params(client, run_id, tracking.config_params(cfg))
    id_file.write_text(run_id)
    return run_id


def _log_missing_epochs(client, run_id: str, history: list[dict[str, float]]) -> None:
    """Log the epochs a killed run checkpointed but never logged (it died between the two), so none is lost."""
    logged = {m.step for m in client.get_metric_history(run_id, "val_w_robust_acc")}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if k != "epoch"},
                                 step=int(metrics["epoch"]))


def _summary(metrics: dict[str, Any], out: Path) -> str:
    lines = ["final metrics:"]
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isnan(value):
            lines.append(f"  {key:28s} {value:.4f}")
    lines.append(f"files in {out}: metrics.json student.pt balance_trace.csv config.yaml")
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
