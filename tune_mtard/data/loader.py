"""Batches of a split in memory: ``iterate_batches`` slices, augments (random crop and flip) and converts
them with batched tensor ops, and on a GPU never makes the host wait (docs/gpu.md, "The loader").

Every random draw of an epoch (the order, each image's crop offsets and flip) is made on the CPU from the
caller's generator when the epoch starts, in the order the draws were always made, and copied to the
device once; each step then only slices device tensors. A split on the GPU never touches the host after
loading. A split on the host is gathered into pinned memory and copied without blocking, one batch ahead
of the one being trained on. Models receive floats in [0, 1]; any normalisation lives inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tune_mtard.data.folders import FolderSplit, stream_batches
from tune_mtard.data.splits import Split


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
            shuffling or augmenting. The whole epoch's draws are taken from it by the first batch.
        crop_padding: pad each image with this many zero pixels per side, then crop back to the
            original size at a random offset per image; 0 disables cropping.
        hflip: mirror each image left-right with probability 0.5.
        drop_last: skip the final batch if it has fewer than ``batch_size`` examples.
        device: where the batches are returned; defaults to the split's device. Examples are gathered
            where the split lives; crop, flip and the conversion to floats run on ``device``.
    """
    augmenting = crop_padding > 0 or hflip
    if (shuffle or augmenting) and generator is None:
        raise ValueError("iterate_batches needs a generator to shuffle or augment")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if isinstance(split, FolderSplit):  # decoded and augmented by loader workers; the view says how it crops
        yield from stream_batches(split, batch_size, shuffle=shuffle, generator=generator, hflip=hflip,
                                  augment=augmenting, drop_last=drop_last,
                                  device=None if device is None else torch.device(device))
        return
    source = split.images.device
    target = source if device is None else torch.device(device)
    plan = EpochPlan.draw(len(split), batch_size, drop_last, shuffle, crop_padding if augmenting else None, hflip,
                          generator)
    order = _to_device(plan.order, source) if shuffle else torch.arange(len(split), device=source)
    offsets = None if plan.offsets is None else _to_device(plan.offsets, target)
    flips = None if plan.flips is None else _to_device(plan.flips, target)
    # Host gathers land in pinned memory so the copy to the GPU does not block; one batch is prepared ahead.
    pinned = source.type == "cpu" and target.type == "cuda"

    def prepare(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(batch * batch_size, (batch + 1) * batch_size)
        indices = order[rows]
        images = _to_device(_gather(split.images, indices, pinned), target)
        labels = _to_device(_gather(split.labels, indices, pinned), target)
        if augmenting:
            images = _crop_and_flip(images, crop_padding, offsets[:, rows], None if flips is None else flips[rows])
        return images.float() / 255, labels

    total = num_batches(len(split), batch_size, drop_last)
    ahead = prepare(0) if total else None
    for batch in range(total):
        current = ahead
        ahead = prepare(batch + 1) if batch + 1 < total else None
        yield current


@dataclass
class EpochPlan:
    """An epoch's random draws, on the CPU: the visiting order, and for augmented batches each image's crop
    offsets (rows 0 and 1: y and x) and flip. ``None`` for what the epoch does not draw."""

    order: torch.Tensor | None
    offsets: torch.Tensor | None
    flips: torch.Tensor | None

    @classmethod
    def draw(cls, n: int, batch_size: int, drop_last: bool, shuffle: bool, crop_padding: int | None, hflip: bool,
             generator: torch.Generator | None) -> EpochPlan:
        """Draw in the order batch-by-batch loading always drew (the order, then per batch its offsets and
        flips), so the batches stay bit-identical to that loader's for the same generator.

        ``crop_padding`` is ``None`` when the epoch does not augment; offsets are drawn whenever it does
        (all zero without cropping), as before.
        """
        order = torch.randperm(n, generator=generator) if shuffle else None
        if crop_padding is None:
            return cls(order, None, None)
        offsets, flips = [], []
        for batch in range(num_batches(n, batch_size, drop_last)):
            size = min(batch_size, n - batch * batch_size)
            offsets.append(torch.randint(0, 2 * crop_padding + 1, (2, size), generator=generator))
            if hflip:
                flips.append(torch.rand(size, generator=generator) < 0.5)
        return cls(order, torch.cat(offsets, 1), torch.cat(flips) if hflip else None)


def _gather(tensor: torch.Tensor, indices: torch.Tensor, pinned: bool) -> torch.Tensor:
    if not pinned:
        return tensor.index_select(0, indices)
    out = torch.empty((len(indices), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
    return torch.index_select(tensor, 0, indices, out=out)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without blocking the host."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


def _crop_and_flip(
    images: torch.Tensor, padding: int, offsets: torch.Tensor, flipped: torch.Tensor | None
) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, as one gather per batch.

    ``offsets`` (2, B) are each image's crop position in the padded image (y, x); ``flipped`` (B,) which
    images are mirrored. Each output pixel reads one pixel of the padded image at
    (offset_y + row, offset_x + col), with col reversed for flipped samples; a flat-index ``gather`` is much
    faster on the CPU than the equivalent four-tensor advanced indexing.
    """
    batch, channels, height, width = images.shape
    device = images.device
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    if flipped is not None:
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    source_rows = (offsets[0][:, None] + rows)[:, :, None]
    source_cols = (offsets[1][:, None] + cols)[:, None, :]
    flat_index = (source_rows * padded_width + source_cols).reshape(batch, 1, height * width)
    pixels = padded.flatten(2).gather(2, flat_index.expand(batch, channels, height * width))
    return pixels.reshape(batch, channels, height, width)
