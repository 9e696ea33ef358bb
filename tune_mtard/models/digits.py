"""Small CNNs for scikit-learn's 8x8 digits that run in milliseconds on a CPU: ``digits_cnn`` (student) and
``digits_cnn_large`` (teacher)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tune_mtard.models.registry import conv3x3, register_model


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU()]


class _GridPool(nn.AdaptiveAvgPool2d):
    """Adaptive average pool that passes a map already at the target size through untouched.

    On the student's 4x4 map PyTorch's adaptive pool is an identity that still costs ~15% of a CPU train step.
    """

    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size, self.output_size)
        return x if tuple(x.shape[-2:]) == size else super().forward(x)


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 images: conv, 2x2 max-pool, more convs, pool to a fixed grid, two linear layers.

    Pooling right after the first conv keeps a batch of 128 at a few milliseconds on a CPU; the
    adaptive pool to a ``grid x grid`` map lets larger inputs (e.g. 16x16) through unchanged.

    Args:
        widths: output channels of each conv; the max-pool follows the first.
        grid: side of the pooled feature map fed to the classifier.
        hidden: width of the hidden linear layer.
        num_classes: number of output logits.
        in_channels: channels of the input images.
    """

    def __init__(self, widths: Sequence[int], grid: int, hidden: int, num_classes: int, in_channels: int):
        super().__init__()
        layers = _conv_bn_relu(in_channels, widths[0]) + [nn.MaxPool2d(2)]
        for in_width, out_width in zip(widths[:-1], widths[1:], strict=True):
            layers += _conv_bn_relu(in_width, out_width)
        layers.append(_GridPool(grid))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * grid * grid, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model
def digits_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Student for `digits`: conv 32 - pool - conv 64 - fc 64, 85k parameters."""
    return DigitsCNN((32, 64), grid=4, hidden=64, num_classes=num_classes, in_channels=in_channels)


@register_model
def digits_cnn_large(num_classes: int, in_channels: int) -> nn.Module:
    """Teacher for `digits`: conv 32 - pool - conv 64 - conv 128 - fc 256, 227k parameters."""
    return DigitsCNN((32, 64, 128), grid=2, hidden=256, num_classes=num_classes, in_channels=in_channels)
