"""The WideResNet of TRADES / RobustBench (``conv1, block1.layer.0.bn1, ..., bn1, fc``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.models.registry import conv3x3, register_model


class WideBasicBlock(nn.Module):
    """WideResNet block (BN-ReLU-conv twice, no dropout), parameter names as in TRADES."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.convShortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # The reference projects the activated input when the shape changes and adds the raw input otherwise.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideStage(nn.Module):
    """A stage of WideResNet blocks; a module of its own only to keep the reference key ``blockN.layer``."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _drop_unused_sub_block(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    # TRADES' WRN-34-10 (and RobustBench's copy of it) carries a `sub_block1` that forward never uses;
    # its weights are dropped so those checkpoints still load strictly.
    for key in [key for key in state_dict if key.startswith(prefix + "sub_block1.")]:
        del state_dict[key]


class WideResNet(nn.Module):
    """WideResNet-depth-widen for CIFAR (Zagoruyko & Komodakis), as defined in TRADES / RobustBench.

    Args:
        depth: total depth, ``6n + 4`` for ``n`` blocks per stage.
        widen_factor: channel multiplier of the three stages (16, 32, 64 times it).
        num_classes: number of output logits.
        in_channels: channels of the input images.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(in_channels, widths[0])
        self.block1 = WideStage(blocks_per_stage, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks_per_stage, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks_per_stage, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.register_load_state_dict_pre_hook(_drop_unused_sub_block)
        # The TRADES initialisation (He normal, fan-out), which the reference training recipes assume.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model
def wrn34_10(num_classes: int, in_channels: int) -> nn.Module:
    """WideResNet-34-10, 46.2M parameters (the TRADES robust teacher of MTARD)."""
    return WideResNet(34, 10, num_classes, in_channels)


@register_model
def wrn28_10(num_classes: int, in_channels: int) -> nn.Module:
    """WideResNet-28-10, 36.5M parameters."""
    return WideResNet(28, 10, num_classes, in_channels)
