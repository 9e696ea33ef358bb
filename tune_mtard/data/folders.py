"""Image folders streamed from disk (``data.dataset: imagefolder``): the files are indexed, never held whole in
memory, and decoded and augmented in loader worker processes (docs/configuration.md, "Image folders").

The layout is the standard one, ``train/<class>/...`` and ``val/<class>/...`` (images anywhere below a class
folder, so Tiny-ImageNet's ``train/<wnid>/images/`` reads as is; a ``val/val_annotations.txt`` as Tiny-ImageNet
ships it labels a flat ``val/images/`` folder). Classes are the sorted names of the ``train`` folders; the
labelled ``val`` folder is the test split, and validation is carved out of ``train`` by seed as for every dataset.

Every random draw of an epoch is made in the main process from the caller's generator when the epoch starts:
the visiting order, then one seed per visited image from which its worker draws the crop and the flip. The
batches so depend on the generator alone, not on how many workers decode them or in which order they finish.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tune_mtard.data.splits import Split
from tune_mtard.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CROPS = ("resized", "padded")
PADDED_CROP_PADDING = 4
EVAL_CROP_FRACTION = 0.875  # "resized": evaluation resizes the short side to size / 0.875 and centre-crops
RESIZED_CROP_SCALE = (0.08, 1.0)  # the Inception / torchvision RandomResizedCrop ranges
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
NO_AUGMENTATION = -1  # an image seed meaning: the evaluation transform


@dataclass(frozen=True)
class ImageView:
    """How a folder's images reach the model (``data.image_size``, ``data.crop``, ``data.loader_workers``).

    Attributes:
        image_size: the side, in pixels, every image is cropped or resized to.
        crop: ``resized`` (random resized crop for training, resize and centre crop for evaluation: the ImageNet
            recipe) or ``padded`` (resize to ``image_size``, then a 4-pixel crop with zero padding for training:
            the CIFAR / Tiny-ImageNet recipe).
        workers: loader processes that decode and augment (0: in the training process itself).
    """

    image_size: int = 224
    crop: str = "resized"
    workers: int = 2


@dataclass
class FolderSplit:
    """One split of an image folder: file paths and labels in memory, pixels on disk.

    Its interface is the part of :class:`Split` the rest of the code uses: ``len``, ``labels``, ``select``,
    ``head`` (decoded into an in-memory Split, for evaluation), ``floats``, ``to``, ``nbytes``, and
    :func:`stream_batches` in place of slicing tensors.
    """

    paths: np.ndarray  # file-system encoded paths (bytes: a byte a character, not numpy str's four), one per image
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    view: ImageView = ImageView()

    channels = 3

    @property
    def image_size(self) -> int:
        return self.view.image_size

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: torch.Tensor) -> FolderSplit:
        return FolderSplit(self.paths[indices.numpy()], self.labels[indices], self.classes, self.view)

    def with_view(self, view: ImageView) -> FolderSplit:
        return FolderSplit(self.paths, self.labels, self.classes, view)

    def to(self, device: torch.device | str) -> FolderSplit:
        """The pixels stay on disk; batches go to the device as they are loaded."""
        return self

    def nbytes(self) -> int:
        """What the split holds in memory: its labels (the paths are host-only bookkeeping)."""
        return self.labels.numel() * self.labels.element_size()

    def head(self, n: int) -> Split:
        """The first ``n`` images decoded with the evaluation transform, as an in-memory split."""
        part = self.select(torch.arange(min(n, len(self))))
        items = [(index, NO_AUGMENTATION) for index in range(len(part))]
        batches = list(_load(part, [items[i:i + 256] for i in range(0, len(items), 256)], self.view.workers, None))
        if not batches:
            size = self.view.image_size
            return Split(torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
        return Split(torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches]))

    def floats(self) -> torch.Tensor:
        return self.head(len(self)).floats()


def scan_image_folder(root: Path) -> tuple[FolderSplit, FolderSplit]:
    """Index ``root/train`` and ``root/val`` (the test split); a missing or empty folder is a ConfigError."""
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise ConfigError("data.root", f"imagefolder needs {train_dir} and {val_dir} (one sub-folder per class)")
    classes = tuple(sorted(path.name for path in train_dir.iterdir() if path.is_dir()))
    if not classes:
        raise ConfigError("data.root", f"{train_dir} has no class folders")
    class_of = {name: index for index, name in enumerate(classes)}
    train = [(path, class_of[name]) for name in classes for path in _images_under(train_dir / name)]
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():
        test = [(val_dir / "images" / fields[0], _class_index(class_of, fields[1], annotations))
                for fields in (line.split("\t") for line in annotations.read_text().splitlines()) if len(fields) >= 2]
    else:
        test = [(path, _class_index(class_of, folder.name, val_dir)) for folder in sorted(val_dir.iterdir())
                if folder.is_dir() for path in _images_under(folder)]
    for items, where in ((train, train_dir), (test, val_dir)):
        if not items:
            raise ConfigError("data.root", f"no {'/'.join(IMAGE_SUFFIXES)} images under {where}")
    return _split(train, classes), _split(test, classes)


def _images_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def _class_index(class_of: dict[str, int], name: str, where: Path) -> int:
    if name not in class_of:
        raise ConfigError("data.root", f"class {name!r} in {where} has no folder in train/")
    return class_of[name]


def _split(items: list[tuple[Path, int]], classes: tuple[str, ...]) -> FolderSplit:
    paths = np.array([os.fsencode(path) for path, _ in items])
    return FolderSplit(paths, torch.tensor([label for _, label in items], dtype=torch.int64), classes)


def stream_batches(split: FolderSplit, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
                   hflip: bool, augment: bool, drop_last: bool,
                   device: torch.device | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``iterate_batches`` for a folder: ``(x, y)`` batches decoded by ``split.view.workers`` processes.

    The draws (order, then one seed per image when augmenting) come from ``generator`` before the first batch.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    seeds = (torch.randint(0, 2**31, (n,), generator=generator) if augment
             else torch.full((n,), NO_AUGMENTATION, dtype=torch.int64))
    total = n // batch_size if drop_last else math.ceil(n / batch_size)
    batches = _Batches(order, seeds, batch_size, total)
    for images, labels in _load(split, batches, split.view.workers, device, hflip):
        target = images.device if device is None else device
        yield images.to(target, non_blocking=True).float() / 255, labels.to(target, non_blocking=True)


@dataclass
class _Batches:
    """The batch sampler of an epoch: batch ``b`` is the ``(index, seed)`` pairs of its rows, made as it is
    asked for, so an epoch holds two int64 tensors rather than a Python object per image."""

    order: torch.Tensor
    seeds: torch.Tensor
    batch_size: int
    total: int

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.total):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield list(zip(self.order[rows].tolist(), self.seeds[rows].tolist(), strict=True))


def _load(split: FolderSplit, batches: Iterable[list[tuple[int, int]]], workers: int, device: torch.device | None,
          hflip: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(_Decoded(split, hflip), batch_sampler=batches, num_workers=workers,
                                         pin_memory=device is not None and device.type == "cuda",
                                         prefetch_factor=2 if workers else None)
    yield from loader


class _Decoded(torch.utils.data.Dataset):
    """Decodes one image in a loader worker: ``(index, seed)`` -> (uint8 CHW tensor, label)."""

    def __init__(self, split: FolderSplit, hflip: bool):
        self.paths, self.labels, self.view, self.hflip = split.paths, split.labels, split.view, hflip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        index, seed = item
        try:
            with Image.open(os.fsdecode(self.paths[index])) as image:
                image = image.convert("RGB")
                pixels = self._transform(image, None if seed == NO_AUGMENTATION else random.Random(seed))
        except OSError as error:
            raise OSError(f"{os.fsdecode(self.paths[index])} could not be read ({error})") from error
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), self.labels[index]

    def _transform(self, image, rng: random.Random | None) -> np.ndarray:
        from PIL import Image

        size, crop = self.view.image_size, self.view.crop
        if crop == "resized":
            box = _resized_crop_box(image.width, image.height, rng) if rng else _centre_box(image.width, image.height)
            image = image.resize((size, size), Image.BILINEAR, box=box)
        else:
            image = image.resize((size, size), Image.BILINEAR) if image.size != (size, size) else image
        pixels = np.array(image)  # writable: torch.from_numpy wants it
        if rng is None:
            return pixels
        if crop == "padded":
            pad = PADDED_CROP_PADDING
            padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)))
            dy, dx = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
            pixels = padded[dy:dy + size, dx:dx + size]
        if self.hflip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels)


def _resized_crop_box(width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng``: a box of 8-100% of the area and aspect
    ratio 3/4..4/3 (ten tries, then the centre crop of the clamped ratio)."""
    area = width * height
    log_low, log_high = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*RESIZED_CROP_SCALE)
        ratio = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < RESIZED_CROP_RATIO[0]:
        w, h = width, round(width / RESIZED_CROP_RATIO[0])
    elif ratio > RESIZED_CROP_RATIO[1]:
        w, h = round(height * RESIZED_CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centre square of side ``EVAL_CROP_FRACTION`` of the short side (resize-then-centre-crop in one)."""
    side = min(width, height) * EVAL_CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side
