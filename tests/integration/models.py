"""Model versions for tests that need real, servable ones fast: logged with plain MLflow.

A trained mlmesh model takes a minute; these take a fraction of a second each. They are tiny
PyTorch classifiers (784 pixels in, 10 probabilities out, as the Inference service serves
them), pickled, with their pip requirements given so that MLflow does not infer them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[MlflowClient]:
    """The fluent MLflow API pointed at ``uri`` for the block (this process is shared)."""
    mlflow.set_tracking_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(None)


def classifier(favourite: int = 0) -> torch.nn.Module:
    """A 784 -> 10 softmax classifier that leans towards class ``favourite``."""
    torch.manual_seed(favourite)
    linear = torch.nn.Linear(784, 10)
    with torch.no_grad():
        linear.bias[favourite] += 5.0
    return torch.nn.Sequential(linear, torch.nn.Softmax(dim=1)).eval()


TESTS_EXPERIMENT = "it-models"


def tests_experiment(client: MlflowClient) -> str:
    """The id of the experiment the tests' own models are logged to, made on first use: not
    MLflow's "Default", which a test checks that mlmesh leaves empty."""
    found = client.get_experiment_by_name(TESTS_EXPERIMENT)
    return found.experiment_id if found else client.create_experiment(TESTS_EXPERIMENT)


def log_classifier(
    uri: str,
    name: str,
    *,
    run_id: str | None = None,
    favourite: int = 0,
    metrics: dict[str, float] | None = None,
) -> int:
    """Register a new version of ``name`` (in run ``run_id``, or a new run of the tests'
    experiment) with ``metrics`` logged on its run; returns the version number."""
    module = classifier(favourite)
    example = np.zeros((1, 784), np.float32)
    with torch.no_grad():
        signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
    with tracking(uri) as client:
        # The run named by id, not the fluent API's active run or experiment (another test
        # may have left one active).
        new = run_id is None
        if new:
            run_id = client.create_run(tests_experiment(client)).info.run_id
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, value)
        info = mlflow.pytorch.log_model(
            module,
            name="model",
            run_id=run_id,
            signature=signature,
            serialization_format="pickle",
            pip_requirements=["torch"],
            registered_model_name=name,
        )
        if new:
            client.set_terminated(run_id)
    return int(info.registered_model_version)


def register_without_artifacts(uri: str, name: str) -> int:
    """Register a version of ``name`` whose source holds no model (its files are gone)."""
    with tracking(uri) as client:
        run = client.create_run(tests_experiment(client))
        client.set_terminated(run.info.run_id)
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_registered_model(name)
        found = client.create_model_version(
            name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
        )
    return int(found.version)
