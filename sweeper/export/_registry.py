"""The served model in MLflow: logged with the PyTorch flavour on its trial's run (as a
``torch.export`` program, with signature and input example) and registered in the Model
Registry, the version tagged with what it is and how well it did."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from sweeper.tracking import Tracker

log = logging.getLogger("sweeper.export")

ARTIFACT = "model"  # the logged model's name on the run


def signature(channels: int, classes: int) -> ModelSignature:
    """uint8 images ``(batch, channels, height, width)`` of any size in, float logits out.

    The tensors are unnamed: MLflow's PyTorch flavour predicts on one plain array (a named
    input would reach it as a dict, which it refuses)."""
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))


def log_and_register(served: nn.Module, example: torch.Tensor, classes: int, tracker: Tracker,
                     run_id: str, name: str, tags: Mapping[str, str],
                     description: str) -> tuple[str, str]:
    """Log ``served`` on run ``run_id`` and register it as a new version of model ``name``;
    returns the model's URI (``models:/NAME/VERSION``) and the version."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        with mlflow.start_run(run_id=run_id):  # reopened; it ends in the state it was in
            info = mlflow.pytorch.log_model(
                served, name=ARTIFACT, serialization_format="pt2",
                signature=signature(int(example.shape[1]), classes),
                input_example=example.numpy(), registered_model_name=name,
                # what loading it needs: torch (the program), mlflow and numpy (pyfunc)
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                  f"mlflow=={mlflow.__version__}", "numpy"])
    finally:
        mlflow.set_tracking_uri(previous)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, version, key, str(value))
    tracker.client.update_model_version(name, version, description=description)
    return f"models:/{name}/{version}", version
