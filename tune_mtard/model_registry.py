"""The best student as an MLflow Model, registered in the MLflow Model Registry (docs/search.md, "The best
student as an MLflow Model").

The student is logged with ``mlflow.pytorch.log_model`` in MLflow 3's pickle-free ``pt2`` format
(``torch.export``), with an input example and a signature (images in [0, 1], NCHW, float32), to the run
it came from, and registered as a new version of a named model tagged with where it came from. Loading
``models:/<name>/<version>`` gives a module whose predictions equal the saved ``student.pt``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tune_mtard.data import DataBundle
from tune_mtard.services import mask_secrets

MODEL_NAME = "student"  # the logged model's name within its run
EXAMPLE_BATCH = 4  # >= 2, or torch.export fixes the batch dimension at the example's size


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>


def example_batch(data: DataBundle) -> torch.Tensor:
    """The first validation images as float32 NCHW in [0, 1]: the input example every logged student carries."""
    return data.val.head(EXAMPLE_BATCH).floats().cpu().contiguous()


def register_student(client: Any, run_id: str, model: nn.Module, data: DataBundle, name: str,
                     tags: dict[str, Any]) -> Registered:
    """Log ``model`` (in eval mode, on the CPU) to ``run_id`` as a pt2 MLflow Model and register it as ``name``."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    example = example_batch(data)
    with torch.no_grad():
        outputs = model(example).numpy()
    inputs = example.numpy().astype(np.float32)
    run = client.get_run(run_id)
    mlflow.set_tracking_uri(client.tracking_uri)
    # log_model files the logged model under the fluent "current experiment", not under the run's.
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    info = mlflow.pytorch.log_model(
        model, name=MODEL_NAME, input_example=inputs, signature=infer_signature(inputs, outputs),
        serialization_format="pt2", run_id=run_id, registered_model_name=name,
        # Given, not inferred: inference loads the model in a subprocess (seconds) and needs no more.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
    )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, mask_secrets(str(value))[:5000])
    return Registered(name, version, f"models:/{name}/{version}")


def load_registered(model_uri: str) -> nn.Module:
    """The registered student (a ``torch.fx.GraphModule``, already in eval mode: do not call ``.eval()`` on it)."""
    import mlflow

    return mlflow.pytorch.load_model(model_uri)
