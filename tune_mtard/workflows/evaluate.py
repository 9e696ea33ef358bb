"""Robustness of a saved model: what the ``evaluate`` command does (docs/evaluation.md).

Evaluates the first N examples of a split in order (as RobustBench does, so numbers are comparable across
runs) under each attack, prints a table and writes a JSON file. The config gives the dataset, the
architecture (``student.arch``; ``--arch`` for another model, e.g. a teacher), ``attack.epsilon``,
``eval.pgd_step_size`` and ``eval.clean_weight``.

Attacks: ``clean``, ``fgsm``, ``pgd20`` (20 steps of ``eval.pgd_step_size``, random start), ``cw`` (CW-inf
margin loss, 30 steps), ``aa`` (standard AutoAttack through pyautoattack, with the robust accuracy after
each of its stages), ``square`` (black-box Square Attack with ``--square-queries`` queries). With
``--source-checkpoint`` the examples of ``transfer_pgd20`` and ``transfer_cw`` are crafted on that model and
the evaluated model is tested on them (black-box transfer).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tune_mtard import atomic
from tune_mtard.attacks import ATTACKS, Attack, AutoAttackSettingsError, build_attack
from tune_mtard.config import Config, load_config
from tune_mtard.config.sections import NormalizationConfig
from tune_mtard.data import DataBundle, load_data
from tune_mtard.errors import ConfigError
from tune_mtard.evaluation import TRANSFER_ATTACKS, robust_accuracy
from tune_mtard.files import STUDENT
from tune_mtard.metrics import w_robust_acc
from tune_mtard.models import AS_SAVED, available_models, create_model, load_mapped
from tune_mtard.perf import resolve_device

SPLITS = ("test", "val", "train")
TRANSFER_PREFIX = "transfer_"
DEFAULT_TRANSFER = ("transfer_pgd20", "transfer_cw")
DEFAULT_SQUARE_QUERIES = 100  # the paper's black-box table; AutoAttack's own Square uses 5000
AUTOATTACK_LOGGER = "auto-attack"


@dataclass
class EvaluateRequest:
    """What the ``evaluate`` command asks for (docs/cli.md, "evaluate"), as given."""

    config: str
    checkpoint: str
    attacks: str
    n: int | None = None
    split: str = "test"
    out: str | None = None
    batch_size: int | None = None
    arch: str | None = None
    source_checkpoint: str | None = None
    source_arch: str | None = None
    square_queries: int = DEFAULT_SQUARE_QUERIES
    progress: bool = False
    overrides: list[str] = field(default_factory=list)


@dataclass
class Request:
    """A validated request: everything needed to evaluate, checked before anything runs."""

    cfg: Config
    arch: str
    checkpoint: Path
    attacks: list[str]
    split: str
    n: int | None
    batch_size: int
    square_queries: int
    out: Path
    progress: bool
    source_arch: str | None = None
    source_checkpoint: Path | None = None


@dataclass
class AttackResult:
    """One attack's result: accuracy in [0, 1], wall time, and AutoAttack's per-stage accuracies and notes."""

    name: str
    accuracy: float
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_attacks(text: str, with_source: bool) -> list[str]:
    """``clean`` first, then the named attacks in order, then the default transfer attacks when a source is given.

    ``clean`` is always evaluated: W-Robust Acc needs it.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError("--attacks", "empty list")
    transfer_names = [TRANSFER_PREFIX + name for name in TRANSFER_ATTACKS]
    for name in names:
        if name not in ATTACKS.names() and name not in transfer_names:
            valid = ", ".join(list(ATTACKS.names()) + transfer_names)
            raise ConfigError("--attacks", f"unknown attack {name!r} (valid: {valid})")
        if name.startswith(TRANSFER_PREFIX) and not with_source:
            raise ConfigError("--attacks", f"{name} needs --source-checkpoint (the model the examples are made on)")
    if with_source and not any(name.startswith(TRANSFER_PREFIX) for name in names):
        names += DEFAULT_TRANSFER
    return list(dict.fromkeys(["clean"] + names))


def default_out(checkpoint: Path, split: str) -> Path:
    """``eval_<split>.json`` next to a ``student.pt``; ``<name>.eval_<split>.json`` next to any other checkpoint,
    so the two teachers in one cache folder do not overwrite each other's results."""
    if checkpoint.name == STUDENT:
        return checkpoint.parent / f"eval_{split}.json"
    return checkpoint.parent / f"{checkpoint.stem}.eval_{split}.json"


def declared_normalization(cfg: Config, arch: str, checkpoint: Path) -> NormalizationConfig:
    """The normalisation the config declares for ``checkpoint``: a teacher's when it is that teacher's file (and
    arch), else the student's when it is loaded as ``student.arch``, else none (a file's own buffers still count)."""
    for role in ("clean", "robust"):
        teacher = getattr(cfg.teachers, role)
        if teacher.arch == arch and Path(teacher.checkpoint).expanduser().resolve() == checkpoint:
            return teacher.normalization
    return cfg.student.normalization if arch == cfg.student.arch else NormalizationConfig()


def load_model(cfg: Config, arch: str, checkpoint: Path, data: DataBundle, arch_flag: str) -> tuple[nn.Module, str]:
    """``arch`` for ``data`` with the weights in ``checkpoint``, and what loading mapped of its keys; ConfigError
    (exit 2) when they do not fit."""
    model = create_model(arch, data.num_classes, data.in_channels, declared_normalization(cfg, arch, checkpoint))
    try:
        mapping = load_mapped(model, checkpoint, arch)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (it was loaded as {arch}; {arch_flag} names its arch)") from None
    return model.eval(), mapping


def build_request(args: EvaluateRequest) -> Request:
    cfg = load_config(args.config, args.overrides, check_files=False).run_config()
    arch = args.arch or cfg.student.arch
    archs = available_models()
    for flag, name in (("--arch", arch), ("--source-arch", args.source_arch)):
        if name is not None and name not in archs:
            raise ConfigError(flag, f"unknown arch {name!r} (valid: {', '.join(archs)})")
    if args.n is not None and args.n < 1:
        raise ConfigError("--n", f"must be >= 1, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}")
    if args.square_queries < 1:
        raise ConfigError("--square-queries", f"must be >= 1, got {args.square_queries}")
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise ConfigError("--checkpoint", f"file not found: {checkpoint}")
    source = Path(args.source_checkpoint).expanduser().resolve() if args.source_checkpoint else None
    if source is not None and not source.is_file():
        raise ConfigError("--source-checkpoint", f"file not found: {source}")
    if source is None and args.source_arch is not None:
        raise ConfigError("--source-arch", "only used with --source-checkpoint")
    out = Path(args.out).expanduser().resolve() if args.out else default_out(checkpoint, args.split)
    if out.is_dir():
        raise ConfigError("--out", f"is a folder, expected a JSON file path: {out}")
    return Request(
        cfg=cfg,
        arch=arch,
        checkpoint=checkpoint,
        attacks=parse_attacks(args.attacks, with_source=source is not None),
        split=args.split,
        n=args.n,
        batch_size=args.batch_size or cfg.eval.batch_size,
        square_queries=args.square_queries,
        out=out,
        progress=args.progress,
        source_arch=(args.source_arch or cfg.teachers.robust.arch) if source is not None else None,
        source_checkpoint=source,
    )


@contextmanager
def autoattack_log(notes: list[str], progress: bool) -> Iterator[None]:
    """pyautoattack's own log for the duration: its warnings (e.g. signs of gradient masking) become notes,
    and with ``progress`` its stage lines ("robust accuracy after APGD-CE: ...") are shown as it runs."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                notes.append(f"AutoAttack warning: {' '.join(message.split())}")
            elif progress and (message.startswith(("running", "robust accuracy", "initial accuracy"))):
                tqdm.write(f"  aa: {message}", file=sys.stderr)

    logger = logging.getLogger(AUTOATTACK_LOGGER)
    saved = (logger.level, logger.propagate)
    handler = Handler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if progress else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def build_attacks(request: Request, model: nn.Module, source: nn.Module | None, num_classes: int) -> dict[str, Attack]:
    """Every requested attack, built before any runs (AutoAttack checks its settings here).

    A ``transfer_<name>`` attack is ``<name>`` built on the source model: its examples are crafted there
    and the evaluated model is tested on them.
    """
    cfg = request.cfg
    attacks = {}
    for name in request.attacks:
        transfer = name.startswith(TRANSFER_PREFIX)
        attacks[name] = build_attack(
            name.removeprefix(TRANSFER_PREFIX), source if transfer else model, epsilon=cfg.attack.epsilon,
            num_classes=num_classes, pgd_step_size=cfg.eval.pgd_step_size,
            batch_size=request.batch_size, square_queries=request.square_queries)
    return attacks


def run_attack(name: str, attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               request: Request) -> AttackResult:
    """Accuracy of ``model`` on all of ``x`` under ``attack``, from the config's seed (so each attack's result
    does not depend on which others ran)."""
    notes: list[str] = list(getattr(attack, "notes", []))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            autoattack_log(notes, request.progress):
        torch.manual_seed(request.cfg.seed)
        accuracy = robust_accuracy(model, attack, x, y, request.batch_size, request.progress, desc=name)
    seconds = time.perf_counter() - start
    stages = dict(getattr(attack, "per_attack_accuracy", {}))
    return AttackResult(name, accuracy, seconds, stages, notes)


def results_json(request: Request, n: int, outcomes: list[AttackResult], notes: list[str],
                 device: torch.device) -> dict:
    """The JSON record: the setting, then per attack ``<name>_acc``, ``w_robust_acc_<name>``, stages,
    ``seconds_<name>``."""
    cfg = request.cfg
    record: dict = {
        "checkpoint": str(request.checkpoint),
        "arch": request.arch,
        "dataset": cfg.data.dataset,
        "split": request.split,
        "n": n,
        "epsilon": cfg.attack.epsilon,
        "pgd_step_size": cfg.eval.pgd_step_size,
        "clean_weight": cfg.eval.clean_weight,
        "seed": cfg.seed,
        "device": str(device),
    }
    if "square" in request.attacks:
        record["square_queries"] = request.square_queries
    if request.source_checkpoint is not None:
        record["source_checkpoint"] = str(request.source_checkpoint)
        record["source_arch"] = request.source_arch
    clean = next(o.accuracy for o in outcomes if o.name == "clean")
    for outcome in outcomes:
        record[f"{outcome.name}_acc"] = outcome.accuracy
        if outcome.name != "clean":
            record[f"w_robust_acc_{outcome.name}"] = w_robust_acc(clean, outcome.accuracy, cfg.eval.clean_weight)
        for stage, accuracy in outcome.stages.items():
            record[f"{outcome.name}_{stage.replace('-', '_')}_acc"] = accuracy
    for outcome in outcomes:
        record[f"seconds_{outcome.name}"] = round(outcome.seconds, 3)
    record["notes"] = notes
    return record


def format_table(record: dict, outcomes: list[AttackResult]) -> str:
    lines = [f"{'attack':<16} {'accuracy':>9} {'W-Robust Acc':>13} {'time':>9}"]
    for outcome in outcomes:
        w = record.get(f"w_robust_acc_{outcome.name}")
        w_text = "-" if w is None else f"{w:.4f}"
        lines.append(f"{outcome.name:<16} {outcome.accuracy:>9.4f} {w_text:>13} {outcome.seconds:>8.1f}s")
        for stage, accuracy in outcome.stages.items():
            lines.append(f"  after {stage:<8} {accuracy:>9.4f}")
    for note in record["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def evaluate(args: EvaluateRequest) -> int:
    """The ``evaluate`` command: every attack on the first N examples of the split; prints a table, writes JSON."""
    request = build_request(args)
    cfg = request.cfg
    data = load_data(cfg)
    device = resolve_device(cfg.device)
    model, mapping = load_model(cfg, request.arch, request.checkpoint, data, "--arch")
    model = model.to(device)
    source, source_mapping = None, AS_SAVED
    if request.source_checkpoint is not None:
        source, source_mapping = load_model(cfg, request.source_arch, request.source_checkpoint, data, "--source-arch")
        source = source.to(device)
    split = getattr(data, request.split)
    notes: list[str] = []
    if request.n is not None and request.n > len(split):
        notes.append(f"asked for {request.n} examples; the {request.split} split has {len(split)}")
    examples = split.head(request.n) if request.n is not None else split
    try:
        attacks = build_attacks(request, model, source, data.num_classes)
    except AutoAttackSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. AutoAttack on a dataset with fewer than 4 classes
        raise ConfigError("--attacks", str(exc)) from None

    n = len(examples)
    print(f"evaluating {request.arch} {request.checkpoint} on the first {n} {request.split} examples of "
          f"{cfg.data.dataset} (eps {cfg.attack.epsilon:.4g}) on {device}", flush=True)
    if mapping != AS_SAVED:
        print(f"loaded with: {mapping}", flush=True)
    if source is not None:
        print(f"transfer examples crafted on {request.source_arch} {request.source_checkpoint}", flush=True)
        if source_mapping != AS_SAVED:
            print(f"  loaded with: {source_mapping}", flush=True)
    x, y = examples.floats().to(device), examples.labels.to(device)
    outcomes = []
    try:
        for name, attack in attacks.items():
            outcomes.append(run_attack(name, attack, model, x, y, request))
    except AutoAttackSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for outcome in outcomes:
        notes += [note for note in outcome.notes if note not in notes]
    record = results_json(request, n, outcomes, notes, device)
    request.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(request.out, json.dumps(record, indent=2))
    print(format_table(record, outcomes))
    print(f"wrote {request.out}")
    return 0

