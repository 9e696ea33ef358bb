"""Teachers: load them, or train the missing ones (clean: natural training; robust: PGD-AT or TRADES).

A teacher is a file (``teachers.<role>.checkpoint``), or ``auto``: trained once with its recipe through
the same run pipeline as the students and cached under ``teachers.cache_dir``, keyed by dataset, arch,
recipe and a hash of every setting that changes its weights (docs/methods.md, "Teachers").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tune_mtard.attacks import PGD, Clean
from tune_mtard.config import AUTO, Config, TeacherConfig
from tune_mtard.data import DataBundle
from tune_mtard.errors import ConfigError
from tune_mtard.evaluation import robust_accuracy
from tune_mtard.methods import METHODS
from tune_mtard.models import create_model, load_checkpoint
from tune_mtard.perf import resolve_device

ROLES = ("clean", "robust")
Log = Callable[[str], None]


def roles_for(methods: Iterable[str]) -> tuple[str, ...]:
    """The teacher roles that any of ``methods`` distils from, in :data:`ROLES` order."""
    needed = {role for method in methods for role in METHODS.get(method).teachers}
    return tuple(role for role in ROLES if role in needed)


def recipe_config(cfg: Config, role: str) -> Config:
    """The run config that trains teacher ``role``: its arch, recipe, epochs and lr in the same loop."""
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    return dataclasses.replace(
        cfg.run_config(),
        name=f"{cfg.name}-teacher-{role}",
        method=teacher.recipe,
        student=dataclasses.replace(cfg.student, arch=teacher.arch),
        train=dataclasses.replace(cfg.train, epochs=teacher.epochs, lr=teacher.lr, lr_milestones=[0.5, 0.75]),
        baselines=dataclasses.replace(cfg.baselines, trades_beta=teacher.trades_beta),
        eval=dataclasses.replace(cfg.eval, every=teacher.epochs),
    )


def recipe_key(cfg: Config, role: str) -> str:
    """Cache key of an ``auto`` teacher: dataset, arch, recipe and everything that changes its weights."""
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    r = recipe_config(cfg, role)
    recipe = {
        "dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction, "batch_size": cfg.data.batch_size,
        "arch": teacher.arch, "recipe": teacher.recipe, "epochs": teacher.epochs, "lr": teacher.lr,
        "trades_beta": teacher.trades_beta, "seed": cfg.seed,
        "attack": None if teacher.recipe == "natural" else dataclasses.asdict(cfg.attack),
        "momentum": r.train.momentum, "weight_decay": r.train.weight_decay, "milestones": r.train.lr_milestones,
        "gamma": r.train.lr_gamma,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset}-{teacher.arch}-{teacher.recipe}-{digest}"


def teacher_path(cfg: Config, role: str) -> Path:
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    if teacher.checkpoint == AUTO:
        return Path(cfg.teachers.cache_dir) / f"{recipe_key(cfg, role)}.pt"
    return Path(teacher.checkpoint)


def teacher_accuracy(cfg: Config, model: nn.Module, data: DataBundle, device: torch.device) -> dict[str, float]:
    """Clean and PGD (``eval.pgd_steps``) accuracy on the first ``eval.n_examples`` test examples."""
    test = data.test.head(cfg.eval.n_examples)
    x, y = test.floats().to(device), test.labels.to(device)
    attack = PGD(model, cfg.attack.epsilon, cfg.eval.pgd_step_size, cfg.eval.pgd_steps, random_start=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        clean = robust_accuracy(model, Clean(model), x, y, batch_size=cfg.eval.batch_size)
        robust = robust_accuracy(model, attack, x, y, batch_size=cfg.eval.batch_size)
    return {"clean_acc": clean, "pgd_acc": robust}


def train_teacher(cfg: Config, role: str, data: DataBundle, device: torch.device, progress: bool = True,
                  log: Log = print) -> nn.Module:
    """Train teacher ``role`` with its recipe, save it at :func:`teacher_path`, return it in eval mode."""
    from tune_mtard.pipeline import new_trainer, run_pipeline

    teacher: TeacherConfig = getattr(cfg.teachers, role)
    path = teacher_path(cfg, role)
    log(f"training {role} teacher {teacher.arch} ({teacher.recipe}, {teacher.epochs} epochs) -> {path}")
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as run_dir:
        recipe = dataclasses.replace(recipe_config(cfg, role), device=str(device))
        result = run_pipeline(new_trainer(recipe, data, {}, Path(run_dir)), data, Path(run_dir), test_eval=False,
                              progress=progress)
        Path(run_dir, "student.pt").replace(path)
    model = result.trainer.student.eval()
    accuracy = teacher_accuracy(cfg, model, data, device)
    info = {"role": role, "arch": teacher.arch, "recipe": teacher.recipe, "epochs": teacher.epochs,
            "dataset": cfg.data.dataset, "train_time_s": round(time.perf_counter() - start, 1),
            "test_clean_acc": accuracy["clean_acc"], "test_pgd_acc": accuracy["pgd_acc"]}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return model


def load_teacher(cfg: Config, role: str, data: DataBundle) -> nn.Module:
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    model = create_model(teacher.arch, data.num_classes, data.in_channels)
    load_checkpoint(model, teacher_path(cfg, role))
    return model.eval().requires_grad_(False)


def check_teacher_files(cfg: Config, roles: Iterable[str]) -> None:
    """Teachers given as paths must exist (ConfigError naming the key); ``auto`` ones are trained when missing."""
    for role in roles:
        if getattr(cfg.teachers, role).checkpoint != AUTO and not teacher_path(cfg, role).is_file():
            raise ConfigError(f"teachers.{role}.checkpoint", f"file not found: {teacher_path(cfg, role)} "
                                                              "(train it with python -m tune_mtard.teachers, or set "
                                                              "checkpoint: auto)")


def prepare_teachers(cfg: Config, data: DataBundle, device: torch.device | None = None, progress: bool = True,
                     log: Log = print, roles: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The teachers of ``roles`` (default: those ``cfg.method`` needs), on the CPU: ``auto`` ones trained once
    and cached, others loaded."""
    device = device or resolve_device(cfg.device)
    teachers: dict[str, nn.Module] = {}
    for role in roles_for([cfg.method]) if roles is None else roles:
        path = teacher_path(cfg, role)
        if path.is_file():
            teachers[role] = load_teacher(cfg, role, data)
        elif getattr(cfg.teachers, role).checkpoint == AUTO:
            teachers[role] = train_teacher(cfg, role, data, device, progress, log).cpu()
        else:
            raise ConfigError(f"teachers.{role}.checkpoint", f"file not found: {path}")
    return teachers


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


def train_missing(request: TeachersRequest) -> list[TeacherReport]:
    """The ``teachers`` command: train the named teachers that do not exist yet, and measure each one."""
    from tune_mtard.config import load_config
    from tune_mtard.data import load_data

    roles = [r.strip() for r in request.roles.split(",") if r.strip()]
    for role in roles:
        if role not in ROLES:
            raise ConfigError("--roles", f"unknown role {role!r} (valid: {', '.join(ROLES)})")
    cfg = load_config(request.config, request.overrides, check_files=False).run_config()
    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    reports = []
    for role in roles:
        path = teacher_path(cfg, role)
        if path.is_file():
            model, status = load_teacher(cfg, role, data).to(device), "exists"
        else:
            model, status = train_teacher(cfg, role, data, device, progress=request.progress).to(device), "trained"
        accuracy = teacher_accuracy(cfg, model, data, device)
        reports.append(TeacherReport(role, getattr(cfg.teachers, role).arch, status, path, accuracy["clean_acc"],
                                     accuracy["pgd_acc"], cfg.eval.pgd_steps, min(cfg.eval.n_examples, len(data.test)),
                                     cfg.attack.epsilon))
    return reports
