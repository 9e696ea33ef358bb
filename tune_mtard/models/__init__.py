"""Model zoo: every architecture is built by registry name through :func:`create_model`.

Models take raw inputs in [0, 1], like the TRADES / MTARD reference models, so attacks work directly in
pixel space with ``epsilon = 8/255``; a model trained on mean/std-normalised inputs gets its
normalisation inside (``normalization``, :mod:`tune_mtard.models.normalization`).

The CIFAR architectures follow the definitions used in adversarial-robustness repositories and keep
their parameter names; other repositories' key layouts are mapped or refused by
:mod:`tune_mtard.models.layouts` (the table of sources: docs/configuration.md, "Checkpoints from other
repositories"):

- ``resnet18``: ResNet-18 of kuangliu/pytorch-cifar (``conv1, bn1, layer1..4, linear``).
- ``preact_resnet18``: PreActResNet-18 of Rice et al. / RobustBench (final BN-ReLU ``bn``);
  ``preact_resnet18_wong`` (Wong et al.: projection shortcut on the raw block input) and
  ``preact_resnet18_kuangliu`` (no final BN) are the variants that compute differently.
- ``mobilenet_v2``: the CIFAR MobileNetV2 of kuangliu/pytorch-cifar (first stage stride 1).
- ``wrn34_10``, ``wrn28_10``: the WideResNet of TRADES / RobustBench (``conv1, block1.layer.0.bn1,
  ..., bn1, fc``).
- ``resnet56``: the CIFAR ResNet of He et al. (16/32/64 channels, 9 blocks per stage) with 1x1
  conv + BN projection shortcuts.

All use a 3x3 stride-1 stem without max-pool and adaptive average pooling before the classifier, so
they accept 32x32 and 64x64 inputs and any number of input channels. ``digits_cnn`` (student) and
``digits_cnn_large`` (teacher) are small CNNs for scikit-learn's 8x8 digits that run in milliseconds
on a CPU.

Adding an architecture: a module here with a function ``name(num_classes, in_channels) -> nn.Module``
decorated with ``@register_model``, and one import line below.
"""

from tune_mtard.models import digits, mobilenet, preact_resnet, resnet, wide_resnet  # noqa: F401 (they register)
from tune_mtard.models.checkpoints import (
                                           AS_SAVED,
                                           load_checkpoint,
                                           load_mapped,
                                           load_state,
                                           load_state_dict_file,
                                           save_checkpoint,
)
from tune_mtard.models.registry import MODELS, available_models, create_model, register_model

__all__ = ["AS_SAVED", "MODELS", "available_models", "create_model", "load_checkpoint", "load_mapped", "load_state",
           "load_state_dict_file", "register_model", "save_checkpoint"]
