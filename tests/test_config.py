"""Specification of tune_mtard.config: the one typed config of docs/configuration.md, parsed and validated at the
edge."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tune_mtard.config import (
    Config,
    Distribution,
    from_dict,
    load_config,
    parse_number,
    parse_override,
    to_yaml,
)
from tune_mtard.errors import ConfigError

# The product contract's config example (docs/configuration.md), verbatim: the run config whose values are the
# defaults, then a search space.
SPEC_RUN_YAML = """
name: cifar10-bmtard
seed: 0
device: auto              # auto | cpu | cuda | cuda:N
data:
  dataset: cifar10        # digits | synthetic | cifar10 | cifar100 | svhn | tiny-imagenet
  root: ./data
  download: false         # torchvision download when files are missing
  val_fraction: 0.1       # held out of the TRAINING split; searches select on it, never on test
  batch_size: 128
student: {arch: resnet18}
teachers:
  clean:  {arch: resnet56, checkpoint: teachers/cifar10-resnet56-natural.pt}
  robust: {arch: wrn34_10, checkpoint: teachers/cifar10-wrn34_10-trades.pt}
method: b-mtard
attack: {epsilon: 8/255, step_size: 2/255, steps: 10}
train:
  epochs: 300
  lr: 0.1
  momentum: 0.9
  weight_decay: 2.0e-4
  lr_milestones: [0.7167, 0.8667, 0.95]   # fractions of train.epochs (215, 260, 285 of 300)
  lr_gamma: 0.1
balance:
  entropy: true           # Entropy-Based Balance on/off
  loss: true              # Normalization Loss Balance on/off
  beta: 1.0
  tau_init: 1.0
  tau_min: 1.0
  tau_max: 10.0
  tau_lr: 0.001
  weight_lr: 0.025
eval:
  every: 1                # epochs between validation evaluations
  n_examples: 1000        # validation examples per evaluation
  pgd_steps: 20
  pgd_step_size: 2/255
  clean_weight: 0.5       # W-Robust Acc = clean_weight*clean + (1-clean_weight)*robust
mlflow:
  tracking_uri: sqlite:///mlflow.db
  experiment: cifar10-bmtard
"""

SPEC_SEARCH_YAML = """
search:
  num_samples: 64
  max_concurrent: 4
  metric: val_w_robust_acc
  mode: max
  resources: {cpu: 4, gpu: 0.5}            # per trial; fractional GPUs share a card
  scheduler: {type: asha, grace_period: 10, reduction_factor: 3}   # max_t = train.epochs
  sampler: {type: tpe, seed: 0, n_startup_trials: 10}
  storage: ./tune_results
space:                                     # dotted keys of the run config
  balance.beta:      {type: float, low: 0.5, high: 3.0}
  balance.tau_max:   {type: float, low: 2.0, high: 20.0}
  balance.tau_lr:    {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  balance.weight_lr: {type: float, low: 5.0e-3, high: 0.1, log: true}
  train.lr:          {type: float, low: 0.02, high: 0.2, log: true}
"""

# Every documented key set to a value other than its default, so a round trip proves each one is read and written.
EVERY_KEY_YAML = """
name: every-key
seed: 7
device: cpu
data: {dataset: digits, root: ./elsewhere, download: true, val_fraction: 0.2, batch_size: 32}
student: {arch: digits_cnn}
teachers:
  clean:  {arch: digits_cnn_large, checkpoint: auto, recipe: natural, epochs: 3, lr: 0.02, momentum: 0.8,
           weight_decay: 1.0e-3, batch_size: 32}
  robust: {arch: digits_cnn, checkpoint: auto, recipe: pgd-at, epochs: 4, lr: 0.03, trades_beta: 3.0,
           sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef}
  cache_dir: ./cache
method: mtard
attack: {epsilon: 4/255, step_size: 1/255, steps: 5}
train: {epochs: 30, lr: 0.05, momentum: 0.5, weight_decay: 1.0e-3, lr_milestones: [0.5, 0.75], lr_gamma: 0.2}
balance: {entropy: false, loss: false, beta: 2.0, tau_init: 2.0, tau_min: 1.5, tau_max: 5.0, tau_lr: 0.01,
          weight_lr: 0.05}
eval: {every: 2, n_examples: 100, pgd_steps: 10, pgd_step_size: 1/255, clean_weight: 0.3}
mlflow: {tracking_uri: "sqlite:///other.db", experiment: every-key}
search:
  num_samples: 8
  max_concurrent: 2
  metric: val_robust_acc
  mode: min
  resources: {cpu: 2, gpu: 0.25}
  scheduler: {type: fifo, grace_period: 2, reduction_factor: 2}
  sampler: {type: random, seed: 3, n_startup_trials: 4}
  storage: ./results
space:
  balance.beta:      {type: float, low: 0.5, high: 3.0}
  balance.tau_lr:    {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  train.lr:          {type: float, low: 0.01, high: 0.2, step: 0.01}
  data.batch_size:   {type: int, low: 32, high: 128, step: 32}
  method:            {type: categorical, choices: [b-mtard, mtard]}
"""


def flat_yaml(text: str) -> dict:
    """The YAML's leaves as dotted keys, fractions parsed."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                is_fraction = isinstance(value, str) and re.fullmatch(r"[-+\d.eE]+/[-+\d.eE]+", value)
                out[f"{prefix}{key}"] = parse_number(value, key) if is_fraction else value

    walk(yaml.safe_load(text), "")
    return out


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(raw: dict, check_files: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(raw, check_files=check_files)
    return info.value


def digits_run(**sections) -> dict:
    """A valid run config on digits (no files needed), with sections replaced or extended."""
    raw = {
        "data": {"dataset": "digits"},
        "student": {"arch": "digits_cnn"},
        "teachers": {"clean": {"arch": "digits_cnn_large", "checkpoint": "auto"},
                     "robust": {"arch": "digits_cnn", "checkpoint": "auto"}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


# ---- defaults and round trips ------------------------------------------------------------------


def test_defaults_equal_every_value_of_the_spec_example():
    defaults = Config()
    spec = flat_yaml(SPEC_RUN_YAML)
    assert len(spec) == 38
    for key, value in spec.items():
        assert defaults.get(key) == value, key
    assert defaults.attack.epsilon == 8 / 255
    assert defaults.method == "b-mtard"
    assert defaults.search is None and defaults.space is None


def test_the_spec_example_parses_to_the_defaults():
    parsed = from_dict(yaml.safe_load(SPEC_RUN_YAML), check_files=False)
    assert parsed == Config()


def test_the_spec_search_example_parses_with_its_space():
    cfg = from_dict(yaml.safe_load(SPEC_RUN_YAML + SPEC_SEARCH_YAML), check_files=False)
    assert cfg.search.num_samples == 64 and cfg.search.resources.gpu == 0.5
    assert cfg.search.scheduler.type == "asha" and cfg.search.sampler.n_startup_trials == 10
    assert cfg.space["balance.tau_lr"] == Distribution(type="float", low=1e-4, high=1e-2, log=True)
    assert list(cfg.space) == ["balance.beta", "balance.tau_max", "balance.tau_lr", "balance.weight_lr", "train.lr"]


def test_a_file_with_every_spec_key_round_trips_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, EVERY_KEY_YAML), check_files=False)
    for key, value in flat_yaml(EVERY_KEY_YAML).items():
        if key.startswith(("space.", "search.")) or key in ("data.root", "teachers.cache_dir", "mlflow.tracking_uri",
                                                           "search.storage"):
            continue
        assert cfg.get(key) == value, key
    assert cfg.search.mode == "min" and cfg.search.sampler.type == "random" and cfg.search.resources.cpu == 2
    assert cfg.space["data.batch_size"] == Distribution(type="int", low=32, high=128, step=32)
    assert cfg.space["method"].choices == ["b-mtard", "mtard"]

    again = load_config(write(tmp_path, to_yaml(cfg, with_search=True), "again.yaml"), check_files=False)
    assert again == cfg
    run_only = load_config(write(tmp_path, to_yaml(cfg), "run.yaml"), check_files=False)
    assert run_only == cfg.run_config()
    assert run_only.search is None and run_only.space is None


def test_relative_paths_are_resolved_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, EVERY_KEY_YAML), check_files=False)
    assert cfg.data.root == str(tmp_path / "elsewhere")
    assert cfg.teachers.cache_dir == str(tmp_path / "cache")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'other.db'}"
    assert cfg.search.storage == str(tmp_path / "results")


def test_a_robust_teacher_without_a_recipe_is_trained_adversarially_and_a_clean_one_naturally():
    cfg = from_dict(digits_run(), check_files=False)
    assert cfg.teachers.robust.recipe == "trades"
    assert cfg.teachers.clean.recipe == "natural"
    explicit = digits_run(teachers={"robust": {"arch": "digits_cnn", "checkpoint": "auto", "recipe": "pgd-at"}})
    assert from_dict(explicit, check_files=False).teachers.robust.recipe == "pgd-at"


# ---- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("8/255", 8 / 255), ("1e-3/2", 0.0005), (" 2 / 255 ", 2 / 255), ("-1/4", -0.25), ("0.5", 0.5), ("3", 3.0),
])
def test_fractions_and_number_strings_are_parsed(text, value):
    assert parse_number(text, "attack.epsilon") == value


@pytest.mark.parametrize("text", [
    "__import__('os')", "__import__('os').system('true')", "2**3", "(8/255)", "8/255 + 1", "8/0", "eight", "1/2/3",
])
def test_anything_but_a_number_or_fraction_is_rejected_never_evaluated(text):
    with pytest.raises(ConfigError) as info:
        from_dict(digits_run(attack={"epsilon": text}), check_files=False)
    assert info.value.key == "attack.epsilon"


def test_a_boolean_is_not_a_number():
    assert config_error(digits_run(train={"lr": True})).key == "train.lr"


# ---- --set overrides ---------------------------------------------------------------------------


@pytest.mark.parametrize("item, key, value", [
    ("train.epochs=3", "train.epochs", 3),
    ("train.lr_milestones=[]", "train.lr_milestones", []),
    ("train.lr_milestones=[0.5, 0.9]", "train.lr_milestones", [0.5, 0.9]),
    ("attack.epsilon=4/255", "attack.epsilon", 4 / 255),
    ("balance.entropy=false", "balance.entropy", False),
    ("method=trades", "method", "trades"),
    ("name=with=equals", "name", "with=equals"),
])
def test_set_overrides_are_parsed_as_yaml(tmp_path, item, key, value):
    cfg = load_config(write(tmp_path, EVERY_KEY_YAML), [item], check_files=False)
    assert cfg.get(key) == value


def test_set_reaches_the_search_and_space_sections(tmp_path):
    cfg = load_config(write(tmp_path, EVERY_KEY_YAML),
                      ["search.max_concurrent=2", "search.num_samples=3", "space.balance.beta.high=2.5",
                       "space.balance.tau_lr={type: float, low: 0.001, high: 0.1}"], check_files=False)
    assert cfg.search.max_concurrent == 2 and cfg.search.num_samples == 3
    assert cfg.space["balance.beta"] == Distribution(type="float", low=0.5, high=2.5)
    assert cfg.space["balance.tau_lr"] == Distribution(type="float", low=0.001, high=0.1)


def test_later_set_overrides_win(tmp_path):
    cfg = load_config(write(tmp_path, EVERY_KEY_YAML), ["train.epochs=3", "train.epochs=4"], check_files=False)
    assert cfg.train.epochs == 4


@pytest.mark.parametrize("item, key", [
    ("train.epochs", "--set"),
    ("=3", "--set"),
    ("train.nope=3", "train.nope"),
    ("nope=3", "nope"),
    ("train.epochs=three", "train.epochs"),
    ("train.epochs=[1", "train.epochs"),
    ("attack.epsilon=-4/255", "attack.epsilon"),
])
def test_bad_set_overrides_name_the_key(tmp_path, item, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, EVERY_KEY_YAML), [item], check_files=False)
    assert info.value.key == key


def test_typed_flags_are_set_as_they_are_after_the_overrides(tmp_path):
    """A command's typed flags are never read again as YAML (a folder called ``1e3`` stays a folder name, not the
    number 1000), win over ``--set`` and are validated with the rest; an error in one names the flag."""
    flags = {"search.storage": ("--storage", "1e3"), "search.num_samples": ("--num-samples", 5)}
    cfg = load_config(write(tmp_path, EVERY_KEY_YAML), ["search.num_samples=3"], check_files=False, flags=flags)
    assert cfg.search.storage == str((Path.cwd() / "1e3").resolve()) and cfg.search.num_samples == 5
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, EVERY_KEY_YAML), check_files=False,
                    flags={"search.num_samples": ("--num-samples", 0)})
    assert info.value.key == "--num-samples"


def test_parse_override_splits_at_the_first_equals_sign():
    assert parse_override("a.b=c=d") == ("a.b", "c=d")
    assert parse_override("a.b=") == ("a.b", "")


# ---- bad configs: each names its dotted key ----------------------------------------------------


@pytest.mark.parametrize("raw, key", [
    pytest.param(digits_run(trian={"epochs": 3}), "trian", id="unknown top-level key"),
    pytest.param(digits_run(train={"epochz": 3}), "train.epochz", id="unknown nested key"),
    pytest.param(digits_run(teachers={"clean": {"arch": "digits_cnn", "ckpt": "auto"}}), "teachers.clean.ckpt",
                 id="unknown deeply nested key"),
    pytest.param(digits_run(train={"epochs": "three"}), "train.epochs", id="string for int"),
    pytest.param(digits_run(train={"epochs": 2.5}), "train.epochs", id="fraction for int"),
    pytest.param(digits_run(balance={"entropy": 0.5}), "balance.entropy", id="float for bool"),
    pytest.param(digits_run(balance={"loss": "yes please"}), "balance.loss", id="string for bool"),
    pytest.param(digits_run(train={"lr_milestones": 0.5}), "train.lr_milestones", id="number for list"),
    pytest.param(digits_run(train=[1, 2]), "train", id="list for section"),
    pytest.param(digits_run(attack={"epsilon": "-8/255"}), "attack.epsilon", id="negative epsilon"),
    pytest.param(digits_run(attack={"epsilon": -0.1}), "attack.epsilon", id="negative epsilon number"),
    pytest.param(digits_run(balance={"tau_min": 5.0, "tau_max": 2.0}), "balance.tau_min", id="tau_min > tau_max"),
    pytest.param(digits_run(eval={"clean_weight": 1.5}), "eval.clean_weight", id="clean_weight above 1"),
    pytest.param(digits_run(eval={"clean_weight": -0.1}), "eval.clean_weight", id="clean_weight below 0"),
    pytest.param(digits_run(data={"dataset": "mnist"}), "data.dataset", id="unknown dataset"),
    pytest.param(digits_run(student={"arch": "resnet1000"}), "student.arch", id="unknown student arch"),
    pytest.param(digits_run(teachers={"robust": {"arch": "vgg", "checkpoint": "auto"}}), "teachers.robust.arch",
                 id="unknown teacher arch"),
    pytest.param(digits_run(method="kd"), "method", id="unknown method"),
    pytest.param(digits_run(data={"val_fraction": 0}), "data.val_fraction", id="val_fraction 0"),
    pytest.param(digits_run(data={"val_fraction": 1}), "data.val_fraction", id="val_fraction 1"),
    pytest.param(digits_run(train={"lr_milestones": [0.9, 0.5]}), "train.lr_milestones", id="decreasing milestones"),
    pytest.param(digits_run(train={"lr_milestones": [1.5]}), "train.lr_milestones", id="milestone past the end"),
    pytest.param(digits_run(balance={"beta": 0}), "balance.beta", id="beta 0"),
    pytest.param(digits_run(balance={"weight_lr": 2}), "balance.weight_lr", id="weight_lr above 1"),
    pytest.param(digits_run(device="gpu"), "device", id="unknown device"),
    pytest.param(digits_run(eval={"final_attacks": ["clean", "deepfool"]}), "eval.final_attacks[1]",
                 id="unknown final attack"),
    pytest.param(digits_run(search={"mode": "maximum"}), "search.mode", id="unknown search mode"),
    pytest.param(digits_run(name=".."), "name", id="name .."),
    pytest.param(digits_run(search={"register_as": "robust/best"}), "search.register_as",
                 id="registered model name with a slash"),
    pytest.param(digits_run(search={"register_as": " "}), "search.register_as", id="blank registered model name"),
    pytest.param(digits_run(name="digits:b-mtard", search={}), "search.register_as",
                 id="auto registers under a search name MLflow refuses"),
])
def test_a_bad_value_raises_config_error_naming_its_dotted_key(raw, key):
    error = config_error(raw)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize("search", [{"register_as": ""}, {"register_as": "digits-best"}])
def test_a_search_name_mlflow_refuses_is_fine_when_nothing_is_registered_under_it(search):
    cfg = from_dict(digits_run(name="digits:b-mtard", search=search), check_files=False)
    assert cfg.name == "digits:b-mtard"


def test_registered_model_names_follow_mlflows_rules():
    from mlflow.utils.validation import _validate_model_name

    from tune_mtard.config.rules import model_name_problem

    for name in ["digits-bmtard", "with space", "a.b", "ünï", "", " ", "a/b", "a:b", ".", "..", "../x", "a/../b",
                 "./a"]:
        try:
            _validate_model_name(name)
            refused = False
        except Exception:
            refused = True
        assert (model_name_problem(name) is not None) == refused, name


def test_a_missing_teacher_checkpoint_file_is_an_error_only_when_files_are_checked(tmp_path):
    raw = digits_run(teachers={"robust": {"arch": "digits_cnn", "checkpoint": str(tmp_path / "nope.pt")}})
    error = config_error(raw, check_files=True)
    assert error.key == "teachers.robust.checkpoint"
    assert "nope.pt" in error.message
    from_dict(raw, check_files=False)
    (tmp_path / "nope.pt").write_bytes(b"")
    from_dict(raw, check_files=True)


def test_a_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "missing.yaml" in info.value.key


def test_a_config_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "train: {epochs: [\n"))


# ---- search spaces -----------------------------------------------------------------------------


def space_error(space: dict, **sections) -> ConfigError:
    return config_error(digits_run(space=space, **sections))


@pytest.mark.parametrize("space, key", [
    pytest.param({"balance.gamma": {"type": "float", "low": 0.1, "high": 1.0}}, "space.balance.gamma",
                 id="not a config key"),
    pytest.param({"search.num_samples": {"type": "int", "low": 1, "high": 4}}, "space.search.num_samples",
                 id="a search key is not a run-config key"),
    pytest.param({"balance": {"type": "float", "low": 0.1, "high": 1.0}}, "space.balance", id="a section"),
    pytest.param({"balance.beta": {"type": "float", "low": 2.0, "high": 2.0}}, "space.balance.beta", id="low == high"),
    pytest.param({"balance.beta": {"type": "float", "low": 3.0, "high": 2.0}}, "space.balance.beta", id="low > high"),
    pytest.param({"balance.tau_lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
                 "space.balance.tau_lr.low",
                 id="log with low 0"),
    pytest.param({"train.epochs": {"type": "float", "low": 2.0, "high": 10.0}}, "space.train.epochs",
                 id="float on an int key"),
    pytest.param({"balance.entropy": {"type": "float", "low": 0.0, "high": 1.0}}, "space.balance.entropy",
                 id="float on a bool key"),
    pytest.param({"train.epochs": {"type": "int", "low": 1.5, "high": 10}}, "space.train.epochs.low",
                 id="int with a fractional bound"),
    pytest.param({"balance.weight_lr": {"type": "float", "low": 0.2, "high": 1.5}}, "space.balance.weight_lr",
                 id="high outside the key's range"),
    pytest.param({"balance.beta": {"type": "float", "low": -0.1, "high": 0.1}}, "space.balance.beta",
                 id="low outside the key's range"),
    pytest.param({"balance.tau_min": {"type": "float", "low": 1.0, "high": 12.0}}, "space.balance.tau_min",
                 id="tau_min searched past tau_max"),
    pytest.param({"student.arch": {"type": "categorical", "choices": ["digits_cnn", "nonexistent"]}},
                 "space.student.arch", id="categorical with an unknown arch"),
    pytest.param({"method": {"type": "categorical", "choices": ["b-mtard", "kd"]}}, "space.method",
                 id="categorical with an unknown method"),
    pytest.param({"train.epochs": {"type": "categorical", "choices": [2, "many"]}}, "space.train.epochs",
                 id="categorical with a wrong type"),
    pytest.param({"train.epochs": {"type": "categorical", "choices": []}}, "space.train.epochs.choices",
                 id="categorical without choices"),
    pytest.param({"train.lr": {"type": "normal", "low": 0.1, "high": 0.2}}, "space.train.lr.type",
                 id="unknown distribution"),
    pytest.param({"train.lr": {"type": "float", "low": 0.1}}, "space.train.lr.high", id="missing bound"),
    pytest.param({"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "mean": 0.15}}, "space.train.lr.mean",
                 id="unknown distribution parameter"),
])
def test_a_bad_search_space_raises_config_error_naming_the_space_key(space, key):
    assert space_error(space).key == key


@pytest.mark.parametrize("key", ["name", "seed", "device", "data.val_fraction", "data.dataset",
                                 "teachers.robust.epochs", "teachers.cache_dir", "attack.epsilon", "attack.steps",
                                 "eval.n_examples", "eval.clean_weight", "mlflow.experiment", "train.epochs",
                                 "perf.threads"])
def test_keys_a_trial_cannot_vary_are_rejected_in_the_space_saying_why(key):
    from tune_mtard.config.schema import Config

    value = Config().get(key) if key != "data.dataset" else "digits"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    dist = ({"type": "categorical", "choices": [value]} if not numeric
            else {"type": "float" if isinstance(value, float) else "int", "low": value, "high": value + 1})
    error = space_error({key: dist})
    assert error.key == f"space.{key}" and error.message.startswith("cannot be searched: ")


def test_the_batch_size_is_searchable_since_each_trial_has_its_own_loader():
    cfg = from_dict(digits_run(space={"data.batch_size": {"type": "categorical", "choices": [32, 64]}}),
                    check_files=False)
    assert cfg.space["data.batch_size"].choices == [32, 64]


def test_search_metric_must_be_one_a_trial_reports():
    error = config_error(digits_run(search={"metric": "val_accuracy"}, space={
        "balance.beta": {"type": "float", "low": 0.5, "high": 3.0}}))
    assert error.key == "search.metric" and "val_w_robust_acc" in error.message


def test_a_space_whose_corners_break_a_cross_key_rule_is_rejected():
    error = space_error({"balance.tau_min": {"type": "float", "low": 1.0, "high": 5.0},
                         "balance.tau_max": {"type": "float", "low": 2.0, "high": 20.0}})
    assert error.key in ("space.balance.tau_min", "space.balance.tau_max")
    assert "tau_max" in error.message


def test_a_searched_tau_min_is_checked_against_the_base_tau_max():
    ok = digits_run(balance={"tau_max": 20.0}, space={"balance.tau_min": {"type": "float", "low": 1.0, "high": 12.0}})
    from_dict(ok, check_files=False)
    error = space_error({"balance.tau_min": {"type": "float", "low": 1.0, "high": 12.0}})
    assert error.key == "space.balance.tau_min"
    assert "tau_max" in error.message


def test_valid_distributions_of_every_type_are_accepted():
    cfg = from_dict(digits_run(space={
        "balance.beta": {"type": "float", "low": 0.5, "high": 3.0},
        "balance.weight_lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
        "data.batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
        "train.lr": {"type": "int", "low": 1, "high": 2},
        "balance.entropy": {"type": "categorical", "choices": [True, False]},
        "student.arch": {"type": "categorical", "choices": ["digits_cnn", "digits_cnn_large"]},
        "baselines.trades_beta": {"type": "categorical", "choices": ["3/1", "6/1"]},
    }), check_files=False)
    assert cfg.search is not None  # a space makes the config a search
    assert cfg.space["data.batch_size"].extremes() == [32, 128]
    assert cfg.space["balance.entropy"].extremes() == [True, False]


# ---- Config methods ----------------------------------------------------------------------------


def test_with_values_gives_a_new_validated_config_and_leaves_the_original_alone():
    base = from_dict(digits_run(), check_files=False)
    new = base.with_values({"balance.beta": 2.5, "train.epochs": 7, "attack.epsilon": "4/255", "method": "mtard"})
    assert (new.balance.beta, new.train.epochs, new.attack.epsilon, new.method) == (2.5, 7, 4 / 255, "mtard")
    assert (base.balance.beta, base.train.epochs, base.method) == (1.0, 300, "b-mtard")
    unchanged = dataclasses.replace(new, balance=base.balance, train=base.train, attack=base.attack, method=base.method)
    assert unchanged == base


@pytest.mark.parametrize("values, key", [
    ({"balance.tau_min": 20.0}, "balance.tau_min"),
    ({"eval.clean_weight": 2}, "eval.clean_weight"),
    ({"balance.nope": 1}, "balance.nope"),
    ({"train.epochs": "many"}, "train.epochs"),
])
def test_with_values_rejects_values_that_break_the_config(values, key):
    base = from_dict(digits_run(), check_files=False)
    with pytest.raises(ConfigError) as info:
        base.with_values(values)
    assert info.value.key == key


def test_with_values_keeps_the_search_sections():
    base = from_dict(yaml.safe_load(SPEC_RUN_YAML + SPEC_SEARCH_YAML), check_files=False)
    new = base.with_values({"balance.beta": 2.0})
    assert new.space == base.space and new.search == base.search


def test_flat_uses_dotted_keys_of_the_run_config_only():
    cfg = from_dict(yaml.safe_load(SPEC_RUN_YAML + SPEC_SEARCH_YAML), check_files=False)
    flat = cfg.flat()
    assert flat["balance.beta"] == 1.0
    assert flat["attack.epsilon"] == 8 / 255
    assert flat["teachers.robust.arch"] == "wrn34_10"
    assert flat["method"] == "b-mtard"
    assert flat["train.lr_milestones"] == [0.7167, 0.8667, 0.95]
    assert not any(isinstance(v, dict) for v in flat.values())
    assert not any(k.startswith(("search", "space")) for k in flat)
    for key, value in flat.items():
        assert cfg.get(key) == value
