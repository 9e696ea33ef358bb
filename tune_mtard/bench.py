"""Benchmarks: ``python -m tune_mtard.bench step|platform|search|memory`` (README, Performance).

* ``step``: calls per second of the B-MTARD step (``Trainer.train_step``), of a PGD-AT step with the same
  student, attack and batch, of each teacher's forward alone on its own input, of one student train-mode
  forward/backward, of those parts run back to back, and of a reference step written the way the authors'
  script is (fp32, python-float balancing from ``.item()`` every step). Timings are medians of repeated
  windows after warm-up; every round times every variant back to back, so the ratios
  (``bmtard_over_floor``, ``bmtard_over_reference``, ...) are medians of ratios taken under the same load.
* ``platform``: one short trial run bare through :class:`~tune_mtard.engine.Trainer` in a fresh process and
  as a Ray Tune trial of the real trainable, searcher, scheduler and MLflow recorder; ``platform_overhead``
  is the extra wall time of the trial's training loop as a fraction of it. Ray's startup (once per search)
  and the trial's launch cost (once per trial) are reported apart.
* ``search``: the same search with ASHA and with every trial run to the end (FIFO):
  ``asha_epoch_fraction`` and ``asha_best_gap``.
* ``memory``: one trial's GPU memory estimated on the CPU, and how many trials share a card.

Every command prints a table and writes JSON with ``--out FILE``; the machine (CPU model, cores, torch
threads, load average, GPU) is part of the JSON. Teachers of ``step`` and ``platform`` have random
weights: their cost does not depend on them. ``search`` uses the config's real teachers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform as platform_module
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.cli import ArgumentParser, add_set_flag, run
from tune_mtard.config import Config, load_config
from tune_mtard.data import DataBundle, iterate_batches, load_data
from tune_mtard.engine import Trainer, resolve_device
from tune_mtard.errors import ConfigError
from tune_mtard.models import create_model

DEFAULT_SPACE = "digits.yaml"


# ------------------------------------------------------------------------------------------ machine


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where the figures come from: CPU model, cores, torch threads, load average, GPU."""
    cpu = platform_module.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "gpu": None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ------------------------------------------------------------------------------- the reference step


def reference_kl(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The authors' ``kl_loss(a, b) = -a*b + log(b + 1e-5)*b``, averaged over batch and classes."""
    return (-log_q * p + torch.log(p + 1e-5) * p).mean()


class ReferenceStep:
    """B-MTARD as the authors' training script writes it: fp32, NCHW, separate passes, temperatures and
    weights held as python floats and updated from ``.item()`` values every step (a host sync per update).

    It computes what SPEC section 4 does (up to float rounding), so the benchmark compares like with like.
    """

    def __init__(self, cfg: Config, student: nn.Module, teacher_clean: nn.Module, teacher_robust: nn.Module):
        b, t = cfg.balance, cfg.train
        self.cfg = cfg
        self.student = student
        self.teacher_clean = teacher_clean.eval()
        self.teacher_robust = teacher_robust.eval()
        self.optimizer = torch.optim.SGD(student.parameters(), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        self.temp_adv = self.temp_nat = min(max(b.tau_init, b.tau_min), b.tau_max)
        self.weight = {"adv_loss": 0.5, "nat_loss": 0.5}
        self.init_loss_adv: float | None = None
        self.init_loss_nat: float | None = None

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.cfg.attack
        self.student.eval()
        x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device).detach()
        for _ in range(a.steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_ce = F.cross_entropy(self.student(x_adv), y, reduction="sum")
            grad = torch.autograd.grad(loss_ce, [x_adv])[0]
            x_adv = x_adv.detach() + a.step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - a.epsilon), x + a.epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        self.student.train()
        return x_adv

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        b = self.cfg.balance
        self.student.train()
        self.optimizer.zero_grad()
        x_adv = self.attack(x, y)
        student_adv_logits = self.student(x_adv)
        student_nat_logits = self.student(x)
        with torch.no_grad():
            teacher_adv_logits = self.teacher_robust(x_adv)
            teacher_nat_logits = self.teacher_clean(x)
        p_adv = F.softmax(teacher_adv_logits / self.temp_adv, dim=1)
        p_nat = F.softmax(teacher_nat_logits / self.temp_nat, dim=1)
        kl_loss_adv = reference_kl(F.log_softmax(student_adv_logits, dim=1), p_adv)
        kl_loss_nat = reference_kl(F.log_softmax(student_nat_logits, dim=1), p_nat)

        entropy_adv = (p_adv * torch.log(p_adv + 1e-5)).mean().item()
        entropy_nat = (p_nat * torch.log(p_nat + 1e-5)).mean().item()
        if b.entropy:
            self.temp_adv -= b.tau_lr * _sign(entropy_adv / entropy_nat - 1)
            self.temp_nat -= b.tau_lr * _sign(entropy_nat / entropy_adv - 1)
            self.temp_adv = min(max(self.temp_adv, b.tau_min), b.tau_max)
            self.temp_nat = min(max(self.temp_nat, b.tau_min), b.tau_max)

        loss_adv, loss_nat = kl_loss_adv.item(), kl_loss_nat.item()
        if self.init_loss_adv is None:
            self.init_loss_adv, self.init_loss_nat = loss_adv, loss_nat
        if b.loss:
            rate_adv = (loss_adv / self.init_loss_adv) ** b.beta
            rate_nat = (loss_nat / self.init_loss_nat) ** b.beta
            w_adv = self.weight["adv_loss"] - b.weight_lr * (self.weight["adv_loss"] - rate_adv / (rate_adv + rate_nat))
            w_nat = self.weight["nat_loss"] - b.weight_lr * (self.weight["nat_loss"] - rate_nat / (rate_adv + rate_nat))
            w_adv, w_nat = max(w_adv, 0.0), max(w_nat, 0.0)
            self.weight = {"adv_loss": w_adv / (w_adv + w_nat), "nat_loss": w_nat / (w_adv + w_nat)}

        total_loss = self.weight["adv_loss"] * kl_loss_adv + self.weight["nat_loss"] * kl_loss_nat
        total_loss.backward()
        self.optimizer.step()
        return {"loss_adv": loss_adv, "loss_nat": loss_nat, "entropy_adv": entropy_adv, "entropy_nat": entropy_nat,
                "tau_adv": self.temp_adv, "tau_nat": self.temp_nat, "w_adv": self.weight["adv_loss"],
                "w_nat": self.weight["nat_loss"]}


def _sign(value: float) -> float:
    return float((value > 0) - (value < 0))


# ---------------------------------------------------------------------------------------------- step


def random_teachers(cfg: Config, data: DataBundle) -> dict[str, nn.Module]:
    """Both teachers of ``cfg`` with random weights (timing does not depend on them), in eval mode."""
    torch.manual_seed(cfg.seed)
    return {role: create_model(getattr(cfg.teachers, role).arch, data.num_classes, data.in_channels)
            .eval().requires_grad_(False) for role in ("clean", "robust")}


def _first_batch(data: DataBundle, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data.train) < batch_size:
        raise ConfigError("--batch-size", f"the training split has only {len(data.train)} examples")
    return next(iterate_batches(data.train, batch_size, shuffle=False, device=device))


class StepTimer:
    """Times named callables in rounds: each round runs every callable for its own window of calls."""

    def __init__(self, device: torch.device, window_s: float, warmup: int):
        self.sync = _synchronizer(device)
        self.window_s = window_s
        self.warmup = warmup
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {}

    def calibrate(self, name: str, fn: Callable[[], Any]) -> None:
        """Warm up and choose the window so one window of ``name`` lasts about ``window_s``."""
        per_call = []
        for _ in range(self.warmup):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            per_call.append(time.perf_counter() - start)
        self.calls[name] = max(3, min(100_000, round(self.window_s / max(statistics.median(per_call), 1e-7))))
        self.seconds[name] = []

    def window(self, name: str, fn: Callable[[], Any]) -> float:
        """One timed window; what ``fn`` returns is kept and stacked to the host at the end, as an epoch is."""
        n = self.calls[name]
        kept = []
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            kept.append(fn())
        rows = [r for r in kept if isinstance(r, torch.Tensor)]
        if rows:
            torch.stack(rows).cpu()
        self.sync()
        per_call = (time.perf_counter() - start) / n
        self.seconds[name].append(per_call)
        return per_call


def bench_step(cfg: Config, batch_size: int | None, repeats: int, window_s: float, warmup: int) -> dict[str, Any]:
    cfg = cfg.run_config()
    if batch_size is not None:
        cfg = cfg.with_values({"data.batch_size": batch_size})
    device = resolve_device(cfg.device)
    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    x, y = _first_batch(data, cfg.data.batch_size, device)

    teachers = random_teachers(cfg, data)
    # The reference runs as the authors' script does: its own NCHW fp32 copies of the same initial models.
    reference_teachers = {role: copy.deepcopy(t).to(device) for role, t in teachers.items()}
    bmtard = Trainer(cfg.with_values({"method": "b-mtard"}), data, teachers["clean"], teachers["robust"], device)
    pgdat = Trainer(cfg.with_values({"method": "pgd-at"}), data, device=device)
    reference_student = copy.deepcopy(bmtard.student).to(memory_format=torch.contiguous_format)
    reference = ReferenceStep(cfg, reference_student, reference_teachers["clean"], reference_teachers["robust"])

    x_in = bmtard._to_input(x)
    x_adv = bmtard.objective.adversarial(x_in, y)
    autocast = bmtard.objective.autocast

    def teacher_forward(teacher: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
        def forward() -> None:
            with torch.no_grad(), autocast():
                teacher(inputs)
        return forward

    extra_student = copy.deepcopy(pgdat.student)
    extra_model = torch.compile(extra_student) if pgdat.perf.compile else extra_student

    def student_forward_backward() -> None:
        with autocast():
            logits = extra_model(x_in)
        F.cross_entropy(logits.float(), y).backward()
        for p in extra_student.parameters():
            p.grad = None

    teacher_forwards = (teacher_forward(bmtard.objective.teacher_clean, x_in),
                        teacher_forward(bmtard.objective.teacher_robust, x_adv))

    def compute_in_sequence() -> torch.Tensor:
        """B-MTARD's compute without its distillation losses and balancing, run back to back as in the step
        (timed apart, each part finds its weights hot in cache; in the step they are not)."""
        row = pgdat.train_step(x, y)
        for forward in teacher_forwards:
            forward()
        student_forward_backward()
        return row

    variants: dict[str, Callable[[], Any]] = {
        "bmtard_step": lambda: bmtard.train_step(x, y),
        "pgdat_step": lambda: pgdat.train_step(x, y),
        "teacher_clean_forward": teacher_forwards[0],
        "teacher_robust_forward": teacher_forwards[1],
        "student_forward_backward": student_forward_backward,
        "compute_in_sequence": compute_in_sequence,
        "reference_step": lambda: reference(x, y),
    }
    timer = StepTimer(device, window_s, warmup)
    load_before = os.getloadavg()
    for name, fn in variants.items():
        timer.calibrate(name, fn)
    ratios: dict[str, list[float]] = {"floor": [], "floor_plus_student_pass": [], "compute_in_sequence": [],
                                      "reference": []}
    for _ in range(repeats):
        t = {name: timer.window(name, fn) for name, fn in variants.items()}
        floor = t["pgdat_step"] + t["teacher_clean_forward"] + t["teacher_robust_forward"]
        ratios["floor"].append(t["bmtard_step"] / floor)
        ratios["floor_plus_student_pass"].append(t["bmtard_step"] / (floor + t["student_forward_backward"]))
        ratios["compute_in_sequence"].append(t["bmtard_step"] / t["compute_in_sequence"])
        ratios["reference"].append(t["bmtard_step"] / t["reference_step"])
    median_s = {name: statistics.median(s) for name, s in timer.seconds.items()}
    return {
        "command": "step",
        "config": cfg.name, "dataset": cfg.data.dataset, "student": cfg.student.arch,
        "teachers": {"clean": cfg.teachers.clean.arch, "robust": cfg.teachers.robust.arch},
        "batch_size": cfg.data.batch_size, "attack_steps": cfg.attack.steps, "device": str(device),
        "perf": {"bf16": bmtard.perf.bf16, "channels_last": bmtard.perf.channels_last,
                 "compile": bmtard.perf.compile, "data_on_device": bmtard.perf.data_on_device},
        "repeats": repeats, "calls_per_window": timer.calls,
        "ms_per_call": {name: 1000 * s for name, s in median_s.items()},
        "steps_per_s": {name: 1 / s for name, s in median_s.items()},
        "ms_per_call_all_windows": {name: [round(1000 * v, 4) for v in s] for name, s in timer.seconds.items()},
        **{f"bmtard_over_{name}": statistics.median(values) for name, values in ratios.items()},
        "machine": dict(machine_info(device), load_avg_before=[round(v, 2) for v in load_before]),
    }


def print_step(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"B-MTARD step benchmark: {result['dataset']}, student {result['student']}, teachers "
          f"{result['teachers']['clean']} / {result['teachers']['robust']}, batch {result['batch_size']}, "
          f"{result['attack_steps']}-step PGD, {result['device']}, perf {result['perf']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, GPU {m['gpu']}, "
          f"load {m['load_avg_before']} -> {m['load_avg_1_5_15']}")
    print(f"{'':28s} {'ms/call':>10s} {'calls/s':>10s}   (median of {result['repeats']} windows)")
    for name, ms in result["ms_per_call"].items():
        print(f"{name:28s} {ms:10.3f} {result['steps_per_s'][name]:10.1f}")
    print("(medians of the ratios of each round)")
    print(f"bmtard_over_floor        B-MTARD / (PGD-AT + teacher forwards)              "
          f"{result['bmtard_over_floor']:.3f}")
    print(f"  ... + one more student forward/backward in the floor                      "
          f"{result['bmtard_over_floor_plus_student_pass']:.3f}")
    print(f"  ... those parts run back to back, as in the step (compute_in_sequence)    "
          f"{result['bmtard_over_compute_in_sequence']:.3f}")
    print(f"bmtard_over_reference    B-MTARD / authors'-style step (< 1 = faster)       "
          f"{result['bmtard_over_reference']:.3f}")


# ------------------------------------------------------------------------------------------ platform


def _timed_trial(sampled: dict[str, Any], *, base: Config, data: DataBundle,
                 teachers: dict[str, tuple[str, dict[str, torch.Tensor]]], timing_file: str) -> None:
    """The real trainable, with its wall time written where the benchmark reads it."""
    from trainables.bmtard import train_bmtard

    start, cpu_start = time.perf_counter(), time.process_time()
    train_bmtard(sampled, base=base, data=data, teachers=teachers)
    Path(timing_file).write_text(json.dumps({"trial_loop_s": time.perf_counter() - start,
                                             "trial_loop_cpu_s": time.process_time() - cpu_start}))


def _bare_trial(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
                threads: int) -> dict[str, float]:
    """What the trainable does, without Ray or MLflow: wall and CPU seconds, sum of epoch_time_s."""
    from trainables.bmtard import teacher_from_weights

    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    clean = teacher_from_weights(*teachers["clean"], data)
    robust = teacher_from_weights(*teachers["robust"], data)
    history = Trainer(cfg, data, clean, robust).fit()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"bare_s": wall, "bare_cpu_s": cpu, "bare_epoch_time_sum_s": sum(m["epoch_time_s"] for m in history)}


def _bare_run(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
              threads: int) -> dict[str, float]:
    """:func:`_bare_trial` in a fresh process, as a trial's worker is: both pay the same one-off costs
    (torch.optim's first call imports torch._dynamo, seconds on a loaded machine)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_bare_trial, cfg, data, teachers, threads).result()


@contextlib.contextmanager
def _driver_time_per_result(seconds: dict[str, float]):
    """Adds up the driver's time in the MLflow recorder's and the Optuna searcher's per-result hooks (over
    all of a trial's reports): a function trainable waits after each ``tune.report`` until the driver has
    processed that result."""
    from tune_mtard.tuning import MlflowTrialRecorder, PrunedAwareOptunaSearch

    hooks = {"driver_mlflow_s": MlflowTrialRecorder, "driver_optuna_s": PrunedAwareOptunaSearch}
    originals = {name: cls.on_trial_result for name, cls in hooks.items()}

    def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def hook(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return hook

    for name, cls in hooks.items():
        seconds[name] = 0.0
        cls.on_trial_result = timed(name, originals[name])
    try:
        yield
    finally:
        for name, cls in hooks.items():
            cls.on_trial_result = originals[name]


def _ray_trial(cfg: Config, data: DataBundle, teachers: dict[str, tuple[str, dict[str, torch.Tensor]]],
               folder: Path) -> dict[str, float]:
    """One trial through the search's own Tuner (searcher, scheduler, MLflow recorder, checkpoints)."""
    from ray import tune

    from tune_mtard import tracking
    from tune_mtard.search import new_tuner, parent_run

    s = cfg.search
    folder.mkdir(parents=True)
    timing_file = folder / "trial_timing.json"
    client = tracking.client_for(cfg.mlflow.tracking_uri)
    experiment_id = tracking.experiment_id(client, cfg.mlflow.experiment)
    parent_run_id = parent_run(client, cfg, folder, experiment_id, resume=False)
    trainable = tune.with_resources(
        tune.with_parameters(_timed_trial, base=cfg.run_config(), data=data, teachers=teachers,
                             timing_file=str(timing_file)),
        {"cpu": s.resources.cpu, "gpu": s.resources.gpu},
    )
    tuner = new_tuner(cfg, trainable, folder, experiment_id, parent_run_id, quiet=True)
    driver: dict[str, float] = {}
    with _driver_time_per_result(driver):
        start = time.perf_counter()
        grid = tuner.fit()
        fit_wall = time.perf_counter() - start
    client.set_terminated(parent_run_id, "FINISHED")
    result = grid[0]
    if result.error:
        raise RuntimeError(f"the benchmark trial failed: {result.error}")
    epoch_times = result.metrics_dataframe["epoch_time_s"].sum()
    return dict(json.loads(timing_file.read_text()), tuner_fit_s=fit_wall, trial_epoch_time_sum_s=float(epoch_times),
                **driver)


def bench_platform(cfg: Config, epochs: int, repeats: int) -> dict[str, Any]:
    import ray

    if cfg.search is None:
        raise ConfigError("--config", "platform needs a search space file (its search.resources)")
    cfg = cfg.with_values({"train.epochs": epochs, "search.num_samples": 1, "search.scheduler.type": "fifo",
                           "search.sampler.n_startup_trials": 1})
    device = resolve_device(cfg.device)
    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    teachers = {role: (getattr(cfg.teachers, role).arch, model.state_dict())
                for role, model in random_teachers(cfg, data).items()}
    threads = max(1, int(cfg.search.resources.cpu))
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tune-mtard-bench-") as tmp:
        start = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False, configure_logging=True)
        ray_startup = time.perf_counter() - start
        try:
            for i in range(repeats):
                trial_cfg = cfg.with_values({"search.storage": str(Path(tmp) / "tune"), "name": f"bench-platform-{i}",
                                             "mlflow.tracking_uri": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                                             "mlflow.experiment": "bench-platform"})
                # Alternate which goes first, so a change of load does not always favour the same one.
                if i % 2 == 0:
                    bare = _bare_run(cfg.run_config(), data, teachers, threads)
                trial = _ray_trial(trial_cfg, data, teachers, Path(tmp) / "tune" / trial_cfg.name)
                if i % 2 == 1:
                    bare = _bare_run(cfg.run_config(), data, teachers, threads)
                runs.append(dict(trial, **bare))
        finally:
            ray.shutdown()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    overheads = [(r["trial_loop_s"] - r["bare_s"]) / r["trial_loop_s"] for r in runs]
    cpu_overheads = [(r["trial_loop_cpu_s"] - r["bare_cpu_s"]) / r["trial_loop_cpu_s"] for r in runs]
    end_to_end = [(r["tuner_fit_s"] - r["bare_s"]) / r["tuner_fit_s"] for r in runs]
    return {
        "command": "platform", "config": cfg.name, "dataset": cfg.data.dataset, "epochs": epochs,
        "reports": math.ceil(epochs / cfg.eval.every), "threads_per_trial": threads, "device": str(device),
        "repeats": repeats, "runs": runs,
        "bare_s": median("bare_s"), "trial_loop_s": median("trial_loop_s"), "tuner_fit_s": median("tuner_fit_s"),
        "platform_overhead": statistics.median(overheads),
        "platform_overhead_cpu": statistics.median(cpu_overheads),
        "driver_mlflow_s": median("driver_mlflow_s"),
        "driver_optuna_s": median("driver_optuna_s"),
        "trial_launch_s": statistics.median(r["tuner_fit_s"] - r["trial_loop_s"] for r in runs),
        "platform_overhead_end_to_end": statistics.median(end_to_end),
        "ray_startup_s": ray_startup,
        "machine": dict(machine_info(device), load_avg_before=[round(v, 2) for v in load_before]),
    }


def print_platform(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"platform benchmark: {result['dataset']}, {result['epochs']} epochs, {result['reports']} reports, "
          f"{result['threads_per_trial']} thread(s) per trial, {result['device']}, median of {result['repeats']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu']}, "
          f"load {m['load_avg_before']} -> {m['load_avg_1_5_15']}")
    print(f"bare Trainer (teachers + Trainer + fit)            {result['bare_s']:8.2f} s")
    print(f"Ray Tune trial, inside the trainable               {result['trial_loop_s']:8.2f} s")
    print(f"Ray Tune trial, Tuner.fit end to end               {result['tuner_fit_s']:8.2f} s")
    print(f"platform_overhead (trial loop vs bare, wall)       {result['platform_overhead']:8.3f}")
    print(f"  the same in CPU seconds of the trial's process     {result['platform_overhead_cpu']:8.3f}")
    print(f"  driver's MLflow / Optuna work on the reports     {result['driver_mlflow_s']:8.2f} s / "
          f"{result['driver_optuna_s']:.2f} s (the trial waits for it)")
    print(f"trial launch and wrap-up (fit - trial loop)        {result['trial_launch_s']:8.2f} s per trial")
    print(f"end-to-end overhead ((fit - bare) / fit)           {result['platform_overhead_end_to_end']:8.3f}")
    print(f"Ray startup (once per search)                      {result['ray_startup_s']:8.2f} s")


# -------------------------------------------------------------------------------------------- search


def _fifo_fingerprint(cfg: Config) -> dict[str, Any]:
    """What decides a FIFO search's outcome: the whole config but its name, storage, records and scheduler."""
    raw = cfg.to_dict(with_search=True)
    for key in ("name", "mlflow"):
        raw.pop(key)
    for key in ("storage", "scheduler"):
        raw["search"].pop(key)
    return json.loads(json.dumps(raw, default=str))


def bench_search(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from tune_mtard.search import build_search_config, experiment_dir, run_search
    from tune_mtard.teachers import prepare_teachers

    load_before = os.getloadavg()
    outcomes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tune-mtard-bench-") as tmp:
        storage = args.storage or str(Path(tmp) / "tune")
        configs = {}
        for scheduler in ("asha", "fifo"):
            search_args = argparse.Namespace(
                space=args.config, num_samples=args.num_samples, max_epochs=args.max_epochs, storage=storage,
                tracking_uri=f"sqlite:///{Path(storage) / 'mlflow.db'}",
                overrides=list(args.overrides) + [f"search.scheduler.type={scheduler}"],
            )
            cfg = build_search_config(search_args)
            configs[scheduler] = cfg.with_values({"name": f"{cfg.name}-{scheduler}"})
        fingerprint = _fifo_fingerprint(configs["fifo"])
        if args.fifo_from is not None:
            earlier = _read_earlier_search(args.fifo_from)
            if earlier.get("fifo_fingerprint") != fingerprint:
                raise ConfigError("--fifo-from", f"{args.fifo_from} ran another config, space, sample count or epochs")
            outcomes["fifo"] = dict(earlier["fifo"], reused_from=str(Path(args.fifo_from).resolve()))
            del configs["fifo"]

        # The teachers are trained (or found) once, before any search is timed.
        cfg = configs["asha"].run_config()
        start = time.perf_counter()
        data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
        prepare_teachers(cfg, data, resolve_device(cfg.device), progress=False)
        teachers_s = time.perf_counter() - start
        start = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False, configure_logging=True)
        ray_startup = time.perf_counter() - start
        try:
            for scheduler, cfg in configs.items():
                start = time.perf_counter()
                run_search(cfg, quiet=True)
                summary = json.loads((experiment_dir(cfg) / "summary.json").read_text())
                outcomes[scheduler] = dict(summary, bench_wall_s=time.perf_counter() - start)
        finally:
            ray.shutdown()
    cfg = configs["asha"]
    asha, fifo = outcomes["asha"], outcomes["fifo"]
    return {
        "command": "search", "config": cfg.name.removesuffix("-asha"), "dataset": cfg.data.dataset,
        "num_samples": cfg.search.num_samples, "epochs": cfg.train.epochs,
        "grace_period": cfg.search.scheduler.grace_period, "reduction_factor": cfg.search.scheduler.reduction_factor,
        "asha": asha, "fifo": fifo, "fifo_fingerprint": fingerprint,
        "asha_epoch_fraction": asha["epochs_spent"] / fifo["epochs_full_budget"],
        "asha_best_gap": fifo["best_val_w_robust_acc"] - asha["best_val_w_robust_acc"],
        "ray_startup_s": ray_startup, "teachers_s": teachers_s,
        "machine": dict(machine_info(resolve_device(cfg.device)), load_avg_before=[round(v, 2) for v in load_before]),
    }


def _read_earlier_search(path: str) -> dict[str, Any]:
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("--fifo-from", f"cannot read {path}: {exc}") from None
    if not isinstance(earlier, dict) or earlier.get("command") != "search" or "fifo" not in earlier:
        raise ConfigError("--fifo-from", f"{path} is not the JSON of a `bench search --out`")
    return earlier


def print_search(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"search benchmark: {result['dataset']}, {result['num_samples']} samples, {result['epochs']} epochs, "
          f"ASHA grace {result['grace_period']} reduction {result['reduction_factor']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_avg_before']} -> {m['load_avg_1_5_15']}")
    print(f"{'':6s} {'epochs':>8s} {'of':>6s} {'best val W-Robust':>18s} {'wall s':>8s}")
    for name in ("asha", "fifo"):
        r = result[name]
        reused = "  (reused)" if "reused_from" in r else ""
        print(f"{name:6s} {r['epochs_spent']:8d} {r['epochs_full_budget']:6d} "
              f"{r.get('best_val_w_robust_acc', float('nan')):18.4f} {r['bench_wall_s']:8.0f}{reused}")
    print(f"asha_epoch_fraction {result['asha_epoch_fraction']:.3f}   asha_best_gap (FIFO - ASHA) "
          f"{result['asha_best_gap']:+.4f}")


# -------------------------------------------------------------------------------------------- memory

# (channels, side, classes, images in all splits) of each dataset, so no dataset need be on disk.
DATASET_SHAPES = {
    "digits": (1, 8, 10, 1797), "synthetic": (3, 16, 10, 2500), "cifar10": (3, 32, 10, 60000),
    "cifar100": (3, 32, 100, 60000), "svhn": (3, 32, 10, 99289), "tiny-imagenet": (3, 64, 200, 110000),
}
GIB = 2**30
# A CUDA context with torch's kernels loaded, cuBLAS/cuDNN workspaces and allocator slack, per trial process.
# Assumed (typical of torch on an H100), not measured here.
CUDA_PROCESS_OVERHEAD_GIB = 1.0
# Leave this share of the card unplanned (fragmentation, evaluation batches, spikes).
GPU_HEADROOM = 0.1


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor, autocast_bf16: bool = False) -> int:
    """Bytes autograd keeps for the backward of one train-mode forward, parameters themselves not counted.

    Tensors are told apart by storage (by object on the meta device, which has no storage to compare).
    """
    def key(t: torch.Tensor) -> int:
        return id(t) if t.is_meta else t.untyped_storage().data_ptr()

    parameters = {key(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if key(t) not in parameters:
            saved[key(t)] = t.numel() * t.element_size() if t.is_meta else t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x)
    return sum(saved.values())


def _largest_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """The largest output of any module in an eval-mode forward without grad (on the meta device: no compute)."""
    largest = 0

    def hook(module, args, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return largest


def bench_memory(cfg: Config, batch_size: int | None, gpu_gib: float) -> dict[str, Any]:
    """GPU memory of one B-MTARD trial, estimated on the CPU, and how many trials fit on one card.

    fp32: exact autograd-saved bytes from a forward on the meta device. bf16: measured on the CPU under
    bf16 autocast at batch sizes 1 and 2 and extrapolated linearly (saved bytes are affine in the batch).
    """
    if cfg.data.dataset not in DATASET_SHAPES:
        raise ConfigError("data.dataset", f"no input shape known for {cfg.data.dataset!r}")
    channels, side, classes, n_images = DATASET_SHAPES[cfg.data.dataset]
    batch = batch_size or cfg.data.batch_size

    def build(arch: str, device: str) -> nn.Module:
        with torch.device(device):
            return create_model(arch, classes, channels)

    student = build(cfg.student.arch, "meta")
    teachers = {role: build(getattr(cfg.teachers, role).arch, "meta") for role in ("clean", "robust")}
    params = {"student": sum(p.numel() for p in student.parameters())}
    params.update({role: sum(p.numel() for p in t.parameters()) for role, t in teachers.items()})
    saved_fp32 = _saved_activation_bytes(student, torch.empty(batch, channels, side, side, device="meta"))
    torch.manual_seed(0)
    cpu_student = build(cfg.student.arch, "cpu")
    small = [_saved_activation_bytes(cpu_student, torch.rand(b, channels, side, side), True) for b in (1, 2)]
    saved_bf16 = small[0] + (small[1] - small[0]) * (batch - 1)
    teacher_peak = max(_largest_activation_bytes(t, torch.empty(batch, channels, side, side, device="meta"))
                       for t in teachers.values())

    data_bytes_on_device = n_images * (channels * side * side + 8)
    fixed = 4 * (3 * params["student"] + params["clean"] + params["robust"])  # weights, grads, momentum; teachers
    per_trial = {}
    for name, saved, teacher_act in (("fp32", saved_fp32, teacher_peak), ("bf16", saved_bf16, teacher_peak // 2)):
        # Peak while the two student graphs (s_adv, s_nat) wait for the backward and a teacher runs:
        # about three of its largest activations are alive at once.
        total = fixed + 2 * saved + 3 * teacher_act + data_bytes_on_device + CUDA_PROCESS_OVERHEAD_GIB * GIB
        per_trial[name] = {"gib": total / GIB, "trials_per_gpu": int((1 - GPU_HEADROOM) * gpu_gib * GIB // total)}
    return {
        "command": "memory", "config": cfg.name, "dataset": cfg.data.dataset, "batch_size": batch,
        "student": cfg.student.arch, "teachers": {r: getattr(cfg.teachers, r).arch for r in ("clean", "robust")},
        "params_millions": {k: v / 1e6 for k, v in params.items()},
        "weights_grads_momentum_gib": fixed / GIB,
        "student_saved_activations_gib": {"fp32": saved_fp32 / GIB, "bf16": saved_bf16 / GIB},
        "teacher_largest_activation_gib": teacher_peak / GIB,
        "dataset_on_device_gib": data_bytes_on_device / GIB,
        "assumed_cuda_process_overhead_gib": CUDA_PROCESS_OVERHEAD_GIB,
        "gpu_gib": gpu_gib, "per_trial": per_trial,
        "machine": machine_info(),
    }


def print_memory(result: dict[str, Any]) -> None:
    print(f"memory estimate of one B-MTARD trial: {result['dataset']}, batch {result['batch_size']}, student "
          f"{result['student']}, teachers {result['teachers']['clean']} / {result['teachers']['robust']}")
    p = result["params_millions"]
    print(f"parameters (M): student {p['student']:.2f}, clean teacher {p['clean']:.2f}, "
          f"robust teacher {p['robust']:.2f}")
    print(f"weights + grads + momentum + teachers      {result['weights_grads_momentum_gib']:7.2f} GiB")
    saved = result["student_saved_activations_gib"]
    print(f"student activations kept for backward      {saved['fp32']:7.2f} GiB fp32, "
          f"{saved['bf16']:.2f} GiB bf16 (x2: s_adv, s_nat)")
    print(f"largest teacher activation (fp32)          {result['teacher_largest_activation_gib']:7.2f} GiB")
    print(f"dataset on the device (uint8)              {result['dataset_on_device_gib']:7.2f} GiB")
    print(f"CUDA context etc. (assumed, not measured)  {result['assumed_cuda_process_overhead_gib']:7.2f} GiB")
    for name, r in result["per_trial"].items():
        share = 1 / max(r["trials_per_gpu"], 1)
        print(f"{name}: about {r['gib']:.1f} GiB per trial, {r['trials_per_gpu']} trials on a "
              f"{result['gpu_gib']:.0f} GiB card by memory (search.resources.gpu = {share:.2g})")


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tune_mtard.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{step,platform,search,memory}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=None,
                         help=f"run config or search space: a path, or a name in ./search_spaces/ or among the "
                              f"installed spaces (default: {DEFAULT_SPACE})")
        sub.add_argument("--out", default=None, help="write the figures as JSON to this file")
        add_set_flag(sub)
        return sub

    step = command("step", "steps/s of the B-MTARD step against PGD-AT + teacher forwards and a reference step")
    step.add_argument("--batch-size", type=int, default=None, help="batch size (default: data.batch_size)")
    step.add_argument("--repeats", type=int, default=7, help="timed windows per variant (median taken)")
    step.add_argument("--window-s", type=float, default=1.0, help="seconds per timed window")
    step.add_argument("--warmup", type=int, default=5, help="untimed calls per variant first")
    step.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads (default: search.resources.cpu, what one trial gets, "
                           "else torch's default)")
    plat = command("platform", "the same short trial bare and as a Ray Tune trial with MLflow logging")
    plat.add_argument("--epochs", type=int, default=3, help="epochs of the trial")
    plat.add_argument("--repeats", type=int, default=1, help="bare/trial pairs (median taken)")
    memory = command("memory", "GPU memory of one trial, estimated on the CPU, and how many trials share a card")
    memory.add_argument("--batch-size", type=int, default=None, help="batch size (default: data.batch_size)")
    memory.add_argument("--gpu-gib", type=float, default=80.0, help="memory of the card (default: 80)")
    search = command("search", "epochs and best W-Robust Acc of ASHA against running every trial to the end")
    search.add_argument("--num-samples", type=int, default=None, help="trials per search (search.num_samples)")
    search.add_argument("--max-epochs", type=int, default=None, help="shrink train.epochs")
    search.add_argument("--storage", default=None, help="keep the two searches here (default: a temp folder)")
    search.add_argument("--fifo-from", default=None, metavar="JSON",
                        help="reuse the FIFO search of an earlier `bench search --out JSON` with the same config, "
                             "samples and epochs (to compare ASHA settings against one full-budget search)")
    args = parser.parse_args(argv)

    for flag in ("batch_size", "repeats", "epochs", "num_samples", "max_epochs", "warmup", "threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}", "must be >= 1")
    if getattr(args, "window_s", 1.0) <= 0:
        raise ConfigError("--window-s", "must be > 0")
    if getattr(args, "gpu_gib", 1.0) <= 0:
        raise ConfigError("--gpu-gib", "must be > 0")
    from tune_mtard.search import resolve_space

    args.config = str(resolve_space(args.config or DEFAULT_SPACE))
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError("--out", f"folder {Path(args.out).parent} does not exist")

    if args.command == "step":
        cfg = load_config(args.config, args.overrides, check_files=False)
        threads = args.threads or (int(cfg.search.resources.cpu) if cfg.search is not None else None)
        if threads:
            torch.set_num_threads(max(1, threads))
        result = bench_step(cfg, args.batch_size, args.repeats, args.window_s, args.warmup)
        print_step(result)
    elif args.command == "platform":
        cfg = load_config(args.config, args.overrides, check_files=False)
        result = bench_platform(cfg, args.epochs, args.repeats)
        print_platform(result)
    elif args.command == "memory":
        cfg = load_config(args.config, args.overrides, check_files=False)
        result = bench_memory(cfg, args.batch_size, args.gpu_gib)
        print_memory(result)
    else:
        result = bench_search(args)
        print_search(result)
    if args.out is not None:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
