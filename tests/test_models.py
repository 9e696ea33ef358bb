"""Specification of the model registry and checkpoint loading (tune_mtard.models)."""

import functools

import pytest
import torch
from torch import nn

from tune_mtard import models
from tune_mtard.errors import ConfigError
from tune_mtard.models import (
    available_models,
    create_model,
    load_checkpoint,
    load_state_dict_file,
    register_model,
    save_checkpoint,
)
from tune_mtard.models.wide_resnet import WideResNet

CIFAR_MODELS = ["resnet18", "preact_resnet18", "preact_resnet18_wong", "preact_resnet18_kuangliu", "mobilenet_v2",
                "wrn34_10", "wrn28_10", "resnet56"]
DIGITS_MODELS = ["digits_cnn", "digits_cnn_large"]
NUM_CLASSES = 7  # not 10, so a hard-coded head size would show


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Batch-2 forwards gain nothing from intra-op threads, and their spin-waits slow these tests
    several-fold when other processes share the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def shared_model(name: str, in_channels: int = 3) -> nn.Module:
    """One eval-mode instance per architecture, shared by the read-only tests (WRN-34-10 is slow to build)."""
    return create_model(name, NUM_CLASSES, in_channels).eval()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_registry_holds_the_cifar_and_digits_architectures():
    assert set(available_models()) == set(CIFAR_MODELS + DIGITS_MODELS)
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", CIFAR_MODELS + DIGITS_MODELS)
def test_every_model_gives_one_logit_per_class_for_32_and_64_pixel_colour_images(name, size):
    logits = outputs(shared_model(name), torch.rand(2, 3, size, size))
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "mobilenet_v2", "resnet56"])
def test_cifar_models_accept_any_number_of_input_channels(name):
    assert outputs(shared_model(name, in_channels=1), torch.rand(2, 1, 16, 16)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_digits_models_classify_8x8_greyscale_and_16x16_colour_images(name):
    assert outputs(create_model(name, 10, in_channels=1), torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert outputs(create_model(name, 10, in_channels=3), torch.rand(5, 3, 16, 16)).shape == (5, 10)


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_digits_models_train_with_batch_norm_so_train_and_eval_mode_differ(name):
    model = create_model(name, 10, in_channels=1)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(128, 1, 8, 8)
    loss = nn.functional.cross_entropy(model.train()(x), torch.randint(0, 10, (128,)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert not torch.allclose(model.train()(x), model.eval()(x))


def test_digits_teacher_is_larger_than_student_and_both_far_smaller_than_cifar_models():
    student = num_params(create_model("digits_cnn", 10, in_channels=1))
    teacher = num_params(create_model("digits_cnn_large", 10, in_channels=1))
    smallest_cifar = min(num_params(shared_model(name)) for name in CIFAR_MODELS)
    assert 50_000 <= student <= 100_000
    assert student < teacher < 1_000_000
    assert 3 * teacher < smallest_cifar


@pytest.mark.parametrize(
    ("name", "reference_keys"),
    [
        ("resnet18", ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.0.shortcut.1.weight",
                      "linear.weight"]),
        ("preact_resnet18", ["conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.bn2.weight", "bn.weight",
                             "linear.bias"]),
        ("mobilenet_v2", ["conv1.weight", "layers.0.conv2.weight", "layers.16.bn3.weight", "conv2.weight",
                          "linear.weight"]),
        ("wrn34_10", ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                      "block3.layer.4.conv2.weight", "bn1.running_var", "fc.weight"]),
        ("resnet56", ["layer1.8.conv2.weight", "layer3.0.shortcut.0.weight", "layer3.8.bn2.weight",
                      "linear.weight"]),
    ],
)
def test_parameter_names_match_the_reference_repositories_so_their_checkpoints_load(name, reference_keys):
    keys = shared_model(name).state_dict().keys()
    assert set(reference_keys) <= set(keys)


def test_wide_resnets_have_the_standard_depth_and_width():
    assert num_params(shared_model("wrn34_10")) == pytest.approx(46.2e6, rel=0.01)
    assert num_params(shared_model("wrn28_10")) == pytest.approx(36.5e6, rel=0.01)
    assert num_params(shared_model("resnet18")) == pytest.approx(11.2e6, rel=0.01)


def test_create_model_with_unknown_name_raises_key_error_listing_the_names():
    with pytest.raises(KeyError, match="resnet18"):
        create_model("resnet19", 10)


def test_a_decorated_function_becomes_a_buildable_architecture(monkeypatch):
    monkeypatch.setattr(models.MODELS, "_entries", dict(models.MODELS._entries))

    @register_model
    def tiny_linear(num_classes: int, in_channels: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny_linear" in available_models()
    assert create_model("tiny_linear", 4)(torch.rand(2, 3, 8, 8)).shape == (2, 4)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["resnet56", "digits_cnn"])
def test_saved_checkpoint_loads_into_a_fresh_model_with_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name, 10)
    model.train()(torch.rand(4, 3, 16, 16))  # moves BatchNorm running statistics off their defaults
    path = tmp_path / "nested" / "dir" / "student.pt"
    save_checkpoint(model, path)

    fresh = load_checkpoint(create_model(name, 10), path)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_compiled_and_data_parallel_models_save_plain_keys(tmp_path):
    model = create_model("digits_cnn", 10, in_channels=1)
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        path = tmp_path / "wrapped.pt"
        save_checkpoint(wrapped, path)
        keys = torch.load(path, weights_only=True).keys()
        assert keys == model.state_dict().keys()
        load_checkpoint(create_model("digits_cnn", 10, in_channels=1), path)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd, "epoch": 76, "optimizer": {"lr": 0.1}},
        lambda sd: {"net": sd},
        lambda sd: {"model": {"state_dict": sd}},
        lambda sd: {f"module.{key}": value for key, value in sd.items()},
        lambda sd: {"state_dict": {f"module.{key}": value for key, value in sd.items()}},
    ],
    ids=["state_dict", "model", "net", "nested", "module-prefix", "wrapped-module-prefix"],
)
def test_checkpoints_from_other_repositories_load(tmp_path, wrap):
    torch.manual_seed(0)
    model = create_model("digits_cnn", 10, in_channels=1)
    path = tmp_path / "other_repo.pt"
    torch.save(wrap(model.state_dict()), path)

    assert load_state_dict_file(path).keys() == model.state_dict().keys()
    fresh = load_checkpoint(create_model("digits_cnn", 10, in_channels=1), path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_trades_wideresnet_checkpoint_with_unused_sub_block_loads(tmp_path):
    model = WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3)
    state = model.state_dict()
    trades_extra = WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3).block1.state_dict()
    state.update({f"sub_block1.{key}": value for key, value in trades_extra.items()})
    path = tmp_path / "model-wideres-epoch76.pt"
    torch.save(state, path)

    load_checkpoint(WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3), path)


def test_checkpoint_of_another_architecture_raises_config_error_naming_the_path(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint(create_model("digits_cnn_large", 10, in_channels=1), path)

    with pytest.raises(ConfigError) as raised:
        load_checkpoint(create_model("digits_cnn", 10, in_channels=1), path)
    assert raised.value.key == str(path)
    assert "does not match" in raised.value.message
    assert "\n" not in str(raised.value)


def test_checkpoint_with_other_class_count_reports_the_shape_mismatch(tmp_path):
    path = tmp_path / "cifar100.pt"
    save_checkpoint(create_model("digits_cnn", 100, in_channels=1), path)

    expected = r"2 wrongly shaped keys \(first: classifier.3.weight \[100, 64\] vs model \[10, 64\]\)"
    with pytest.raises(ConfigError, match=expected):
        load_checkpoint(create_model("digits_cnn", 10, in_channels=1), path)


def test_checkpoint_missing_keys_reports_how_many_and_the_first(tmp_path):
    model = create_model("digits_cnn", 10, in_channels=1)
    state = model.state_dict()
    del state["classifier.3.weight"], state["classifier.3.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)

    with pytest.raises(ConfigError, match=r"2 missing keys \(first: classifier.3.weight\)"):
        load_checkpoint(model, path)


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint", b""],
    ids=["text", "empty"],
)
def test_garbage_file_raises_config_error_naming_the_path(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)

    with pytest.raises(ConfigError, match="not a PyTorch state dict") as raised:
        load_checkpoint(create_model("digits_cnn", 10, in_channels=1), path)
    assert raised.value.key == str(path)


def test_saved_object_that_is_not_a_state_dict_raises_config_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)

    with pytest.raises(ConfigError, match="not a PyTorch state dict: holds a list"):
        load_state_dict_file(path)


def test_missing_checkpoint_file_raises_config_error_naming_the_path(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(ConfigError, match="no such checkpoint file") as raised:
        load_checkpoint(create_model("digits_cnn", 10, in_channels=1), path)
    assert raised.value.key == str(path)
