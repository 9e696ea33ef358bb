"""bench folder: the peak resident memory of ``train`` on a generated image folder as the folder grows
(docs/performance.md, "Image folders").

Each size gets its own folder of PNGs (``train/<class>/`` and ``val/<class>/``) and one ``train`` run of one
epoch in a child process, whose peak RSS (``ru_maxrss`` of the run's process, its loader workers apart) is set
against the folder's decoded size at ``data.image_size``. An in-memory dataset would hold at least that much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tune_mtard.benchmarks.machine import machine_info

CLASSES = 10
IMAGE_SIDE = 40  # the files' side; the run crops them to its data.image_size
VAL_PER_CLASS = 10

# The probe runs train in its own process and writes that process's peak RSS (its loader workers, children,
# apart) to the file named by its first argument.
_PROBE = """
import json, pathlib, resource, sys
from tune_mtard.cli.train import main
main(sys.argv[2:])
pathlib.Path(sys.argv[1]).write_text(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def write_image_folder(root: Path, per_class: int, *, classes: int = CLASSES, side: int = IMAGE_SIDE,
                       val_per_class: int = VAL_PER_CLASS, seed: int = 0) -> Path:
    """``root/train/cNN/*.png`` (``per_class`` each) and ``root/val/cNN/*.png``: one colour pattern per class,
    shifted and noisy, so a small CNN learns it. Returns ``root``."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    patterns = rng.integers(40, 216, size=(classes, 4, 4, 3)).astype(np.float32)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.kron(patterns[label], np.ones((side // 2, side // 2, 1)))  # 2 * side square
            for index in range(count):
                dy, dx = rng.integers(0, side // 4, size=2)
                pixels = base[dy:dy + side, dx:dx + side] + rng.normal(0, 25, size=(side, side, 3))
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                image.save(folder / f"{index:06d}.png")
    return root


def bench_folder(config: Path, overrides: list[str], sizes: list[int], image_size: int,
                 workdir: Path | None = None) -> dict[str, Any]:
    """Peak RSS of one-epoch ``train`` runs of ``config`` (with ``overrides``, ``--set`` values) on generated
    folders of ``sizes`` images per class."""
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        for per_class in sizes:
            root = write_image_folder(Path(scratch) / f"folder-{per_class}", per_class)
            out = Path(scratch) / f"run-{per_class}"
            args = ["--config", str(config), "--out", str(out), "--no-progress",
                    "--tracking-uri", f"sqlite:///{Path(scratch) / 'mlflow.db'}",
                    "--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
                    "--set", f"data.image_size={image_size}", "--set", "train.epochs=1",
                    *(flag for value in overrides for flag in ("--set", value))]
            probe = Path(scratch) / f"rss-{per_class}.json"
            done = subprocess.run([sys.executable, "-c", _PROBE, str(probe), *args], capture_output=True, text=True)
            if done.returncode != 0 or not probe.is_file():
                raise RuntimeError(f"train on {per_class * CLASSES} images failed:\n{done.stderr[-2000:]}")
            images = per_class * CLASSES
            rows.append({"train_images": images, "decoded_mib": images * 3 * image_size**2 / 2**20,
                         "peak_rss_mib": json.loads(probe.read_text()) / 1024})
    return {"benchmark": "folder", "image_size": image_size, "rows": rows, "machine": machine_info(None, load_before)}


def print_folder(result: dict[str, Any]) -> None:
    print(f"train, one epoch, data.image_size={result['image_size']}")
    print(f"{'images':>10} {'decoded MiB':>12} {'peak RSS MiB':>13}")
    for row in result["rows"]:
        print(f"{row['train_images']:>10} {row['decoded_mib']:>12.1f} {row['peak_rss_mib']:>13.1f}")
