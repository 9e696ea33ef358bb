"""``bench memory``: one trial's GPU memory estimated on the CPU, and how many trials share a card
(docs/performance.md, "How many trials share one GPU")."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tune_mtard.benchmarks.machine import machine_info
from tune_mtard.config import Config
from tune_mtard.data import DATASETS
from tune_mtard.errors import ConfigError
from tune_mtard.models import create_model

GIB = 2**30
# A CUDA context with torch's kernels loaded, cuBLAS/cuDNN workspaces and allocator slack, per trial process.
# Assumed (typical of torch on an H100), not measured here.
CUDA_PROCESS_OVERHEAD_GIB = 1.0
# Leave this share of the card unplanned (fragmentation, evaluation batches, spikes).
GPU_HEADROOM = 0.1


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor, autocast_bf16: bool = False) -> int:
    """Bytes autograd keeps for the backward of one train-mode forward, parameters themselves not counted.

    Tensors are told apart by storage (by object on the meta device, which has no storage to compare).
    """
    def key(t: torch.Tensor) -> int:
        return id(t) if t.is_meta else t.untyped_storage().data_ptr()

    parameters = {key(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if key(t) not in parameters:
            saved[key(t)] = t.numel() * t.element_size() if t.is_meta else t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x)
    return sum(saved.values())


def _largest_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """The largest output of any module in an eval-mode forward without grad (on the meta device: no compute)."""
    largest = 0

    def hook(module, args, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return largest


def bench_memory(cfg: Config, batch_size: int | None, gpu_gib: float) -> dict[str, Any]:
    """GPU memory of one B-MTARD trial, estimated on the CPU, and how many trials fit on one card.

    fp32: exact autograd-saved bytes from a forward on the meta device. bf16: measured on the CPU under
    bf16 autocast at batch sizes 1 and 2 and extrapolated linearly (saved bytes are affine in the batch).
    """
    info = DATASETS.get(cfg.data.dataset)  # its shape is known without loading it
    channels, side, classes, n_images = info.channels, info.image_size, info.num_classes, info.num_images
    if cfg.data.dataset == "imagefolder":  # streamed from disk: nothing of it on the device; classes from its folder
        train = Path(cfg.data.root) / "train"
        if not train.is_dir():
            raise ConfigError("data.root", f"imagefolder needs {train} (one sub-folder per class)")
        side, classes, n_images = cfg.data.image_size, sum(path.is_dir() for path in train.iterdir()), 0
    batch = batch_size or cfg.data.batch_size

    def build(arch: str, device: str) -> nn.Module:
        with torch.device(device):
            return create_model(arch, classes, channels)

    student = build(cfg.student.arch, "meta")
    teachers = {role: build(getattr(cfg.teachers, role).arch, "meta") for role in ("clean", "robust")}
    params = {"student": sum(p.numel() for p in student.parameters())}
    params.update({role: sum(p.numel() for p in t.parameters()) for role, t in teachers.items()})
    saved_fp32 = _saved_activation_bytes(student, torch.empty(batch, channels, side, side, device="meta"))
    torch.manual_seed(0)
    cpu_student = build(cfg.student.arch, "cpu")
    small = [_saved_activation_bytes(cpu_student, torch.rand(b, channels, side, side), True) for b in (1, 2)]
    saved_bf16 = small[0] + (small[1] - small[0]) * (batch - 1)
    teacher_peak = max(_largest_activation_bytes(t, torch.empty(batch, channels, side, side, device="meta"))
                       for t in teachers.values())

    data_bytes_on_device = n_images * (channels * side * side + 8)
    fixed = 4 * (3 * params["student"] + params["clean"] + params["robust"])  # weights, grads, momentum; teachers
    per_trial = {}
    for name, saved, teacher_act in (("fp32", saved_fp32, teacher_peak), ("bf16", saved_bf16, teacher_peak // 2)):
        # Peak while the two student graphs (s_adv, s_nat) wait for the backward and a teacher runs:
        # about three of its largest activations are alive at once.
        total = fixed + 2 * saved + 3 * teacher_act + data_bytes_on_device + CUDA_PROCESS_OVERHEAD_GIB * GIB
        per_trial[name] = {"gib": total / GIB, "trials_per_gpu": int((1 - GPU_HEADROOM) * gpu_gib * GIB // total)}
    return {
        "command": "memory", "config": cfg.name, "dataset": cfg.data.dataset, "batch_size": batch,
        "student": cfg.student.arch, "teachers": {r: getattr(cfg.teachers, r).arch for r in ("clean", "robust")},
        "params_millions": {k: v / 1e6 for k, v in params.items()},
        "weights_grads_momentum_gib": fixed / GIB,
        "student_saved_activations_gib": {"fp32": saved_fp32 / GIB, "bf16": saved_bf16 / GIB},
        "teacher_largest_activation_gib": teacher_peak / GIB,
        "dataset_on_device_gib": data_bytes_on_device / GIB,
        "assumed_cuda_process_overhead_gib": CUDA_PROCESS_OVERHEAD_GIB,
        "gpu_gib": gpu_gib, "per_trial": per_trial,
        "machine": machine_info(),
    }


def print_memory(result: dict[str, Any]) -> None:
    print(f"memory estimate of one B-MTARD trial: {result['dataset']}, batch {result['batch_size']}, student "
          f"{result['student']}, teachers {result['teachers']['clean']} / {result['teachers']['robust']}")
    p = result["params_millions"]
    print(f"parameters (M): student {p['student']:.2f}, clean teacher {p['clean']:.2f}, "
          f"robust teacher {p['robust']:.2f}")
    print(f"weights + grads + momentum + teachers      {result['weights_grads_momentum_gib']:7.2f} GiB")
    saved = result["student_saved_activations_gib"]
    print(f"student activations kept for backward      {saved['fp32']:7.2f} GiB fp32, "
          f"{saved['bf16']:.2f} GiB bf16 (x2: s_adv, s_nat)")
    print(f"largest teacher activation (fp32)          {result['teacher_largest_activation_gib']:7.2f} GiB")
    print(f"dataset on the device (uint8)              {result['dataset_on_device_gib']:7.2f} GiB")
    print(f"CUDA context etc. (assumed, not measured)  {result['assumed_cuda_process_overhead_gib']:7.2f} GiB")
    for name, r in result["per_trial"].items():
        share = 1 / max(r["trials_per_gpu"], 1)
        print(f"{name}: about {r['gib']:.1f} GiB per trial, {r['trials_per_gpu']} trials on a "
              f"{result['gpu_gib']:.0f} GiB card by memory (search.resources.gpu = {share:.2g})")
