"""PreActResNet-18 of kuangliu/pytorch-cifar with the final BN-ReLU that the robust-training repositories
(Wong et al., Rice et al., RobustBench) add (``bn``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.models.registry import conv3x3, register_model


class PreActBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice); the projection sees the activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet for CIFAR with a final BN-ReLU before pooling (He et al. 2016b)."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.conv1 = conv3x3(in_channels, widths[0])
        in_planes = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, num_blocks, strict=True)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(PreActBlock(in_planes, width, stride))
                in_planes = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model
def preact_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """PreActResNet-18 for CIFAR, 11.2M parameters."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)
