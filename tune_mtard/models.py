"""Model zoo: every architecture is built by registry name through :func:`create_model`.

Models take raw inputs in [0, 1] and contain no normalisation layer, like the TRADES / MTARD
reference models, so attacks work directly in pixel space with ``epsilon = 8/255``.

The CIFAR architectures follow the definitions used in adversarial-robustness repositories and keep
their parameter names, so their checkpoints load strictly:

- ``resnet18``: ResNet-18 of kuangliu/pytorch-cifar (``conv1, bn1, layer1..4, linear``).
- ``preact_resnet18``: PreActResNet-18 of kuangliu/pytorch-cifar with the final BN-ReLU that the
  robust-training repositories (Wong et al., Rice et al., RobustBench) add (``bn``).
- ``mobilenet_v2``: the CIFAR MobileNetV2 of kuangliu/pytorch-cifar (first stage stride 1).
- ``wrn34_10``, ``wrn28_10``: the WideResNet of TRADES / RobustBench (``conv1, block1.layer.0.bn1,
  ..., bn1, fc``).
- ``resnet56``: the CIFAR ResNet of He et al. (16/32/64 channels, 9 blocks per stage) with 1x1
  conv + BN projection shortcuts.

All use a 3x3 stride-1 stem without max-pool and adaptive average pooling before the classifier, so
they accept 32x32 and 64x64 inputs and any number of input channels. ``digits_cnn`` (student) and
``digits_cnn_large`` (teacher) are small CNNs for scikit-learn's 8x8 digits that run in milliseconds
on a CPU.

Adding an architecture: write a function ``name(num_classes, in_channels) -> nn.Module`` in this file
and decorate it with ``@register_model``.
"""

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_mtard.errors import ConfigError

ModelFactory = Callable[[int, int], nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

# Other repositories save {"state_dict": ...}, {"model": ...} or {"net": ...}, sometimes one inside another.
_WRAPPER_KEYS = ("state_dict", "model", "net")
# Added by nn.DataParallel / DistributedDataParallel and by torch.compile, possibly stacked.
_KEY_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register ``fn(num_classes, in_channels) -> nn.Module`` under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def available_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        name: registry name, one of :func:`available_models`.
        num_classes: number of output logits.
        in_channels: channels of the input images (3 for colour, 1 for digits).

    Raises:
        KeyError: ``name`` is not registered; the message lists the registered names.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[name](num_classes, in_channels)


# --------------------------------------------------------------------------- checkpoints


def _plain_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_KEY_PREFIXES.sub("", key): value for key, value in state.items()}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict saved by this project or by another repository.

    Loads with ``weights_only=True`` onto the CPU, unwraps ``state_dict`` / ``model`` / ``net``
    wrappers (up to two levels deep) and strips ``module.`` and ``_orig_mod.`` key prefixes.

    Raises:
        ConfigError: keyed by ``path``, when the file is missing or does not hold a state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such checkpoint file") from None
    except Exception as error:  # torch.load raises many types for corrupt or non-torch files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(str(path), f"not a PyTorch state dict: {reason}") from None
    for _ in range(2):  # a wrapper inside a wrapper, e.g. {"model": {"state_dict": ...}}
        if isinstance(state, Mapping):
            wrapped = next((state[key] for key in _WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
            if wrapped is not None:
                state = wrapped
    if not isinstance(state, Mapping):
        raise ConfigError(str(path), f"not a PyTorch state dict: holds a {type(state).__name__}")
    if not state:
        raise ConfigError(str(path), "not a PyTorch state dict: holds an empty dict")
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        first = not_tensors[0]
        message = f"{len(not_tensors)} of its entries are not tensors (first: {first!r})"
        raise ConfigError(str(path), f"not a PyTorch state dict: {message}")
    return _plain_state_dict(state)


def _count_keys(keys: Sequence[str], kind: str) -> str:
    return f"{len(keys)} {kind} key{'' if len(keys) == 1 else 's'} (first: {keys[0]})"


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly and return ``model``.

    Raises:
        ConfigError: keyed by ``path``, when the file is not a state dict or does not match the
            architecture (missing or unexpected keys, different shapes); the message is one line.
    """
    state = load_state_dict_file(path)
    expected = model.state_dict()
    mismatched = [
        f"{key} {list(state[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [_count_keys(mismatched, "wrongly shaped")] if mismatched else []
    if not problems:
        # strict=False so the key differences can be reported in one line; any difference still fails.
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
        if missing:
            problems.append(_count_keys(missing, "missing"))
        if unexpected:
            problems.append(_count_keys(unexpected, "unexpected"))
    if problems:
        architecture = type(model).__name__
        raise ConfigError(str(path), f"does not match the {architecture} architecture: {', '.join(problems)}")
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model``'s weights as a plain CPU state dict that :func:`load_checkpoint` reads back.

    ``torch.compile`` / ``DataParallel`` prefixes are stripped, so the file loads into an uncompiled
    model. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in _plain_state_dict(model.state_dict()).items()}
    # Write then rename, so a trial killed mid-save never leaves a truncated checkpoint behind.
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


# --------------------------------------------------------------------------- ResNet (kuangliu, He et al.)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block (conv-BN-ReLU-conv-BN, add, ReLU) of kuangliu/pytorch-cifar."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
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
        self.conv1 = _conv3x3(in_channels, widths[0])
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


# --------------------------------------------------------------------------- PreActResNet


class PreActBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice); the projection sees the activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
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
        self.conv1 = _conv3x3(in_channels, widths[0])
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


# --------------------------------------------------------------------------- MobileNetV2 (kuangliu)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection.

    As in kuangliu/pytorch-cifar, every stride-1 block is residual, through a 1x1 conv + BN when the
    width changes.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR: stride-1 stem and second stage, so 32x32 inputs end at 4x4."""

    # (expansion, out_planes, num_blocks, stride) per stage
    STAGES = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 32)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        in_planes = 32
        for expansion, out_planes, num_blocks, first_stride in self.STAGES:
            for stride in [first_stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, 1280, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model
def mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    """MobileNetV2 for CIFAR (kuangliu/pytorch-cifar), 2.3M parameters."""
    return MobileNetV2(num_classes, in_channels)


# --------------------------------------------------------------------------- WideResNet (TRADES)


class WideBasicBlock(nn.Module):
    """WideResNet block (BN-ReLU-conv twice, no dropout), parameter names as in TRADES."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = _conv3x3(out_planes, out_planes)
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
        self.conv1 = _conv3x3(in_channels, widths[0])
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


# --------------------------------------------------------------------------- small CNNs for `digits`


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [_conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU()]


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
        for in_width, out_width in zip(widths[:-1], widths[1:]):
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
