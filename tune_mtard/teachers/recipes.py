"""How an ``auto`` teacher is trained, and where it is cached (docs/methods.md, "Teachers").

A teacher's recipe depends only on the teacher's own settings (``teachers.<role>.*``), the data it is
trained on (``data.dataset``, ``data.val_fraction``, ``seed``; for an image folder, which a name does not
identify, also its ``data.root``, ``data.image_size`` and ``data.crop``) and, for an adversarial recipe, the threat
model (``attack.*``): never on the student's ``train.*`` keys, which a search samples. So a search and the
``train`` run of its best config find the same cached teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from tune_mtard.config import AUTO, Config, TeacherConfig
from tune_mtard.config.sections import TrainConfig

RECIPE_MILESTONES = [0.5, 0.75]  # fractions of the teacher's epochs
RECIPE_GAMMA = 0.1


def teacher_settings(cfg: Config, role: str) -> TeacherConfig:
    return getattr(cfg.teachers, role)


def recipe_config(cfg: Config, role: str) -> Config:
    """The run config that trains teacher ``role``: its arch, recipe and optimiser settings, in the same loop."""
    teacher = teacher_settings(cfg, role)
    return dataclasses.replace(
        cfg.run_config(),
        name=f"{cfg.name}-teacher-{role}",
        method=teacher.recipe,
        student=dataclasses.replace(cfg.student, arch=teacher.arch, normalization=teacher.normalization),
        data=dataclasses.replace(cfg.data, batch_size=teacher.batch_size),
        train=TrainConfig(epochs=teacher.epochs, lr=teacher.lr, momentum=teacher.momentum,
                          weight_decay=teacher.weight_decay, lr_milestones=list(RECIPE_MILESTONES),
                          lr_gamma=RECIPE_GAMMA),
        baselines=dataclasses.replace(cfg.baselines, trades_beta=teacher.trades_beta),
        eval=dataclasses.replace(cfg.eval, every=teacher.epochs),
    )


def recipe_key(cfg: Config, role: str) -> str:
    """Cache key of an ``auto`` teacher: dataset, arch, recipe and a hash of everything that changes its weights."""
    teacher = teacher_settings(cfg, role)
    recipe = {
        "dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction, "seed": cfg.seed,
        "arch": teacher.arch, "recipe": teacher.recipe, "epochs": teacher.epochs, "lr": teacher.lr,
        "momentum": teacher.momentum, "weight_decay": teacher.weight_decay, "batch_size": teacher.batch_size,
        "trades_beta": teacher.trades_beta, "milestones": RECIPE_MILESTONES, "gamma": RECIPE_GAMMA,
        "attack": None if teacher.recipe == "natural" else dataclasses.asdict(cfg.attack),
    }
    if teacher.normalization.mean:  # only when set, so the keys of teachers cached before it existed stay valid
        recipe["normalization"] = dataclasses.asdict(teacher.normalization)
    if cfg.data.dataset == "imagefolder":
        recipe["folder"] = [str(Path(cfg.data.root).expanduser().absolute()), cfg.data.image_size, cfg.data.crop]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset}-{teacher.arch}-{teacher.recipe}-{digest}"


def teacher_path(cfg: Config, role: str) -> Path:
    """The teacher's file: its ``checkpoint`` path, or its place in the cache for ``auto``."""
    teacher = teacher_settings(cfg, role)
    if teacher.checkpoint == AUTO:
        return Path(cfg.teachers.cache_dir) / f"{recipe_key(cfg, role)}.pt"
    return Path(teacher.checkpoint)
