"""Teachers: load them, or train the missing ones (clean: natural training; robust: PGD-AT or TRADES).

A teacher is a file (``teachers.<role>.checkpoint``), or ``auto``: trained once with its recipe through
the same run pipeline as the students and cached under ``teachers.cache_dir`` (``recipes.py``). A teacher
pinned by ``teachers.<role>.sha256`` (an exported best config pins the files its search used) must be that
exact file: it is checked, and never retrained. Each teacher's clean and PGD accuracy on the validation
split is measured once and kept with the cache (docs/methods.md, "Teachers").
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tune_mtard import atomic
from tune_mtard.attacks import PGD, Clean
from tune_mtard.config import AUTO, Config
from tune_mtard.data import DataBundle
from tune_mtard.errors import ConfigError, TeacherTrainingFailed
from tune_mtard.evaluation import robust_accuracy
from tune_mtard.methods import METHODS
from tune_mtard.metrics import VAL_CLEAN_ACC
from tune_mtard.models import AS_SAVED, create_model, load_mapped
from tune_mtard.models.normalization import normalization_of
from tune_mtard.perf import resolve_device
from tune_mtard.pipeline import new_trainer, run_pipeline
from tune_mtard.teachers.cache import exclusive, file_sha256, quality_record_path, read_record, write_json
from tune_mtard.teachers.recipes import recipe_config, recipe_key, teacher_path, teacher_settings

ROLES = ("clean", "robust")
# A robust teacher below this validation PGD accuracy is probably not adversarially trained: a warning.
ROBUST_TEACHER_MIN_PGD_ACC = 0.10
# A teacher whose validation clean accuracy ends below this many times chance is not cached: training failed.
CHANCE_FACTOR = 1.5
Log = Callable[[str], None]

__all__ = ["ROLES", "Teacher", "TeacherSet", "TeacherTrainingFailed", "check_teacher_files", "measure_accuracy",
           "prepare_teachers", "recipe_config", "recipe_key", "roles_for", "teacher_path"]


def roles_for(methods: Iterable[str]) -> tuple[str, ...]:
    """The teacher roles that any of ``methods`` distils from, in :data:`ROLES` order."""
    needed = {role for method in methods for role in METHODS.get(method).teachers}
    return tuple(role for role in ROLES if role in needed)


@dataclass
class Teacher:
    """A loaded teacher: its file, the file's sha256, the model (eval mode, on the CPU) and its quality."""

    role: str
    arch: str
    path: Path
    sha256: str
    model: nn.Module
    quality: dict[str, float] = field(default_factory=dict)  # val_clean_acc, val_pgd_acc, n
    trained: bool = False  # trained by this call (rather than found)
    mapping: str = AS_SAVED  # what loading mapped of the file's keys (a file from another repository)


@dataclass
class TeacherSet:
    teachers: dict[str, Teacher] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, nn.Module]:
        return {role: t.model for role, t in self.teachers.items()}

    def pins(self) -> dict[str, str]:
        """Dotted config keys that pin these exact files (what ``best_config.yaml`` carries)."""
        pins = {}
        for role, t in self.teachers.items():
            pins[f"teachers.{role}.checkpoint"] = str(t.path)
            pins[f"teachers.{role}.sha256"] = t.sha256
        return pins

    def quality_metrics(self) -> dict[str, float]:
        """``teacher_<role>_val_clean_acc`` and ``teacher_<role>_val_pgd_acc`` of each teacher."""
        return {f"teacher_{role}_{key}": value for role, t in self.teachers.items()
                for key, value in t.quality.items() if key != "n"}

    def warnings(self) -> list[str]:
        """One line per teacher that looks wrong (the paper's "check the teachers")."""
        found = []
        robust, clean = self.teachers.get("robust"), self.teachers.get("clean")
        if robust is not None and robust.quality["val_pgd_acc"] < ROBUST_TEACHER_MIN_PGD_ACC:
            found.append(f"warning: the robust teacher {robust.path} has validation PGD accuracy "
                         f"{robust.quality['val_pgd_acc']:.4f} < {ROBUST_TEACHER_MIN_PGD_ACC}: "
                         "is it adversarially trained?")
        if (robust is not None and clean is not None
                and clean.quality["val_clean_acc"] < robust.quality["val_clean_acc"]):
            found.append(f"warning: the clean teacher {clean.path} is less accurate on clean validation data "
                         f"({clean.quality['val_clean_acc']:.4f}) than the robust one "
                         f"({robust.quality['val_clean_acc']:.4f})")
        return found

    def announce(self) -> None:
        """What every command prints once its teachers are ready: each teacher's quality, then any warning."""
        for line in self.describe() + self.warnings():
            print(line, flush=True)

    def describe(self) -> list[str]:
        return [f"{role} teacher {t.arch}: val clean {t.quality['val_clean_acc']:.4f}, val PGD "
                f"{t.quality['val_pgd_acc']:.4f} (n={t.quality['n']:.0f})  {t.path}"
                + ("" if t.mapping == AS_SAVED else f"\n  loaded with: {t.mapping}")
                for role, t in self.teachers.items()]


def check_teacher_files(cfg: Config, roles: Iterable[str], train_missing: bool = False) -> None:
    """Teachers given as paths must exist (unless ``train_missing``: the ``teachers`` command trains them
    there), and match their pinned hash (ConfigError naming the key); ``auto`` ones are trained when
    missing. A pinned teacher is never trained."""
    for role in roles:
        teacher = teacher_settings(cfg, role)
        path = teacher_path(cfg, role)
        trainable = not teacher.sha256 and (teacher.checkpoint == AUTO or train_missing)
        if not trainable and not path.is_file():
            what = "pinned teacher file" if teacher.sha256 else "file"
            raise ConfigError(f"teachers.{role}.checkpoint", f"{what} not found: {path} (train it with python -m "
                                                              "tune_mtard.teachers, or set checkpoint: auto)")
        if teacher.sha256 and file_sha256(path) != teacher.sha256:
            raise ConfigError(f"teachers.{role}.sha256", f"{path} is not the pinned teacher: its sha256 is "
                                                          f"{file_sha256(path)}, the config pins {teacher.sha256}")


def measure_accuracy(cfg: Config, model: nn.Module, split, device: torch.device) -> tuple[float, float]:
    """Clean and PGD (``eval.pgd_steps``) accuracy on the first ``eval.n_examples`` examples of ``split``."""
    part = split.head(cfg.eval.n_examples)
    x, y = part.floats().to(device), part.labels.to(device)
    attack = PGD(model, cfg.attack.epsilon, cfg.eval.pgd_step_size, cfg.eval.pgd_steps, random_start=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        clean = robust_accuracy(model, Clean(model), x, y, batch_size=cfg.eval.batch_size)
        robust = robust_accuracy(model, attack, x, y, batch_size=cfg.eval.batch_size)
    return clean, robust


def measure_quality(cfg: Config, model: nn.Module, data: DataBundle, device: torch.device) -> dict[str, float]:
    """Clean and PGD accuracy on the validation split: what the teacher cache records and warns on."""
    clean, robust = measure_accuracy(cfg, model, data.val, device)
    return {"val_clean_acc": clean, "val_pgd_acc": robust, "n": float(min(len(data.val), cfg.eval.n_examples))}


def _quality(cfg: Config, path: Path, sha256: str, model: nn.Module, data: DataBundle,
             device: torch.device) -> dict[str, float]:
    """The teacher's validation quality, measured once per file and way of measuring, then read back."""
    e = cfg.eval
    settings = {"dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction, "seed": cfg.seed,
                "epsilon": cfg.attack.epsilon, "pgd_steps": e.pgd_steps, "pgd_step_size": e.pgd_step_size,
                "n_examples": e.n_examples}
    normalization = normalization_of(model)
    if normalization is not None:  # the same file under another declared normalisation is another model
        settings["normalization"] = list(normalization)
    record_path = quality_record_path(cfg.teachers.cache_dir, sha256, settings)
    record = read_record(record_path)
    if record is None or record.get("settings") != settings:
        quality = measure_quality(cfg, model.to(device), data, device)
        model.cpu()
        record = {"file": str(path), "sha256": sha256, "settings": settings, "quality": quality}
        write_json(record_path, record)
    return record["quality"]


def train_teacher(cfg: Config, role: str, data: DataBundle, device: torch.device, progress: bool = True,
                  log: Log = print) -> nn.Module:
    """Train teacher ``role`` with its recipe and write it to :func:`teacher_path` (the caller holds its lock).

    A teacher that diverges (:class:`~tune_mtard.errors.Diverged`) or ends at chance accuracy
    (:class:`TeacherTrainingFailed`) is not written.
    """
    teacher = teacher_settings(cfg, role)
    path = teacher_path(cfg, role)
    log(f"training {role} teacher {teacher.arch} ({teacher.recipe}, {teacher.epochs} epochs) -> {path}")
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe = dataclasses.replace(recipe_config(cfg, role), device=str(device))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as run_dir:
        result = run_pipeline(new_trainer(recipe, data, {}, Path(run_dir)), data, Path(run_dir), test_eval=False,
                              progress=progress)
        chance = 1 / data.num_classes
        if result.metrics[VAL_CLEAN_ACC] < CHANCE_FACTOR * chance:
            raise TeacherTrainingFailed(
                f"the {role} teacher {teacher.arch} ended at chance accuracy (validation clean "
                f"{result.metrics[VAL_CLEAN_ACC]:.4f}, chance {chance:.4f}); it was not cached: check "
                f"teachers.{role}.lr and teachers.{role}.epochs")
        Path(run_dir, "student.pt").replace(path)
    info = {"role": role, "arch": teacher.arch, "recipe": teacher.recipe, "epochs": teacher.epochs,
            "dataset": cfg.data.dataset, "train_time_s": round(time.perf_counter() - start, 1),
            "recipe_key": recipe_key(cfg, role), **{k: v for k, v in result.metrics.items() if k.startswith("val_")}}
    atomic.write_text(path.with_suffix(".json"), json.dumps(info, indent=2))
    return result.trainer.student.eval().cpu()


def load_teacher(cfg: Config, role: str, data: DataBundle) -> tuple[nn.Module, str]:
    """Teacher ``role`` frozen in eval mode, with its declared normalisation, and what loading its file mapped."""
    teacher = teacher_settings(cfg, role)
    model = create_model(teacher.arch, data.num_classes, data.in_channels, teacher.normalization)
    mapping = load_mapped(model, teacher_path(cfg, role), teacher.arch)
    return model.eval().requires_grad_(False), mapping


def prepare_teachers(cfg: Config, data: DataBundle, device: torch.device | None = None, progress: bool = True,
                     log: Log = print, roles: Iterable[str] | None = None, train_missing: bool = False) -> TeacherSet:
    """The teachers of ``roles`` (default: those ``cfg.method`` needs), on the CPU, with their files' hashes and
    validation quality: files checked (and pinned hashes verified) first, then ``auto`` ones (and, with
    ``train_missing``, missing files) trained once, under a lock, and written."""
    device = device or resolve_device(cfg.device)
    roles = roles_for([cfg.method]) if roles is None else tuple(roles)
    check_teacher_files(cfg, roles, train_missing)
    found = TeacherSet()
    for role in roles:
        path = teacher_path(cfg, role)
        trained = False
        if not path.is_file():
            with exclusive(path):  # another process may be training the same teacher: wait for it
                if not path.is_file():
                    train_teacher(cfg, role, data, device, progress, log)
                    trained = True
        model, mapping = load_teacher(cfg, role, data)
        sha256 = file_sha256(path)
        found.teachers[role] = Teacher(role, teacher_settings(cfg, role).arch, path.resolve(), sha256, model,
                                       _quality(cfg, path, sha256, model, data, device), trained, mapping)
    return found
