"""Where a run computes, and the GPU fast path (config ``perf``, docs/gpu.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tune_mtard.config import AUTO, Config
from tune_mtard.data import DataBundle
from tune_mtard.errors import ConfigError

# ``perf.data_on_device: auto`` keeps a dataset on the GPU when it takes at most this share of the card's
# memory: trials sharing a card through fractional ``search.resources`` each hold their own copy.
DEVICE_DATA_SHARE = 0.1


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; a device this machine lacks is a ConfigError on ``device``."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("device", f"{name!r}, but this machine has no CUDA device (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise ConfigError("device", f"{name!r}, but this machine has {count} CUDA device(s): cuda:0 to "
                                        f"cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", f"{name!r}, but MPS is not available on this machine (use auto or cpu)")
    return device


def trial_device(name: str, gpus: float) -> torch.device:
    """Where a search trial computes, given the GPUs Ray reserved for it: a trial with none runs on the CPU,
    whatever ``auto`` would pick (Ray 2.60 no longer hides the cards from such a trial; docs/gpu.md,
    "GPUs in a search")."""
    if gpus <= 0 and name in (AUTO, "cpu"):
        return torch.device("cpu")
    return resolve_device(name)


def check_trial_device(name: str, gpus: float) -> None:
    """``device`` against ``search.resources.gpu``, before a search starts: a trial must compute where Ray
    reserved room for it, and inside a trial the reserved cards are the only visible ones (cuda:0, ...)."""
    device = torch.device("cpu" if name == AUTO else name)
    if device.type == "cuda" and gpus <= 0:
        raise ConfigError("device", f"{name!r}, but search.resources.gpu is 0: trials would use a card Ray never "
                                    "reserved (set search.resources.gpu, or device: auto or cpu)")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ConfigError("device", f"{name!r}: a trial sees only the cards Ray gave it, as cuda:0 upwards "
                                    "(use device: cuda or auto)")
    if device.type == "cpu" and name != AUTO and gpus > 0:
        raise ConfigError("search.resources.gpu", f"({gpus:g}) reserves GPUs that device: cpu never uses "
                                                  "(set it to 0, or device: auto)")


def release_cuda_memory() -> None:
    """Give the CUDA memory this process cached back to the card, so the trials Ray places there get it."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def data_bytes(data: DataBundle) -> int:
    """Bytes of a bundle's images and labels held in memory, all splits (an image folder's pixels stay on disk)."""
    return sum(split.nbytes() for split in (data.train, data.val, data.test))


@dataclass
class PerfOptions:
    """The GPU fast path resolved for one device: ``auto`` means on for CUDA, off elsewhere.

    bf16: autocast to bfloat16 for the student's and teachers' forwards during training, training PGD
        included, with the frozen teachers' weights stored in bf16; losses and balancing stay fp32, validation
        and every evaluation attack strict fp32 (no TF32). ``auto`` turns it on only for a card with native
        bf16 (Ampere or later).
    channels_last: student, teachers and batches in NHWC memory format.
    compile: ``torch.compile`` of the student with static shapes (off unless asked: each trial pays the
        compilation).
    data_on_device: the uint8 dataset lives on the device, and batching, crop and flip run there.
    """

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    data_on_device: bool = False

    @classmethod
    def resolve(cls, cfg: Config, device: torch.device, dataset_bytes: int = 0) -> PerfOptions:
        on_cuda = device.type == "cuda"

        def pick(value: bool | str) -> bool:
            return on_cuda if value == AUTO else bool(value)

        p = cfg.perf
        bf16 = pick(p.bf16)
        if p.bf16 == AUTO and on_cuda:
            # torch.cuda.is_bf16_supported(including_emulation=False), for this device rather than the current
            # one: older cards emulate bf16, much slower than fp32.
            bf16 = torch.cuda.get_device_properties(device).major >= 8
        data_on_device = pick(p.data_on_device)
        if p.data_on_device == AUTO and on_cuda:
            data_on_device = dataset_bytes <= DEVICE_DATA_SHARE * torch.cuda.get_device_properties(device).total_memory
        return cls(bf16=bf16, channels_last=pick(p.channels_last), compile=bool(p.compile),
                   data_on_device=data_on_device)
