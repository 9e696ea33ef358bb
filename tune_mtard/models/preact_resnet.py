"""PreActResNet-18 in the three forms robust-training repositories use; their keys are the same or nearly so.

- ``preact_resnet18``: Rice et al. (robust-overfitting), RobustBench: the projection shortcut sees the
  BN-ReLU'd input, and a final BN-ReLU (``bn``) precedes the pooling.
- ``preact_resnet18_wong``: Wong et al. (fast_adversarial): the projection shortcut sees the raw input
  of the block; final BN-ReLU as above. Same keys as ``preact_resnet18``, different logits.
- ``preact_resnet18_kuangliu``: kuangliu/pytorch-cifar: shortcut as in ``preact_resnet18``, no final BN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.models.registry import conv3x3, register_model


class PreActBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice).

    Args:
        shortcut_on_input: the projection shortcut takes the block's raw input (Wong et al.) rather than
            its BN-ReLU'd input (He et al. 2016b, kuangliu, Rice et al.).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut_on_input: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut_on_input = shortcut_on_input
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x if self.shortcut_on_input else out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet for CIFAR (He et al. 2016b).

    Args:
        num_blocks: blocks per stage (64, 128, 256, 512 channels).
        num_classes: number of output logits.
        in_channels: channels of the input images.
        final_bn: a BN-ReLU (``bn``) before the pooling, as the robust-training repositories have.
        shortcut_on_input: see :class:`PreActBlock`.
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int, final_bn: bool = True,
                 shortcut_on_input: bool = False):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.conv1 = conv3x3(in_channels, widths[0])
        in_planes = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, num_blocks, strict=True)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(PreActBlock(in_planes, width, stride, shortcut_on_input))
                in_planes = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.bn: nn.Module | None = nn.BatchNorm2d(in_planes) if final_bn else None
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model
def preact_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """PreActResNet-18 for CIFAR as Rice et al. and RobustBench define it, 11.2M parameters."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


@register_model
def preact_resnet18_wong(num_classes: int, in_channels: int) -> nn.Module:
    """PreActResNet-18 of Wong et al.'s fast adversarial training: projection shortcuts on the raw block input."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, shortcut_on_input=True)


@register_model
def preact_resnet18_kuangliu(num_classes: int, in_channels: int) -> nn.Module:
    """PreActResNet-18 of kuangliu/pytorch-cifar: no final BN-ReLU before the pooling."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, final_bn=False)
