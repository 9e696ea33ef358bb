"""Batches of a split in memory: ``iterate_batches`` slices, augments (random crop and flip) and converts
them with batched tensor ops on whatever device the split lives on, so a split on the GPU never touches
the host after loading. Models receive floats in [0, 1]; any normalisation lives inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

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
