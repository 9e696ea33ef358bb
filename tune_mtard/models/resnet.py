"""ResNet-18 of kuangliu/pytorch-cifar and the CIFAR ResNet-56 of He et al. (kuangliu's parameter names:
``conv1, bn1, layer1..4, linear``; the MTARD ResNet-56's ``downsample`` / ``fc`` are mapped in layouts.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.models.registry import conv3x3, register_model


class BasicBlock(nn.Module):
    """Post-activation residual block (conv-BN-ReLU-conv-BN, add, ReLU) of kuangliu/pytorch-cifar."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, one stage per width (first stride 1, then 2), pooled linear head.

    Args:
        widths: channels of each stage; the stem has ``widths[0]`` channels.
        num_blocks: residual blocks per stage.
        num_classes: number of output logits.
        in_channels: channels of the input images.
    """

    def __init__(self, widths: Sequence[int], num_blocks: Sequence[int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, num_blocks, strict=True)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            # Named layer1, layer2, ... as in the reference repositories, so their checkpoints load.
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet-18 for CIFAR (kuangliu/pytorch-cifar), 11.2M parameters."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


@register_model
def resnet56(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet-56 for CIFAR (He et al. 2016), 0.86M parameters, 1x1 conv + BN projection shortcuts."""
    return CifarResNet((16, 32, 64), (9, 9, 9), num_classes, in_channels)
