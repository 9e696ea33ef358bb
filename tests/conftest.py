"""Shared fixtures: a tiny digits run (seconds on a CPU) whose teachers are trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: the CI machine's few cores are shared, and more threads only fight over them.
torch.set_num_threads(1)

TINY_RUN_YAML = """\
name: tiny-digits
seed: 0
device: cpu
data: {{dataset: digits, root: ./data, val_fraction: 0.15, batch_size: 128}}
student: {{arch: digits_cnn}}
teachers:
  clean:  {{arch: digits_cnn_large, checkpoint: auto, recipe: natural, epochs: 4, lr: 0.1}}
  robust: {{arch: digits_cnn, checkpoint: auto, recipe: trades, epochs: 3, lr: 0.1}}
  cache_dir: {cache_dir}
method: b-mtard
attack: {{epsilon: 0.1, step_size: 0.025, steps: 2}}
train: {{epochs: 2, lr: 0.05, lr_milestones: [0.7167, 0.8667, 0.95], lr_gamma: 0.1}}
balance: {{entropy: true, loss: true, beta: 1.0, tau_init: 1.0, tau_min: 1.0, tau_max: 10.0,
          tau_lr: 0.001, weight_lr: 0.025}}
eval: {{every: 1, n_examples: 64, pgd_steps: 2, pgd_step_size: 0.025, clean_weight: 0.5,
       final_attacks: [clean, pgd20], final_n_examples: 64}}
mlflow: {{tracking_uri: "sqlite:///{mlflow_db}", experiment: tiny-digits}}
"""


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    """A run config for digits: 2 epochs of 10 steps, 2-step PGD, teachers cached in a tmp dir.

    The teachers train for a few epochs (about 90% clean accuracy) so their soft labels are far from uniform.
    """
    root = tmp_path_factory.mktemp("tiny-run")
    path = root / "tiny.yaml"
    path.write_text(TINY_RUN_YAML.format(cache_dir=root / "teachers", mlflow_db=root / "mlflow.db"))
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_config_path):
    from tune_mtard.config import load_config

    return load_config(tiny_config_path, check_files=False)


@pytest.fixture(scope="session")
def tiny_digits(tiny_config):
    from tune_mtard.data import load_data

    return load_data(tiny_config)


@pytest.fixture(scope="session")
def tiny_teachers(tiny_config, tiny_digits) -> dict[str, torch.nn.Module]:
    """Both teachers, trained once (into ``teachers.cache_dir``) and reused by every test and command."""
    from tune_mtard.teachers import prepare_teachers

    return prepare_teachers(tiny_config, tiny_digits, torch.device("cpu"), progress=False, log=lambda *a: None).models


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the whole session (2 CPUs): in-process searches reuse it, subprocess drivers join it
    with ``--address``. Returns its GCS address."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                 logging_level="warning", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def space_file(tiny_config, tiny_teachers, tmp_path_factory) -> Path:
    """The session's tiny run config (its teachers already cached) plus a search and a space section."""
    from searchkit import SEARCH_SECTIONS

    from tune_mtard.config import to_yaml

    path = tmp_path_factory.mktemp("space") / "tiny_space.yaml"
    path.write_text(to_yaml(tiny_config) + SEARCH_SECTIONS)
    return path
