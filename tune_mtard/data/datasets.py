"""The datasets, one registry entry each (``data.dataset``), loaded once into memory on the CPU.

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

``imagefolder`` indexes ``root/train/<class>/`` and ``root/val/<class>/`` and streams them from disk
(``data/folders.py``): its classes are read from the folder (registered as 0) and its images are cropped to
``data.image_size``; Tiny-ImageNet's folder reads through it too.

Adding a dataset: a loader ``(root, download, seed) -> (train, test)`` decorated with
``@register_dataset(...)`` stating its shape and augmentation.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tune_mtard import atomic
from tune_mtard.data.folders import CROPS, PADDED_CROP_PADDING, FolderSplit, ImageView, scan_image_folder
from tune_mtard.data.splits import DataBundle, Split, carve_validation, generator_for, stratified_holdout, subset
from tune_mtard.errors import ConfigError
from tune_mtard.registry import Registry

if TYPE_CHECKING:
    from tune_mtard.config import Config

Loader = Callable[[Path, bool, int], "tuple[Split, Split]"]


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a dataset without loading it: its shape, size and valid augmentation.

    Attributes:
        num_classes: labels lie in ``[0, num_classes)``.
        channels, image_size: images are ``channels x image_size x image_size``.
        num_images: images in all splits together (memory estimates use it: ``bench memory``).
        (``num_classes``, ``image_size`` and ``num_images`` are 0 for an image folder: they are the folder's and
        ``data.image_size``.)
        crop_padding: zero padding of the random-crop augmentation; 0 means no crop.
        hflip: whether random horizontal flips are a valid augmentation.
        load: ``(root, download, seed) -> (train, test)``, the whole training split and the test split.
    """

    num_classes: int
    channels: int
    image_size: int
    num_images: int
    crop_padding: int
    hflip: bool
    load: Loader


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(name: str, *, num_classes: int, channels: int, image_size: int, num_images: int,
                     crop_padding: int, hflip: bool) -> Callable[[Loader], Loader]:
    def add(load: Loader) -> Loader:
        DATASETS.add(name, DatasetInfo(num_classes, channels, image_size, num_images, crop_padding, hflip, load))
        return load

    return add


DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_TRAIN_SIZE = 2000
SYNTHETIC_TEST_SIZE = 500
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_CACHE = "tensors.pt"
TINY_IMAGENET_SIZE = 64
DEFAULT_VIEW = ImageView()  # how an image folder is read when the config says nothing


def load_data(dataset: str | Config, root: str | Path = "./data", download: bool = False, val_fraction: float = 0.1,
              seed: int = 0, view: ImageView = DEFAULT_VIEW) -> DataBundle:
    """Load a dataset into memory (on the CPU), or index an image folder, and split it into train, validation
    and test.

    Args:
        dataset: its registry name (``data.dataset``), e.g. ``"cifar10"``; or a run config, whose ``data.*``
            and ``seed`` then give every argument (``load_data(cfg)``, what every command calls).
        root: folder holding the dataset files (unused by ``digits`` and ``synthetic``).
        download: let torchvision download cifar10/cifar100/svhn when their files are missing.
        val_fraction: fraction of the training split held out as validation, in [0, 1); any
            positive fraction holds out at least one example.
        seed: decides the validation carve-out, the digits test split and the synthetic data.
        view: how an image folder's images are cropped and decoded (``imagefolder`` only).

    Raises:
        ConfigError: unknown dataset (key ``data.dataset``), bad ``val_fraction``
            (``data.val_fraction``), or dataset files missing or unreadable (``data.root``).
    """
    if not isinstance(dataset, str):
        d = dataset.data
        return load_data(d.dataset, d.root, d.download, d.val_fraction, dataset.seed,
                         view=ImageView(d.image_size, d.crop, d.loader_workers))
    if dataset not in DATASETS:
        raise ConfigError("data.dataset", f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not 0 <= val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {val_fraction}")
    info = DATASETS.get(dataset)
    full_train, test = info.load(Path(root).expanduser().absolute(), download, seed)
    num_classes, crop_padding = info.num_classes, info.crop_padding
    if isinstance(full_train, FolderSplit):
        if view.crop not in CROPS:
            raise ConfigError("data.crop", f"must be one of {', '.join(CROPS)}, got {view.crop!r}")
        full_train, test = full_train.with_view(view), test.with_view(view)
        num_classes = len(full_train.classes)
        crop_padding = PADDED_CROP_PADDING if view.crop == "padded" else 0
    train, val = carve_validation(full_train, val_fraction, generator_for(seed, "validation"))
    return DataBundle(name=dataset, train=train, val=val, test=test, num_classes=num_classes,
                      in_channels=test.channels, image_size=test.image_size,
                      crop_padding=crop_padding, hflip=info.hflip)


@register_dataset("digits", num_classes=10, channels=1, image_size=8, num_images=1797, crop_padding=0, hflip=False)
def _load_digits(root: Path, download: bool, seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = torch.from_numpy(digits.images)
    images = torch.round(values * 255 / 16).to(torch.uint8).unsqueeze(1)
    full = Split(images, torch.from_numpy(digits.target).long())
    kept, held_out = stratified_holdout(full.labels, DIGITS_TEST_FRACTION, generator_for(seed, "digits-test"))
    return subset(full, kept.sort().values), subset(full, held_out.sort().values)


@register_dataset("synthetic", num_classes=10, channels=3, image_size=16,
                  num_images=SYNTHETIC_TRAIN_SIZE + SYNTHETIC_TEST_SIZE, crop_padding=0, hflip=False)
def _make_synthetic(root: Path, download: bool, seed: int) -> tuple[Split, Split]:
    """Ten classes of 3x16x16 images: smooth class pattern + smooth distractor + noise."""
    generator = generator_for(seed, "synthetic")
    num_classes, size, n = 10, 16, SYNTHETIC_TRAIN_SIZE + SYNTHETIC_TEST_SIZE

    def smooth_fields(count: int) -> torch.Tensor:
        coarse = torch.randn(count, 3, 4, 4, generator=generator)
        fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        return fields / fields.flatten(1).std(1)[:, None, None, None]

    prototypes = smooth_fields(num_classes)
    labels = torch.randperm(n, generator=generator) % num_classes
    shifts = torch.randint(-2, 3, (n, 2), generator=generator)
    patterns = torch.stack(
        [torch.roll(prototypes[label], (int(dy), int(dx)), dims=(1, 2))
         for label, (dy, dx) in zip(labels, shifts, strict=True)]
    )
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator)
    distractors = smooth_fields(n)
    noise = torch.randn(n, 3, size, size, generator=generator)
    pixels = 128 + 32 * (contrast * patterns + 0.9 * distractors + 0.6 * noise)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    full = Split(images, labels)
    return full.head(SYNTHETIC_TRAIN_SIZE), subset(full, torch.arange(SYNTHETIC_TRAIN_SIZE, n))


def _not_found(name: str, where: Path) -> ConfigError:
    return ConfigError(
        "data.root", f"{name} not found in {where}; set data.download: true or point data.root at it"
    )


def _unreadable(name: str, where: Path, error: Exception) -> ConfigError:
    return ConfigError("data.root", f"{name} in {where} could not be read ({type(error).__name__}: {error})")


def _download_failed(name: str, where: Path, error: Exception) -> ConfigError:
    return ConfigError("data.root", f"downloading {name} into {where} failed ({type(error).__name__}: {error})")


@register_dataset("cifar10", num_classes=10, channels=3, image_size=32, num_images=60000, crop_padding=4, hflip=True)
def _load_cifar10(root: Path, download: bool, seed: int) -> tuple[Split, Split]:
    return _load_cifar("cifar10", root, download)


@register_dataset("cifar100", num_classes=100, channels=3, image_size=32, num_images=60000, crop_padding=4,
                  hflip=True)
def _load_cifar100(root: Path, download: bool, seed: int) -> tuple[Split, Split]:
    return _load_cifar("cifar100", root, download)


def _load_cifar(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    """Read the python pickles of cifar-10-batches-py / cifar-100-python."""
    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
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


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch and nothing else: the format holds a dict of bytes, lists and one uint8 numpy
    array, so only numpy's array builders may be called; any other global (``os.system``, a class of some
    package) is refused, so a planted file in ``data.root`` cannot run code (docs/configuration.md, "Datasets")."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2 (a batch saved again)

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to build {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_pickles(paths: list[Path]) -> Split:
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as file:
            # latin1 is what numpy needs for arrays pickled by Python 2; keys may be str or bytes.
            entry = {_as_str(key): value for key, value in BatchUnpickler(file, encoding="latin1").load().items()}
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


def _as_str(key: str | bytes) -> str:
    return key.decode("latin1") if isinstance(key, bytes) else key


@register_dataset("svhn", num_classes=10, channels=3, image_size=32, num_images=99289, crop_padding=4, hflip=False)
def _load_svhn(root: Path, download: bool, seed: int) -> tuple[Split, Split]:
    """Read train_32x32.mat and test_32x32.mat (label 10 stands for digit 0)."""
    import torchvision
    from scipy.io import loadmat

    splits = {}
    for split in ("train", "test"):
        path = root / torchvision.datasets.SVHN.split_list[split][1]
        if not path.is_file():
            if not download:
                raise _not_found("svhn", path)
            try:
                torchvision.datasets.SVHN(str(root), split=split, download=True)
            except (RuntimeError, OSError) as error:
                raise _download_failed("svhn", root, error) from error
        try:
            mat = loadmat(path)
            images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)
            labels = mat["y"].astype(np.int64).reshape(-1) % 10
        except (OSError, ValueError, KeyError) as error:
            raise _unreadable("svhn", path, error) from error
        splits[split] = Split(torch.from_numpy(images), torch.from_numpy(labels))
    return splits["train"], splits["test"]


@register_dataset("tiny-imagenet", num_classes=200, channels=3, image_size=TINY_IMAGENET_SIZE, num_images=110000,
                  crop_padding=4, hflip=True)
def _load_tiny_imagenet(root: Path, download: bool, seed: int) -> tuple[Split, Split]:
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
        raise _not_found("tiny-imagenet", folder)

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
    try:
        with atomic.open_atomic(cache, "wb") as f:
            torch.save(tensors, f)
    except OSError:
        pass  # a read-only data root just means decoding again next time
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
            raise _unreadable("tiny-imagenet", path, error) from error
        if pixels.shape != (size, size, 3):
            raise ConfigError("data.root", f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected {size}x{size}")
        images[index] = torch.from_numpy(pixels).permute(2, 0, 1)
    return Split(images, torch.tensor([label for _, label in items], dtype=torch.int64))


@register_dataset("imagefolder", num_classes=0, channels=3, image_size=0, num_images=0, crop_padding=0, hflip=True)
def _index_image_folder(root: Path, download: bool, seed: int) -> tuple[FolderSplit, FolderSplit]:
    """``root/train/<class>/`` and ``root/val/<class>/``, indexed, never decoded whole (data/folders.py)."""
    if download:
        raise ConfigError("data.download", "an image folder cannot be downloaded; point data.root at it")
    return scan_image_folder(root)
