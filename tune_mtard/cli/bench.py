"""``bench step|epoch|gpu|platform|driver|search|memory|folder``: performance figures (docs/performance.md,
docs/gpu.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from tune_mtard.cli.common import ArgumentParser, add_set_flag, parser_for
from tune_mtard.config import Config, find_config_file, load_config
from tune_mtard.errors import ConfigError

DEFAULT_SPACE = "digits.yaml"
GPU_SPACE = "cifar10.yaml"
GPU_OUT = "gpu.json"


def build_parser() -> ArgumentParser:
    """The ``bench`` command's flags (docs/cli.md, "bench")."""
    parser = parser_for("bench", "Performance figures: a table on stdout and, with --out, JSON with the machine "
                                 "they were measured on.")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{step,epoch,gpu,platform,driver,search,memory,folder}")

    def command(name: str, help_text: str, space: str = DEFAULT_SPACE,
                out: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=space,
                         help=f"run config or search space: a path, or a name in ./search_spaces/ or among the "
                              f"installed spaces (default: {space})")
        sub.add_argument("--out", default=out, help="write the figures as JSON to this file"
                                                     + (f" (default: {out})" if out else ""))
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
    epoch = command("epoch", "whole training epochs (loader, steps, validation) in steps/s and images/s, and the "
                             "loader alone")
    epoch.add_argument("--epochs", type=int, default=3, help="timed epochs (median taken)")
    epoch.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first")
    epoch.add_argument("--batch-size", type=int, default=None, help="batch size (default: data.batch_size)")
    epoch.add_argument("--train-examples", type=int, default=None,
                       help="train on the first N examples of the training split (default: all)")
    epoch.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: search.resources.cpu, else torch's default)")
    gpu = command("gpu", "every GPU figure in one go: the fast path's checks, then bench step and bench epoch in "
                         "each variant, on a synthetic CIFAR-shaped dataset; exit 1 if a check fails",
                  space=GPU_SPACE, out=GPU_OUT)
    gpu.add_argument("--device", default="cuda", help="the card to measure (default: cuda)")
    gpu.add_argument("--train-examples", type=int, default=10_000,
                     help="training images of the synthetic dataset bench epoch runs on (default: 10000)")
    gpu.add_argument("--epochs", type=int, default=2, help="timed epochs per bench epoch variant (default: 2)")
    gpu.add_argument("--repeats", type=int, default=5, help="timed windows per bench step variant (default: 5)")
    gpu.add_argument("--window-s", type=float, default=0.5, help="seconds per bench step window (default: 0.5)")
    gpu.add_argument("--checks-only", action="store_true", help="run the checks and stop")
    plat = command("platform", "the same short trial bare and, --trials times, as Ray Tune trials of one Tuner "
                               "with MLflow logging")
    plat.add_argument("--epochs", type=int, default=3, help="epochs of the trial")
    plat.add_argument("--repeats", type=int, default=1, help="bare trial / Tuner pairs (median taken)")
    plat.add_argument("--trials", type=int, default=8,
                      help="trials of each Tuner, run one at a time (default: 8)")
    driver = command("driver", "the search driver's seconds per report (real searcher, ASHA, MLflow recorder) with "
                               "synthetic trials that report at once, at two sizes of search")
    driver.add_argument("--trials", type=int, default=100, help="trials of the small search (default: 100)")
    driver.add_argument("--trials-large", type=int, default=1000,
                        help="trials of the large search (default: 1000)")
    driver.add_argument("--epochs", type=int, default=50, help="epochs (reports) a trial (default: 50)")
    driver.add_argument("--concurrent", type=int, default=4, help="trials at a time (default: 4)")
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
    folder = command("folder", "peak resident memory of a one-epoch train on generated image folders of growing size")
    folder.add_argument("--per-class", default="100,400,1600",
                        help="comma-separated training images per class (10 classes), one folder each")
    folder.add_argument("--image-size", type=int, default=64, help="data.image_size of the runs (default: 64)")
    folder.add_argument("--workdir", default=None, help="where the folders are generated (default: the temp folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    for flag in ("batch_size", "repeats", "epochs", "num_samples", "trials", "trials_large", "concurrent",
                 "max_epochs", "warmup", "threads", "train_examples", "image_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}", "must be >= 1")
    if getattr(args, "warmup_epochs", 0) < 0:
        raise ConfigError("--warmup-epochs", "must be >= 0")
    if getattr(args, "window_s", 1.0) <= 0:
        raise ConfigError("--window-s", "must be > 0")
    if getattr(args, "gpu_gib", 1.0) <= 0:
        raise ConfigError("--gpu-gib", "must be > 0")
    try:
        args.config = str(find_config_file(args.config))
    except ConfigError as exc:
        raise ConfigError("--config", exc.message) from None
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError("--out", f"folder {Path(args.out).parent} does not exist")

    if args.command == "step":
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.step import bench_step, print_step

        cfg = load_config(args.config, args.overrides, check_files=False)
        _set_threads(args.threads, cfg)
        result = bench_step(cfg, args.batch_size, args.repeats, args.window_s, args.warmup)
        print_step(result)
    elif args.command == "epoch":
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.epoch import bench_epoch, print_epoch
        from tune_mtard.data import load_data

        cfg = load_config(args.config, args.overrides, check_files=False)
        if args.batch_size is not None:
            cfg = cfg.with_values({"data.batch_size": args.batch_size})
        _set_threads(args.threads, cfg)
        data = load_data(cfg)
        if args.train_examples is not None:
            data = dataclasses.replace(data, train=data.train.head(args.train_examples))
        result = bench_epoch(cfg, data, args.epochs, args.warmup_epochs)
        print_epoch(result)
    elif args.command == "gpu":
        import torch

        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.gpu import bench_gpu
        from tune_mtard.benchmarks.gpu_checks import CheckSetup

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ConfigError("--device", f"not a device: {args.device!r}") from None
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError("--device", f"no CUDA device {args.device!r} here: bench gpu measures a GPU")
        cfg = load_config(args.config, args.overrides, check_files=False)
        result = bench_gpu(cfg, CheckSetup(device), Path(args.out) if args.out else None,
                           train_examples=args.train_examples, epochs=args.epochs, repeats=args.repeats,
                           window_s=args.window_s, checks_only=args.checks_only)
        print(f"checks {'all passed' if result['all_checks_passed'] else 'FAILED'}; figures in {args.out}")
        return 0 if result["all_checks_passed"] else 1
    elif args.command == "platform":
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.platform import bench_platform, print_platform

        result = bench_platform(load_config(args.config, args.overrides, check_files=False), args.epochs, args.repeats,
                                args.trials)
        print_platform(result)
    elif args.command == "driver":
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.driver import bench_driver, print_driver

        result = bench_driver(load_config(args.config, args.overrides, check_files=False), args.trials,
                              args.trials_large, args.epochs, args.concurrent)
        print_driver(result)
    elif args.command == "memory":
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.memory import bench_memory, print_memory

        result = bench_memory(load_config(args.config, args.overrides, check_files=False), args.batch_size,
                              args.gpu_gib)
        print_memory(result)
    elif args.command == "folder":
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.folder import bench_folder, print_folder

        try:
            sizes = [int(value) for value in args.per_class.split(",")]
        except ValueError:
            raise ConfigError("--per-class", f"expected comma-separated integers, got {args.per_class!r}") from None
        if not sizes or min(sizes) < 1:
            raise ConfigError("--per-class", "every size must be >= 1")
        if args.workdir is not None and not Path(args.workdir).is_dir():
            raise ConfigError("--workdir", f"folder {args.workdir} does not exist")
        result = bench_folder(Path(args.config), args.overrides, sizes, args.image_size,
                              Path(args.workdir) if args.workdir else None)
        print_folder(result)
    else:
        # the library (torch and more) loads only after the flags parse: --help and bad flags answer at once
        from tune_mtard.benchmarks.search import bench_search, print_search

        result = bench_search(args.config, args.overrides, args.num_samples, args.max_epochs, args.storage,
                              args.fifo_from)
        print_search(result)
    if args.out is not None:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _set_threads(threads: int | None, cfg: Config) -> None:
    """``--threads``, else what one trial gets (``search.resources.cpu``), else torch's default."""
    import torch

    threads = threads or (int(cfg.search.resources.cpu) if cfg.search is not None else None)
    if threads:
        torch.set_num_threads(max(1, threads))
