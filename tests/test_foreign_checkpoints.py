"""Checkpoints from the reference repositories load into a model that computes what their source computed, or
are refused in one line (docs/configuration.md, "Checkpoints from other repositories").

Each equivalence test builds the source repository's own module (tests/reference_models.py), randomises its
weights and BatchNorm statistics, saves its state dict as that repository does, loads the file through
``load_checkpoint`` (what ``teachers.<role>.checkpoint`` goes through) and compares logits in float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_models import (
    KuangliuMobileNetV2,
    KuangliuResNet18,
    MtardResNet,
    MuSigmaWideResNet,
    OptionAResNet56,
    PreActResNet18Reference,
    TradesWideResNet,
    normalize_model,
    randomize,
)
from torch import nn

from tune_mtard.config import from_dict
from tune_mtard.config.sections import NormalizationConfig
from tune_mtard.errors import ConfigError
from tune_mtard.models import AS_SAVED, create_model, load_checkpoint, load_mapped, load_state, save_checkpoint
from tune_mtard.models.normalization import add_normalization
from tune_mtard.models.wide_resnet import WideResNet

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.double().eval()(x)


def assert_same_logits(ours: nn.Module, theirs: nn.Module, x: torch.Tensor | None = None, prepare=None) -> None:
    """float64 logits agree to 1e-10 relative to their scale (what is left is summation order)."""
    x = images() if x is None else x
    expected = logits(theirs, prepare(x) if prepare else x)
    got = logits(ours, x)
    scale = expected.abs().max().item()
    assert scale > 1e-3  # random weights and statistics give logits well away from zero
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * scale)


def save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def normalization(mean=CIFAR10_MEAN, std=CIFAR10_STD) -> NormalizationConfig:
    return NormalizationConfig(mean=list(mean), std=list(std))


# --------------------------------------------------------------------------- sources that load


@pytest.mark.parametrize(("source", "arch"), [(KuangliuResNet18, "resnet18"), (KuangliuMobileNetV2, "mobilenet_v2")],
                         ids=["kuangliu-MTARD-RSLAD-resnet18", "kuangliu-MTARD-RSLAD-mobilenet_v2"])
def test_kuangliu_resnet18_and_mobilenet_v2_load_as_saved_and_compute_the_same_logits(tmp_path, source, arch):
    theirs = randomize(source(num_classes=10))
    path = save(theirs.state_dict(), tmp_path / "ckpt.pt")
    ours = create_model(arch, 10)
    assert load_mapped(ours, path) == AS_SAVED
    assert_same_logits(ours, theirs)


def test_mtard_resnet56_downsample_and_fc_keys_are_mapped_and_compute_the_same_logits(tmp_path):
    theirs = randomize(MtardResNet(depth=56, num_classes=10))
    assert "layer2.0.downsample.1.running_var" in theirs.state_dict() and "fc.weight" in theirs.state_dict()
    path = save(theirs.state_dict(), tmp_path / "resnet56.pt")
    ours = create_model("resnet56", 10)
    mapping = load_mapped(ours, path)
    assert "downsample" in mapping and "fc -> linear" in mapping
    assert_same_logits(ours, theirs)


def test_trades_wideresnet_with_its_unused_sub_block_computes_the_same_logits(tmp_path):
    theirs = randomize(TradesWideResNet(depth=16, widen_factor=2, num_classes=10))
    path = save(theirs.state_dict(), tmp_path / "model-wideres-epoch76.pt")
    ours = load_checkpoint(WideResNet(16, 2, 10, 3), path)
    assert_same_logits(ours, theirs)


@pytest.mark.slow
def test_the_papers_wrn34_10_trades_teacher_computes_the_same_logits(tmp_path):
    theirs = randomize(TradesWideResNet(depth=34, widen_factor=10, num_classes=10))
    path = save(theirs.state_dict(), tmp_path / "model-wideres-epoch76.pt")
    ours = load_checkpoint(create_model("wrn34_10", 10), path)
    assert_same_logits(ours, theirs, images(1))


def test_robustbench_mu_sigma_buffers_become_the_models_input_normalisation(tmp_path):
    theirs = randomize(MuSigmaWideResNet(CIFAR10_MEAN, CIFAR10_STD, depth=16, widen_factor=2, sub_block1=False))
    path = save(theirs.state_dict(), tmp_path / "robustbench.pt")
    ours = WideResNet(16, 2, 10, 3)
    mapping = load_mapped(ours, path, "wrn16_2")
    assert "normalisation from the file's mu / sigma: mean [0.4914, 0.4822, 0.4465]" in mapping
    assert_same_logits(ours, theirs)


def test_robustbench_mu_sigma_file_loads_into_a_model_declaring_the_same_normalisation(tmp_path):
    theirs = randomize(MuSigmaWideResNet(CIFAR10_MEAN, CIFAR10_STD, depth=16, widen_factor=2, sub_block1=False))
    path = save(theirs.state_dict(), tmp_path / "robustbench.pt")
    ours = load_checkpoint(WideResNet(16, 2, 10, 3), path)
    assert_same_logits(ours, theirs)


def test_robustbench_normalize_model_wrapping_and_its_model_prefix_are_mapped(tmp_path):
    theirs = normalize_model(randomize(TradesWideResNet(depth=16, widen_factor=2, sub_block1=False)),
                             CIFAR10_MEAN, CIFAR10_STD)
    assert "normalize.mean" in theirs.state_dict() and "model.conv1.weight" in theirs.state_dict()
    path = save({"state_dict": theirs.state_dict()}, tmp_path / "robustbench.pt")
    ours = WideResNet(16, 2, 10, 3)
    mapping = load_mapped(ours, path)
    assert "stripped the model. key prefix" in mapping and "normalize.mean / normalize.std" in mapping
    assert_same_logits(ours, theirs)


def test_a_wrapper_holding_mu_sigma_around_a_model_submodule_is_mapped(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mu", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
            self.register_buffer("sigma", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
            self.model = randomize(KuangliuResNet18())

        def forward(self, x):
            return self.model((x - self.mu) / self.sigma)

    theirs = Wrapper().eval()
    path = save(theirs.state_dict(), tmp_path / "wrapped.pt")
    ours = create_model("resnet18", 10)
    assert "stripped the model. key prefix" in load_mapped(ours, path)
    assert_same_logits(ours, theirs)


def external_normalization(x: torch.Tensor) -> torch.Tensor:
    """What Rice et al.'s and Wong et al.'s training scripts feed their models: float32 mean/std, outside."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1).double()
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1).double()
    return (x - mean) / std


@pytest.mark.parametrize(
    ("arch", "final_bn", "shortcut_on_input"),
    [("preact_resnet18", True, False), ("preact_resnet18_wong", True, True),
     ("preact_resnet18_kuangliu", False, False)],
    ids=["rice-robust-overfitting", "wong-fast-adversarial", "kuangliu"],
)
def test_each_preact_resnet18_source_loads_into_its_named_variant_with_the_same_logits(tmp_path, arch, final_bn,
                                                                                      shortcut_on_input):
    theirs = randomize(PreActResNet18Reference(final_bn=final_bn, shortcut_on_input=shortcut_on_input))
    path = save(theirs.state_dict(), tmp_path / "preact.pt")
    ours = load_checkpoint(create_model(arch, 10), path)
    assert_same_logits(ours, theirs)


def test_a_checkpoint_trained_on_normalised_inputs_computes_its_logits_from_0_1_pixels(tmp_path):
    theirs = randomize(PreActResNet18Reference())
    path = save(theirs.state_dict(), tmp_path / "rice.pt")
    ours = create_model("preact_resnet18", 10, normalization=normalization())
    mapping = load_mapped(ours, path)
    assert mapping == "normalisation from the config: mean [0.4914, 0.4822, 0.4465], std [0.2471, 0.2435, 0.2616]"
    assert_same_logits(ours, theirs, prepare=external_normalization)
    x = images().requires_grad_(True)  # gradients reach the [0, 1] input, so attacks work in pixel space
    ours(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("wrap", "expected"),
    [
        (lambda sd: {"state_dict": sd, "epoch": 120, "best_acc": 0.56}, "unwrapped 'state_dict'"),
        (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}}, "unwrapped 'model_state_dict'"),
        (lambda sd: {"net": sd, "acc": 95.1, "epoch": 199}, "unwrapped 'net'"),
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, "unwrapped 'model'; stripped the module."),
        (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, "stripped the module. / _orig_mod."),
        (lambda sd: {f"module.model.{k}": v for k, v in sd.items()}, "stripped the model. key prefix"),
    ],
    ids=["state_dict", "model_state_dict", "net", "model-module", "orig_mod", "module-model"],
)
def test_wrapper_dicts_and_key_prefixes_are_undone_and_reported(tmp_path, wrap, expected):
    theirs = randomize(KuangliuResNet18(num_classes=10), seed=3)
    path = save(wrap(theirs.state_dict()), tmp_path / "wrapped.pt")
    ours = create_model("resnet18", 10)
    assert expected in load_mapped(ours, path)
    assert_same_logits(ours, theirs)


def test_a_student_saved_with_normalisation_loads_back_with_it(tmp_path):
    student = randomize(create_model("resnet56", 10, normalization=normalization()))
    save_checkpoint(student, tmp_path / "student.pt")
    fresh = create_model("resnet56", 10)
    assert load_mapped(fresh, tmp_path / "student.pt").startswith("normalisation from the file's mu / sigma")
    assert_same_logits(fresh, student)


def test_a_search_trial_rebuilds_a_normalised_teacher_from_its_weights():
    from trainables.bmtard import teacher_from_weights
    from tune_mtard.data import load_data

    data = load_data("digits", val_fraction=0.2, seed=0)
    teacher = randomize(create_model("digits_cnn_large", 10, 1, normalization(mean=[0.3], std=[0.4])))
    rebuilt = teacher_from_weights("digits_cnn_large", teacher.state_dict(), data)
    x = images(4, channels=1, size=8)
    assert_same_logits(rebuilt, teacher, x)


def test_the_trainer_builds_the_student_with_its_declared_normalisation():
    from tune_mtard.data import load_data
    from tune_mtard.engine import Trainer

    cfg = from_dict({"data": {"dataset": "digits"}, "student": {"arch": "digits_cnn", "normalization":
                     {"mean": [0.3], "std": [0.4]}}, "method": "natural", "device": "cpu"}, check_files=False)
    trainer = Trainer(cfg, load_data("digits", val_fraction=0.1, seed=0))
    assert trainer.student.mu.flatten().tolist() == pytest.approx([0.3])
    assert trainer.student.sigma.flatten().tolist() == pytest.approx([0.4])


# --------------------------------------------------------------------------- refused, in one line


def refused(model: nn.Module, path: Path, arch: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_checkpoint(model, path, arch)
    assert raised.value.key == str(path)
    assert "\n" not in str(raised.value)
    return raised.value.message


def test_kuangliu_preact_file_is_refused_by_the_final_bn_variants(tmp_path):
    path = save(randomize(PreActResNet18Reference(final_bn=False)).state_dict(), tmp_path / "kuangliu.pt")
    for arch in ("preact_resnet18", "preact_resnet18_wong"):
        message = refused(create_model(arch, 10), path, arch)
        assert "has no final BN" in message and "preact_resnet18_kuangliu" in message


def test_a_final_bn_preact_file_is_refused_by_the_kuangliu_variant(tmp_path):
    path = save(randomize(PreActResNet18Reference(final_bn=True)).state_dict(), tmp_path / "rice.pt")
    message = refused(create_model("preact_resnet18_kuangliu", 10), path, "preact_resnet18_kuangliu")
    assert "has a final BN" in message and "preact_resnet18_wong" in message


def test_option_a_resnet56_with_parameter_free_shortcuts_is_refused(tmp_path):
    path = save(randomize(OptionAResNet56()).state_dict(), tmp_path / "akamaster.pt")
    message = refused(create_model("resnet56", 10), path, "resnet56")
    assert "parameter-free (option A) shortcuts" in message


def test_torchvision_style_resnet18_is_refused_rather_than_renamed(tmp_path):
    theirs = randomize(MtardResNet(widths=(64, 128, 256, 512), max_pool=True))
    path = save(theirs.state_dict(), tmp_path / "torchvision_style.pt")
    message = refused(create_model("resnet18", 10), path, "resnet18")
    assert "torchvision-style keys" in message


def test_file_normalisation_other_than_the_declared_one_is_refused(tmp_path):
    theirs = MuSigmaWideResNet((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), depth=10, widen_factor=1, sub_block1=False)
    path = save(theirs.state_dict(), tmp_path / "robustbench.pt")
    model = add_normalization(WideResNet(10, 1, 10, 3), CIFAR10_MEAN, CIFAR10_STD)
    message = refused(model, path, "wrn10_1")
    assert "normalises its input with mean [0.5, 0.5, 0.5]" in message and "the config declares mean [0.4914" in message


def test_a_mean_buffer_without_its_std_is_refused(tmp_path):
    state = MuSigmaWideResNet(CIFAR10_MEAN, CIFAR10_STD, depth=10, widen_factor=1, sub_block1=False).state_dict()
    del state["sigma"]
    message = refused(WideResNet(10, 1, 10, 3), save(state, tmp_path / "half.pt"), "wrn10_1")
    assert "has one of the normalisation buffers mu / sigma but not the other" in message


def test_normalisation_buffers_for_other_channels_are_refused(tmp_path):
    state = create_model("digits_cnn", 10, 1).state_dict()
    state["mu"], state["sigma"] = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    message = refused(create_model("digits_cnn", 10, 1), save(state, tmp_path / "rgb.pt"), "digits_cnn")
    assert "does not fit a model with 1 input channels" in message


def test_trial_weights_that_do_not_fit_are_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError, match="does not match the digits_cnn architecture"):
        load_state(create_model("digits_cnn", 10, 1), create_model("digits_cnn_large", 10, 1).state_dict(),
                   arch="digits_cnn")


@pytest.mark.parametrize(
    ("normalization", "key", "message"),
    [
        ({"mean": [0.5], "std": []}, "teachers.clean.normalization.std", "needs as many values"),
        ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "teachers.clean.normalization.mean",
         "one value per input channel"),
        ({"mean": [0.5], "std": [0.0]}, "teachers.clean.normalization.std", "must be > 0"),
        ({"mean": [0.5], "std": [0.2], "median": [0.1]}, "teachers.clean.normalization.median", "unknown key"),
    ],
    ids=["lengths", "channels", "zero-std", "unknown-key"],
)
def test_bad_normalisation_is_a_config_error_naming_the_key(normalization, key, message):
    raw = {"data": {"dataset": "digits"}, "teachers": {"clean": {"arch": "digits_cnn_large", "checkpoint": "auto",
                                                                 "normalization": normalization}}}
    with pytest.raises(ConfigError, match=message) as raised:
        from_dict(raw, check_files=False)
    assert raised.value.key == key


# --------------------------------------------------------------------------- through the commands


def digits_config(tmp: Path, teacher: Path) -> Path:
    cfg = from_dict({
        "name": "foreign", "seed": 0, "device": "cpu",
        "data": {"dataset": "digits", "val_fraction": 0.15},
        "student": {"arch": "digits_cnn"},
        "teachers": {"clean": {"arch": "digits_cnn_large", "checkpoint": str(teacher),
                               "normalization": {"mean": [0.3], "std": [0.4]}},
                     "robust": {"arch": "digits_cnn_large", "checkpoint": "auto"}, "cache_dir": str(tmp / "cache")},
        "attack": {"epsilon": 0.2, "step_size": 0.05, "steps": 2},
        "eval": {"n_examples": 64, "pgd_steps": 3, "pgd_step_size": 0.05},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "foreign"},
    }, check_files=False)
    cfg.dump(tmp / "config.yaml")
    return tmp / "config.yaml"


def command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tune_mtard.{module}", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def foreign_teacher(tmp_path_factory):
    """A digits teacher saved as another repository would: wrapped, DataParallel-prefixed, no normalisation
    buffers (it was trained on (x - 0.3) / 0.4 outside the model)."""
    tmp = tmp_path_factory.mktemp("foreign")
    teacher = randomize(create_model("digits_cnn_large", 10, 1))
    path = save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}, "epoch": 3},
                tmp / "clean.pt")
    return tmp, path, digits_config(tmp, path)


def test_a_teachers_measured_quality_is_kept_per_declared_normalisation(foreign_teacher):
    from tune_mtard.config import load_config
    from tune_mtard.data import load_data
    from tune_mtard.teachers import prepare_teachers

    tmp, _, config = foreign_teacher
    declared = load_config(str(config), [], check_files=False).run_config()
    undeclared = declared.with_values({"teachers.clean.normalization": {"mean": [], "std": []}})
    data = load_data("digits", val_fraction=declared.data.val_fraction, seed=0)
    for cfg in (declared, undeclared):
        teacher = prepare_teachers(cfg, data, torch.device("cpu"), progress=False, roles=["clean"]).teachers["clean"]
        assert teacher.mapping.endswith("mean [0.3], std [0.4]") == (cfg is declared)
    assert len(list((tmp / "cache" / "quality").iterdir())) == 2  # not the first measurement read back


@pytest.mark.slow
def test_teachers_command_prints_the_mapping_and_validation_accuracy_of_a_foreign_teacher(foreign_teacher):
    tmp, path, config = foreign_teacher
    result = command("teachers", "--config", str(config), "--roles", "clean", "--no-progress", cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert "clean  digits_cnn_large" in result.stdout and "exists" in result.stdout
    assert ("loaded with: unwrapped 'state_dict'; stripped the module. / _orig_mod. key prefixes; "
            "normalisation from the config: mean [0.3], std [0.4]") in result.stdout
    assert "val clean" in result.stdout


@pytest.mark.slow
def test_evaluate_prints_the_mapping_of_a_foreign_teacher_file(foreign_teacher):
    tmp, path, config = foreign_teacher
    result = command("evaluate", "--config", str(config), "--checkpoint", str(path), "--arch", "digits_cnn_large",
                     "--attacks", "clean", "--n", "16", "--out", str(tmp / "eval.json"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert "loaded with: unwrapped 'state_dict'; stripped the module. / _orig_mod. key prefixes; " \
           "normalisation from the config: mean [0.3], std [0.4]" in result.stdout


@pytest.mark.slow
def test_evaluate_refuses_a_file_meant_for_another_variant_in_one_line_exit_2(foreign_teacher):
    tmp, _, config = foreign_teacher
    kuangliu = PreActResNet18Reference(final_bn=False)
    kuangliu.conv1 = nn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
    path = save(kuangliu.state_dict(), tmp / "kuangliu.pt")
    result = command("evaluate", "--config", str(config), "--checkpoint", str(path), "--arch", "preact_resnet18",
                     "--attacks", "clean", "--n", "16", "--out", str(tmp / "refused.json"), cwd=tmp)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "has no final BN" in result.stderr and "preact_resnet18_kuangliu" in result.stderr
    assert not (tmp / "refused.json").exists()
