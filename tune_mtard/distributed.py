"""One training run as N data-parallel workers that train exactly as one would (docs/scale.md, "Workers").

Each global batch of ``data.batch_size`` is cut into N contiguous shards, one per worker (sizes differing by at
most one, as ``numpy.array_split`` cuts). For the N workers to follow the single-worker run step by step:

* every statistic the step reduces over the batch is reduced over the *global* batch: the balancers' inputs
  (:meth:`Workers.mean`, weighted by each shard's size), BatchNorm's batch statistics
  (:class:`SyncBatchNorm`) and the gradients (:meth:`Workers.average_gradients`, weighted the same way);
* the PGD random start of each worker is its rows of the start the global batch would draw
  (:func:`global_noise`): every worker keeps the same RNG stream and draws the global batch's noise.

``torch.distributed`` must be initialised (``gloo`` on CPUs, ``nccl`` on GPUs) before :class:`Workers` is
built; with one worker, or none given, nothing here changes the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn


@dataclass(frozen=True)
class Shard:
    """The rows ``start:stop`` of a global batch of ``total`` rows that this worker trains on."""

    start: int
    stop: int
    total: int

    @property
    def weight(self) -> float:
        """This shard's share of the global batch: what its batch means count for in the global mean."""
        return (self.stop - self.start) / self.total


def shard_of(total: int, rank: int, size: int) -> Shard:
    """Worker ``rank``'s rows of a global batch of ``total`` rows (the first ``total % size`` shards one longer)."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return Shard(start, start + base + (1 if rank < extra else 0), total)


_current: tuple[Workers, Shard] | None = None  # the workers and shard of the step being trained, during it


@contextlib.contextmanager
def training_shard(workers: Workers | None, shard: Shard | None) -> Iterator[None]:
    """Within the block, :func:`global_mean` reduces over ``workers`` and random starts are drawn as the
    global batch's and cut to ``shard``; with no workers, both are what one process computes."""
    global _current
    previous, _current = _current, (None if workers is None or shard is None else (workers, shard))
    try:
        yield
    finally:
        _current = previous


def global_mean(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Batch means of this worker's rows as the global batch's (a method's balancer inputs, before its update);
    the values themselves outside a multi-worker step."""
    if _current is None:
        return values
    workers, shard = _current
    return workers.mean(shard, *values)


def global_noise(like: torch.Tensor) -> torch.Tensor | None:
    """N(0, I) noise for ``like`` (this worker's rows of the step's batch): the global batch's noise, drawn in
    NCHW order from the RNG every worker shares, cut to this worker's rows. None outside a multi-worker step."""
    if _current is None or like.shape[0] != _current[1].stop - _current[1].start:
        return None
    shard = _current[1]
    noise = torch.randn((shard.total, *like.shape[1:]), dtype=like.dtype, device=like.device)
    return noise[shard.start:shard.stop]


class Workers:
    """This process's place among the run's workers, and the reductions that make them train as one."""

    def __init__(self, rank: int | None = None, size: int | None = None):
        self.rank = dist.get_rank() if rank is None else rank
        self.size = dist.get_world_size() if size is None else size

    @property
    def is_first(self) -> bool:
        """Rank 0 writes the records, files and checkpoints; the others only train."""
        return self.rank == 0

    def shard(self, total: int) -> Shard:
        return shard_of(total, self.rank, self.size)

    def mean(self, shard: Shard, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each of ``values`` (a mean over this worker's rows) as the mean over the global batch."""
        stacked = torch.stack([v.detach().float().reshape(()) for v in values]) * shard.weight
        dist.all_reduce(stacked)
        return tuple(stacked[i].to(values[i].dtype) for i in range(len(values)))

    def mean_row(self, shard: Shard, row: torch.Tensor) -> torch.Tensor:
        """A step's trace row as the global batch's: each worker's weighted by its share and summed."""
        total = row * shard.weight
        dist.all_reduce(total)
        return total

    def average_gradients(self, parameters: Iterator[nn.Parameter], shard: Shard) -> None:
        """Every gradient as the global batch's: each worker's (of its shard's mean loss) weighted by its share
        and summed, in one flat all-reduce."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]) * shard.weight
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every worker (a resumed or freshly seeded student)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are the global batch's, on any device and backend
    (torch's own SyncBatchNorm runs on CUDA only). The per-channel sums and sums of squares are summed across
    workers with an autograd-aware all-reduce, in float64, so the gradients flow through the global statistics
    as they do in one process; running statistics are updated from the global mean and unbiased variance. In
    eval mode (PGD, validation) it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        x64 = x.double()
        count = torch.tensor([x.numel() / channels], dtype=torch.float64, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels:2 * channels] / total - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        shape = (1, channels, 1, 1)
        y = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def synchronise_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a :class:`SyncBatchNorm` holding the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            synced = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(next(child.buffers(), torch.empty(0)).device)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            synchronise_batch_norm(child)
    return module


__all__ = ["Shard", "SyncBatchNorm", "Workers", "global_mean", "global_noise", "shard_of", "synchronise_batch_norm",
           "training_shard"]
