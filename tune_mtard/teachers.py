"""Teachers: load them, or train the missing ones (clean: natural training; robust: PGD-AT or TRADES).

``python -m tune_mtard.teachers --config FILE`` trains every teacher the config names that does not
exist yet, saves it where the config says (``checkpoint: auto`` means a cache keyed by dataset, arch and
recipe) and prints its clean and PGD accuracy on the test split. Teacher training runs through the same
loop as the students, with ``method`` set to the recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from tune_mtard.attacks import PGD, Clean
from tune_mtard.cli import ArgumentParser, add_set_flag, run
from tune_mtard.config import AUTO, Config, Method, TeacherConfig, load_config
from tune_mtard.data import DataBundle, load_data
from tune_mtard.engine import Trainer, resolve_device
from tune_mtard.evaluation import robust_accuracy
from tune_mtard.methods import NEEDS_TEACHERS
from tune_mtard.models import create_model, load_checkpoint, save_checkpoint

ROLES = ("clean", "robust")


def recipe_config(cfg: Config, role: str) -> Config:
    """The run config that trains teacher ``role``: its arch, recipe, epochs and lr in the same loop."""
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    return dataclasses.replace(
        cfg.run_config(),
        name=f"{cfg.name}-teacher-{role}",
        method=Method(teacher.recipe.value),
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
        "arch": teacher.arch, "recipe": teacher.recipe.value, "epochs": teacher.epochs, "lr": teacher.lr,
        "trades_beta": teacher.trades_beta, "seed": cfg.seed,
        "attack": None if teacher.recipe.value == "natural" else dataclasses.asdict(cfg.attack),
        "momentum": r.train.momentum, "weight_decay": r.train.weight_decay, "milestones": r.train.lr_milestones,
        "gamma": r.train.lr_gamma,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset}-{teacher.arch}-{teacher.recipe.value}-{digest}"


def teacher_path(cfg: Config, role: str) -> Path:
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    if teacher.checkpoint == AUTO:
        return Path(cfg.teachers.cache_dir) / f"{recipe_key(cfg, role)}.pt"
    return Path(teacher.checkpoint)


def needed_roles(cfg: Config) -> tuple[str, ...]:
    return NEEDS_TEACHERS.get(cfg.method, ())


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
                  log=print) -> nn.Module:
    """Train teacher ``role`` with its recipe, save it at :func:`teacher_path`, return it in eval mode."""
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    path = teacher_path(cfg, role)
    log(f"training {role} teacher {teacher.arch} ({teacher.recipe.value}, {teacher.epochs} epochs) -> {path}")
    start = time.perf_counter()
    trainer = Trainer(recipe_config(cfg, role), data, device=device)
    trainer.fit(progress=progress)
    save_checkpoint(trainer.student, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    accuracy = teacher_accuracy(cfg, trainer.student, data, device)
    info = {"role": role, "arch": teacher.arch, "recipe": teacher.recipe.value, "epochs": teacher.epochs,
            "dataset": cfg.data.dataset, "train_time_s": round(time.perf_counter() - start, 1),
            "test_clean_acc": accuracy["clean_acc"], "test_pgd_acc": accuracy["pgd_acc"]}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return trainer.student.eval()


def load_teacher(cfg: Config, role: str, data: DataBundle) -> nn.Module:
    teacher: TeacherConfig = getattr(cfg.teachers, role)
    model = create_model(teacher.arch, data.num_classes, data.in_channels)
    load_checkpoint(model, teacher_path(cfg, role))
    return model.eval().requires_grad_(False)


def prepare_teachers(cfg: Config, data: DataBundle, device: torch.device | None = None, progress: bool = True,
                     log=print) -> dict[str, nn.Module]:
    """The teachers ``cfg.method`` needs, on the CPU: ``auto`` ones trained once and cached, others loaded."""
    device = device or resolve_device(cfg.device)
    teachers: dict[str, nn.Module] = {}
    for role in needed_roles(cfg):
        path = teacher_path(cfg, role)
        if path.is_file():
            teachers[role] = load_teacher(cfg, role, data)
        elif getattr(cfg.teachers, role).checkpoint == AUTO:
            teachers[role] = train_teacher(cfg, role, data, device, progress, log).cpu()
        else:
            from tune_mtard.errors import ConfigError

            raise ConfigError(f"teachers.{role}.checkpoint", f"file not found: {path}")
    return teachers


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tune_mtard.teachers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config or search space file")
    add_set_flag(parser)
    parser.add_argument("--roles", default="clean,robust", help="which teachers (default: clean,robust)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    for role in roles:
        if role not in ROLES:
            parser.error(f"--roles: unknown role {role!r} (valid: clean, robust)")
    cfg = load_config(args.config, args.overrides, check_files=False).run_config()
    data = load_data(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    for role in roles:
        path = teacher_path(cfg, role)
        if path.is_file():
            model = load_teacher(cfg, role, data).to(device)
            status = "exists"
        else:
            model = train_teacher(cfg, role, data, device, progress=not args.no_progress).to(device)
            status = "trained"
        acc = teacher_accuracy(cfg, model, data, device)
        n = min(cfg.eval.n_examples, len(data.test))
        print(f"{role:6s} {getattr(cfg.teachers, role).arch:18s} {status:7s} clean {acc['clean_acc']:.4f}  "
              f"PGD-{cfg.eval.pgd_steps} {acc['pgd_acc']:.4f}  (test, n={n}, eps={cfg.attack.epsilon:.4g})  {path}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run(main)
