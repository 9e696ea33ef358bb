"""A dataset in memory: uint8 NCHW images and int64 labels per split, and how splits are carved.

Splits are pure functions of ``(dataset, seed, val_fraction)``. The validation split is always carved out
of the training split (searches select on it, never on test), and the test split never depends on
``val_fraction``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


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

    def select(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.labels))


@dataclass
class DataBundle:
    """A loaded dataset: its three splits plus what models and the loader need to know.

    Attributes:
        name: which dataset this is (its registry name, ``data.dataset``).
        train: the training split minus the validation examples.
        val: validation examples carved out of the training split (never out of test).
        test: the dataset's test split.
        num_classes: number of classes; labels lie in ``[0, num_classes)``.
        in_channels: image channels (1 for digits, 3 otherwise).
        image_size: image height and width in pixels.
        crop_padding: zero padding for the random-crop augmentation; 0 means no crop.
        hflip: whether random horizontal flips are a valid augmentation for this dataset.
    """

    name: str
    train: Split  # or, for an image folder, a FolderSplit (tune_mtard/data/folders.py)
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


def generator_for(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one decision, so that different decisions use unrelated streams.

    torch's CPU generator keeps only the low 32 bits of a seed; multiplying by an odd constant
    keeps distinct seeds distinct modulo 2**32 for every purpose.
    """
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(purpose.encode())) % 2**32)


def carve_validation(full: Split, val_fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Split off the first ``round(val_fraction * N)`` examples of a seeded permutation."""
    n_val = round(val_fraction * len(full))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(full) - 1)
    order = torch.randperm(len(full), generator=generator)
    val, train = order[:n_val], order[n_val:].sort().values
    return subset(full, train), subset(full, val)


def subset(split: Split, indices: torch.Tensor) -> Split:
    """The examples at ``indices``; an image folder's split (data/folders.py) selects its files the same way."""
    return split.select(indices)


def stratified_holdout(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): about ``fraction`` of each class held out, both in random order."""
    order = torch.randperm(len(labels), generator=generator)
    one_hot = F.one_hot(labels[order])
    rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    quota = torch.round(one_hot.sum(0) * fraction)
    held_out = rank_in_class < quota[labels[order]]
    return order[~held_out], order[held_out]
