"""Datasets held in memory as tensors, and a tensor-based batch loader.

Every dataset is loaded once into uint8 NCHW images and int64 labels. ``iterate_batches`` slices,
augments and converts batches with batched tensor ops on whatever device the split lives on, so
``load_data(...).to("cuda")`` gives a pipeline that never touches the host after loading. Models
receive floats in [0, 1]; any normalisation lives inside the model.

Splits are pure functions of ``(dataset, seed, val_fraction)``. The validation split is always
carved out of the training split (searches select on it, never on test), and the test split never
depends on ``val_fraction``.

``digits`` is scikit-learn's bundled set of 1797 real 8x8 greyscale handwritten digits (values
0..16, rescaled to 0..255). It is the offline default for demos and tests. Models see it at its
native 8x8 size rather than upsampled, which keeps CPU runs fast, and it gets no augmentation: a
4-pixel crop shift or a horizontal flip destroys or changes an 8x8 digit. Because the set has no
official test split, 20% of it (stratified by class, chosen by ``seed``) is held out as test.

``synthetic`` is generated from ``seed``: ten classes of 3x16x16 images, each a smooth per-class
colour pattern, shifted, rescaled in contrast, overlaid with a smooth distractor pattern and
pixel noise, so that a small CNN learns it well but not perfectly within a few epochs.

``cifar10``, ``cifar100`` and ``svhn`` are read from torchvision's on-disk layout under
``root``; the files are parsed here rather than through torchvision's dataset classes because
those verify md5 sums on every load, which rejects re-packaged copies. torchvision is used only
to download (and verify) missing files when ``download`` is true. ``tiny-imagenet`` is read from
the standard ``tiny-imagenet-200`` folder (its labelled ``val`` split is the test split) and the
decoded tensors are cached in ``tiny-imagenet-200/tensors.pt``.
"""

from __future__ import annotations

import enum
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tune_mtard.errors import ConfigError


class DatasetName(str, enum.Enum):
    """Datasets that ``load_data`` knows, by their config name (``data.dataset``)."""

    DIGITS = "digits"
    SYNTHETIC = "synthetic"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    SVHN = "svhn"
    TINY_IMAGENET = "tiny-imagenet"


@dataclass
class Split:
    """One split of a dataset, held in memory.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W), pixel values 0..255.
        labels: int64 tensor of shape (N,), class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        """Return a copy of the split with both tensors on ``device``."""
        return Split(self.images.to(device), self.labels.to(device))

    def head(self, n: int) -> Split:
        """Return the first ``n`` examples in order (all of them if there are fewer).

        Evaluating on a fixed prefix, as RobustBench does, makes numbers comparable across runs.
        """
        return Split(self.images[:n], self.labels[:n])

    def floats(self) -> torch.Tensor:
        """Return the images as float32 in [0, 1], on the split's device."""
        return self.images.float() / 255


@dataclass
class DataBundle:
    """A loaded dataset: its three splits plus what models and the loader need to know.

    Attributes:
        name: which dataset this is.
        train: the training split minus the validation examples.
        val: validation examples carved out of the training split (never out of test).
        test: the dataset's test split.
        num_classes: number of classes; labels lie in ``[0, num_classes)``.
        in_channels: image channels (1 for digits, 3 otherwise).
        image_size: image height and width in pixels.
        crop_padding: zero padding for the random-crop augmentation; 0 means no crop.
        hflip: whether random horizontal flips are a valid augmentation for this dataset.
    """

    name: DatasetName
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    crop_padding: int
    hflip: bool

    def to(self, device: torch.device | str) -> DataBundle:
        """Return a copy of the bundle with every split on ``device``."""
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


@dataclass(frozen=True)
class _Facts:
    num_classes: int
    crop_padding: int
    hflip: bool


_FACTS = {
    DatasetName.DIGITS: _Facts(num_classes=10, crop_padding=0, hflip=False),
    DatasetName.SYNTHETIC: _Facts(num_classes=10, crop_padding=0, hflip=False),
    DatasetName.CIFAR10: _Facts(num_classes=10, crop_padding=4, hflip=True),
    DatasetName.CIFAR100: _Facts(num_classes=100, crop_padding=4, hflip=True),
    DatasetName.SVHN: _Facts(num_classes=10, crop_padding=4, hflip=False),
    DatasetName.TINY_IMAGENET: _Facts(num_classes=200, crop_padding=4, hflip=True),
}

DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_TRAIN_SIZE = 2000
SYNTHETIC_TEST_SIZE = 500
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_CACHE = "tensors.pt"
TINY_IMAGENET_SIZE = 64


def load_data(
    dataset: str | DatasetName,
    root: str | Path = "./data",
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataBundle:
    """Load a dataset into memory (on the CPU) and split it into train, validation and test.

    Args:
        dataset: a ``DatasetName`` or its config string, e.g. ``"cifar10"``.
        root: folder holding the dataset files (unused by ``digits`` and ``synthetic``).
        download: let torchvision download cifar10/cifar100/svhn when their files are missing.
        val_fraction: fraction of the training split held out as validation, in [0, 1); any
            positive fraction holds out at least one example.
        seed: decides the validation carve-out, the digits test split and the synthetic data.

    Raises:
        ConfigError: unknown dataset (key ``data.dataset``), bad ``val_fraction``
            (``data.val_fraction``), or dataset files missing or unreadable (``data.root``).
    """
    try:
        name = DatasetName(dataset)
    except ValueError:
        choices = ", ".join(member.value for member in DatasetName)
        raise ConfigError("data.dataset", f"unknown dataset {dataset!r}; choose one of {choices}") from None
    if not 0 <= val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {val_fraction}")

    root = Path(root).expanduser().absolute()
    loaders: dict[DatasetName, Callable[[], tuple[Split, Split]]] = {
        DatasetName.DIGITS: lambda: _load_digits(seed),
        DatasetName.SYNTHETIC: lambda: _make_synthetic(seed),
        DatasetName.CIFAR10: lambda: _load_cifar(name, root, download),
        DatasetName.CIFAR100: lambda: _load_cifar(name, root, download),
        DatasetName.SVHN: lambda: _load_svhn(root, download),
        DatasetName.TINY_IMAGENET: lambda: _load_tiny_imagenet(root, download),
    }
    full_train, test = loaders[name]()
    train, val = _carve_validation(full_train, val_fraction, _generator(seed, "validation"))
    facts = _FACTS[name]
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=facts.num_classes,
        in_channels=test.images.shape[1],
        image_size=test.images.shape[2],
        crop_padding=facts.crop_padding,
        hflip=facts.hflip,
    )


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Number of batches ``iterate_batches`` yields for ``n`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    crop_padding: int = 0,
    hflip: bool = False,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches: x float32 in [0, 1] of shape (B, C, H, W), y int64 of shape (B,).

    Args:
        split: the examples to go through once (one epoch).
        batch_size: examples per batch; the last batch is smaller unless ``drop_last``.
        shuffle: visit the examples in a random order instead of in order.
        generator: a CPU generator, the only source of randomness (order and augmentation), so an
            epoch is reproducible from its seed whatever the global RNG does. Required when
            shuffling or augmenting.
        crop_padding: pad each image with this many zero pixels per side, then crop back to the
            original size at a random offset per image; 0 disables cropping.
        hflip: mirror each image left-right with probability 0.5.
        drop_last: skip the final batch if it has fewer than ``batch_size`` examples.
        device: where the batches are returned; defaults to the split's device. Slicing and
            augmentation run on the split's device, so a GPU-resident split stays on the GPU.
    """
    augmenting = crop_padding > 0 or hflip
    if (shuffle or augmenting) and generator is None:
        raise ValueError("iterate_batches needs a generator to shuffle or augment")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    n = len(split)
    source = split.images.device
    target = source if device is None else torch.device(device)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for batch in range(num_batches(n, batch_size, drop_last)):
        indices = order[batch * batch_size : (batch + 1) * batch_size].to(source)
        images = split.images[indices]
        if augmenting:
            images = _crop_and_flip(images, crop_padding, hflip, generator)
        yield images.to(target).float() / 255, split.labels[indices].to(target)


def _crop_and_flip(
    images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, as one gather per batch.

    Each output pixel reads one pixel of the padded image at (offset_y + row, offset_x + col),
    with col reversed for flipped samples; a flat-index ``gather`` is much faster on the CPU than
    the equivalent four-tensor advanced indexing.
    """
    batch, channels, height, width = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator).to(device)
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    if hflip:
        flipped = (torch.rand(batch, generator=generator) < 0.5).to(device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    source_rows = (offsets[0][:, None] + rows)[:, :, None]
    source_cols = (offsets[1][:, None] + cols)[:, None, :]
    flat_index = (source_rows * padded_width + source_cols).reshape(batch, 1, height * width)
    pixels = padded.flatten(2).gather(2, flat_index.expand(batch, channels, height * width))
    return pixels.reshape(batch, channels, height, width)


def _generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one decision, so that different decisions use unrelated streams.

    torch's CPU generator keeps only the low 32 bits of a seed; multiplying by an odd constant
    keeps distinct seeds distinct modulo 2**32 for every purpose.
    """
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(purpose.encode())) % 2**32)


def _carve_validation(full: Split, val_fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Split off the first ``round(val_fraction * N)`` examples of a seeded permutation."""
    n_val = round(val_fraction * len(full))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(full) - 1)
    order = torch.randperm(len(full), generator=generator)
    val, train = order[:n_val], order[n_val:].sort().values
    return _subset(full, train), _subset(full, val)


def _subset(split: Split, indices: torch.Tensor) -> Split:
    return Split(split.images[indices], split.labels[indices])


def _stratified_holdout(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): about ``fraction`` of each class held out, both in random order."""
    order = torch.randperm(len(labels), generator=generator)
    one_hot = F.one_hot(labels[order])
    rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    quota = torch.round(one_hot.sum(0) * fraction)
    held_out = rank_in_class < quota[labels[order]]
    return order[~held_out], order[held_out]


def _load_digits(seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = torch.from_numpy(digits.images)
    images = torch.round(values * 255 / 16).to(torch.uint8).unsqueeze(1)
    full = Split(images, torch.from_numpy(digits.target).long())
    kept, held_out = _stratified_holdout(full.labels, DIGITS_TEST_FRACTION, _generator(seed, "digits-test"))
    return _subset(full, kept.sort().values), _subset(full, held_out.sort().values)


def _make_synthetic(seed: int) -> tuple[Split, Split]:
    """Ten classes of 3x16x16 images: smooth class pattern + smooth distractor + noise."""
    generator = _generator(seed, "synthetic")
    num_classes, size, n = 10, 16, SYNTHETIC_TRAIN_SIZE + SYNTHETIC_TEST_SIZE

    def smooth_fields(count: int) -> torch.Tensor:
        coarse = torch.randn(count, 3, 4, 4, generator=generator)
        fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        return fields / fields.flatten(1).std(1)[:, None, None, None]

    prototypes = smooth_fields(num_classes)
    labels = torch.randperm(n, generator=generator) % num_classes
    shifts = torch.randint(-2, 3, (n, 2), generator=generator)
    patterns = torch.stack(
        [torch.roll(prototypes[label], (int(dy), int(dx)), dims=(1, 2)) for label, (dy, dx) in zip(labels, shifts)]
    )
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator)
    distractors = smooth_fields(n)
    noise = torch.randn(n, 3, size, size, generator=generator)
    pixels = 128 + 32 * (contrast * patterns + 0.9 * distractors + 0.6 * noise)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    full = Split(images, labels)
    return full.head(SYNTHETIC_TRAIN_SIZE), _subset(full, torch.arange(SYNTHETIC_TRAIN_SIZE, n))


def _not_found(name: DatasetName, where: Path) -> ConfigError:
    return ConfigError(
        "data.root", f"{name.value} not found in {where}; set data.download: true or point data.root at it"
    )


def _unreadable(name: DatasetName, where: Path, error: Exception) -> ConfigError:
    return ConfigError("data.root", f"{name.value} in {where} could not be read ({type(error).__name__}: {error})")


def _download_failed(name: DatasetName, where: Path, error: Exception) -> ConfigError:
    return ConfigError("data.root", f"downloading {name.value} into {where} failed ({type(error).__name__}: {error})")


def _load_cifar(name: DatasetName, root: Path, download: bool) -> tuple[Split, Split]:
    """Read the python pickles of cifar-10-batches-py / cifar-100-python."""
    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if name == DatasetName.CIFAR10 else torchvision.datasets.CIFAR100
    folder = root / dataset_class.base_folder
    train_files = [folder / file_name for file_name, _ in dataset_class.train_list]
    test_files = [folder / file_name for file_name, _ in dataset_class.test_list]
    if not all(path.is_file() for path in train_files + test_files):
        if not download:
            raise _not_found(name, folder)
        try:
            dataset_class(str(root), train=True, download=True)
        except (RuntimeError, OSError) as error:
            raise _download_failed(name, root, error) from error
    try:
        return _read_cifar_pickles(train_files), _read_cifar_pickles(test_files)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as error:
        raise _unreadable(name, folder, error) from error


def _read_cifar_pickles(paths: list[Path]) -> Split:
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as file:
            # latin1 is what numpy needs for arrays pickled by Python 2; keys may be str or bytes.
            entry = {_as_str(key): value for key, value in pickle.load(file, encoding="latin1").items()}
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


def _as_str(key: str | bytes) -> str:
    return key.decode("latin1") if isinstance(key, bytes) else key


def _load_svhn(root: Path, download: bool) -> tuple[Split, Split]:
    """Read train_32x32.mat and test_32x32.mat (label 10 stands for digit 0)."""
    import torchvision
    from scipy.io import loadmat

    splits = {}
    for split in ("train", "test"):
        path = root / torchvision.datasets.SVHN.split_list[split][1]
        if not path.is_file():
            if not download:
                raise _not_found(DatasetName.SVHN, path)
            try:
                torchvision.datasets.SVHN(str(root), split=split, download=True)
            except (RuntimeError, OSError) as error:
                raise _download_failed(DatasetName.SVHN, root, error) from error
        try:
            mat = loadmat(path)
            images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)
            labels = mat["y"].astype(np.int64).reshape(-1) % 10
        except (OSError, ValueError, KeyError) as error:
            raise _unreadable(DatasetName.SVHN, path, error) from error
        splits[split] = Split(torch.from_numpy(images), torch.from_numpy(labels))
    return splits["train"], splits["test"]


def _load_tiny_imagenet(root: Path, download: bool) -> tuple[Split, Split]:
    """Read tiny-imagenet-200 (its labelled val folder is the test split), via a tensor cache."""
    folder = root / TINY_IMAGENET_FOLDER
    cache = folder / TINY_IMAGENET_CACHE
    if cache.is_file():
        tensors = torch.load(cache, weights_only=True)
        train = Split(tensors["train_images"], tensors["train_labels"])
        test = Split(tensors["test_images"], tensors["test_labels"])
        return train, test
    annotations = folder / "val" / "val_annotations.txt"
    if not (folder / "train").is_dir() or not annotations.is_file():
        if download:
            raise ConfigError(
                "data.download",
                f"tiny-imagenet cannot be downloaded automatically; "
                f"fetch {TINY_IMAGENET_FOLDER} manually and unzip it into {root}",
            )
        raise _not_found(DatasetName.TINY_IMAGENET, folder)

    wnids_file = folder / "wnids.txt"
    if wnids_file.is_file():
        wnids = sorted(line.strip() for line in wnids_file.read_text().splitlines() if line.strip())
    else:
        wnids = sorted(path.name for path in (folder / "train").iterdir() if path.is_dir())
    class_of = {wnid: index for index, wnid in enumerate(wnids)}

    train_items = [
        (path, class_of[wnid]) for wnid in wnids for path in sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
    ]
    test_items = []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            test_items.append((folder / "val" / "images" / fields[0], class_of[fields[1]]))
    train, test = _decode_images(train_items), _decode_images(test_items)

    tensors = {
        "train_images": train.images,
        "train_labels": train.labels,
        "test_images": test.images,
        "test_labels": test.labels,
    }
    # Written to a temporary name and renamed, so concurrent trials never read a half-written cache.
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        torch.save(tensors, partial)
        os.replace(partial, cache)
    except OSError:
        partial.unlink(missing_ok=True)  # a read-only data root just means decoding again next time
    return train, test


def _decode_images(items: list[tuple[Path, int]]) -> Split:
    from PIL import Image

    size = TINY_IMAGENET_SIZE
    images = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    for index, (path, _) in enumerate(items):
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
        except OSError as error:
            raise _unreadable(DatasetName.TINY_IMAGENET, path, error) from error
        if pixels.shape != (size, size, 3):
            raise ConfigError("data.root", f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected {size}x{size}")
        images[index] = torch.from_numpy(pixels).permute(2, 0, 1)
    return Split(images, torch.tensor([label for _, label in items], dtype=torch.int64))
