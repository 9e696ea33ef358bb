"""What the ``teachers`` command does: train the teachers a config names that do not exist yet, and measure each
on the test split (docs/cli.md, "teachers"). Loading, checking and training teachers: tune_mtard/teachers/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tune_mtard.config import Config, load_config
from tune_mtard.data import DataBundle, load_data
from tune_mtard.errors import ConfigError
from tune_mtard.perf import resolve_device
from tune_mtard.teachers import ROLES, measure_accuracy, prepare_teachers


def teacher_accuracy(cfg: Config, model: nn.Module, data: DataBundle, device: torch.device) -> dict[str, float]:
    """Clean and PGD accuracy on the test split, as the ``teachers`` command reports it."""
    clean, robust = measure_accuracy(cfg, model, data.test, device)
    return {"clean_acc": clean, "pgd_acc": robust}


@dataclass
class TeachersRequest:
    """What the ``teachers`` command asks for (docs/cli.md, "teachers")."""

    config: str
    roles: str = "clean,robust"
    overrides: list[str] = field(default_factory=list)
    progress: bool = False


@dataclass
class TeacherReport:
    role: str
    arch: str
    status: str  # "exists" or "trained"
    path: Path
    clean_acc: float
    pgd_acc: float
    pgd_steps: int
    n: int  # test examples measured on
    epsilon: float
    val_clean_acc: float
    val_pgd_acc: float
    mapping: str  # what loading mapped of the file's keys


def train_missing(request: TeachersRequest) -> list[TeacherReport]:
    """The ``teachers`` command: train the named teachers that do not exist yet, and measure each on the test split."""
    roles = [r.strip() for r in request.roles.split(",") if r.strip()]
    for role in roles:
        if role not in ROLES:
            raise ConfigError("--roles", f"unknown role {role!r} (valid: {', '.join(ROLES)})")
    cfg = load_config(request.config, request.overrides, check_files=False).run_config()
    data = load_data(cfg)
    device = resolve_device(cfg.device)
    teachers = prepare_teachers(cfg, data, device, progress=request.progress, roles=roles, train_missing=True)
    reports = []
    for role, teacher in teachers.teachers.items():
        accuracy = teacher_accuracy(cfg, teacher.model.to(device), data, device)
        reports.append(TeacherReport(role, teacher.arch, "trained" if teacher.trained else "exists", teacher.path,
                                     accuracy["clean_acc"], accuracy["pgd_acc"], cfg.eval.pgd_steps,
                                     min(cfg.eval.n_examples, len(data.test)), cfg.attack.epsilon,
                                     teacher.quality["val_clean_acc"], teacher.quality["val_pgd_acc"], teacher.mapping))
    return reports

