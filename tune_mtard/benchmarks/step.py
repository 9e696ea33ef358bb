"""``bench step``: calls per second of the B-MTARD step (``Trainer.train_step``) against its parts and a
reference step (docs/performance.md).

Timed: the B-MTARD step, a PGD-AT step with the same student, attack and batch, each teacher's forward
alone on its own input, one student train-mode forward/backward, those parts run back to back, and a
reference step written the way the authors' script is (fp32, python-float balancing from ``.item()``
every step). Timings are medians of repeated windows after warm-up; every round times every variant back
to back, so the ratios (``bmtard_over_floor``, ``bmtard_over_reference``, ...) are medians of ratios
taken under the same load. Teachers have random weights: their cost does not depend on them. Imports
torch and the training core only, so it runs where the orchestration stack is not installed.
"""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune_mtard.benchmarks.machine import StepTimer, machine_info, machine_line, training_setup, training_setup_line
from tune_mtard.benchmarks.reference_step import ReferenceStep
from tune_mtard.config import Config
from tune_mtard.data import DataBundle, iterate_batches, load_data
from tune_mtard.engine import Trainer
from tune_mtard.errors import ConfigError
from tune_mtard.models import create_model
from tune_mtard.perf import resolve_device


def random_teachers(cfg: Config, data: DataBundle) -> dict[str, nn.Module]:
    """Both teachers of ``cfg`` with random weights (timing does not depend on them), in eval mode."""
    torch.manual_seed(cfg.seed)
    return {role: create_model(getattr(cfg.teachers, role).arch, data.num_classes, data.in_channels)
            .eval().requires_grad_(False) for role in ("clean", "robust")}


def first_batch(data: DataBundle, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data.train) < batch_size:
        raise ConfigError("--batch-size", f"the training split has only {len(data.train)} examples")
    return next(iterate_batches(data.train, batch_size, shuffle=False, device=device))


def bench_step(cfg: Config, batch_size: int | None, repeats: int, window_s: float, warmup: int,
               data: DataBundle | None = None) -> dict[str, Any]:
    """The figures of ``bench step``, on ``data`` (default: the config's dataset)."""
    cfg = cfg.run_config()
    if batch_size is not None:
        cfg = cfg.with_values({"data.batch_size": batch_size})
    device = resolve_device(cfg.device)
    if data is None:
        data = load_data(cfg)
    x, y = first_batch(data, cfg.data.batch_size, device)

    teachers = random_teachers(cfg, data)
    # The reference runs as the authors' script does: its own NCHW fp32 copies of the same initial models.
    reference_teachers = {role: copy.deepcopy(t).to(device) for role, t in teachers.items()}
    bmtard = Trainer(cfg.with_values({"method": "b-mtard"}), data, teachers, device)
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
    extra_model = torch.compile(extra_student, dynamic=False) if pgdat.perf.compile else extra_student

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
        **training_setup(cfg, data, device, bmtard.perf),
        "repeats": repeats, "calls_per_window": timer.calls,
        "ms_per_call": {name: 1000 * s for name, s in median_s.items()},
        "steps_per_s": {name: 1 / s for name, s in median_s.items()},
        "ms_per_call_all_windows": {name: [round(1000 * v, 4) for v in s] for name, s in timer.seconds.items()},
        **{f"bmtard_over_{name}": statistics.median(values) for name, values in ratios.items()},
        "machine": machine_info(device, load_before),
    }


def print_step(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"B-MTARD step benchmark: {result['dataset']}, {training_setup_line(result)}")
    print(machine_line(m))
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
