"""train() against the mesh's real MLflow: a short MNIST job, a cancelled one, a failed one."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from PIL import Image

from services.launcher.mesh import Mesh
from services.training.events import BatchProgress, EpochCompleted, Event, JobStarted
from services.training.ml import report
from services.training.ml.tracking import RunTracker
from services.training.ml.train import Cancelled, TrainResult, TrainSpec, train
from services.training.params import PARAM_NAMES, JobParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HYPERPARAMETERS = (
    "dataset",
    "architecture",
    "epochs",
    "learning_rate",
    "batch_size",
    "optimizer",
    "seed",
    "train_subset",
)
SIZES_AND_DATA = (
    "train_size",
    "val_size",
    "test_size",
    "device",
    "dataset_digest",
    "dataset_source",
)
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "train_seconds", "epoch_seconds")


def a_spec(mesh: Mesh, **overrides: object) -> TrainSpec:
    """A small job's spec; ``overrides`` are parameters (JobParams) or the attempt's fields."""
    tag = secrets.token_hex(3)
    params: dict[str, object] = {
        "dataset": "mnist",
        "architecture": "cnn",
        "epochs": 1,
        "learning_rate": 1e-3,
        "batch_size": 128,
        "optimizer": "adam",
        "seed": 42,
        "train_subset": 2000,
        "experiment_name": f"it-training-{tag}",
        "model_name": f"it-mnist-{tag}",
    }
    attempt: dict[str, object] = {
        "job_id": f"it-job-{tag}",
        "tracking_uri": mesh.settings.mlflow_tracking_uri,
        "data_dir": None,
        "client": "alice",
        "attempt": 1,
    }
    for name, value in overrides.items():
        (params if name in PARAM_NAMES else attempt)[name] = value
    return TrainSpec(params=JobParams(**params), **attempt)  # type: ignore[arg-type]


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global URI for the fluent calls of one test, put back afterwards."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@dataclass(frozen=True)
class Trained:
    spec: TrainSpec
    result: TrainResult
    events: list[Event]
    run: Run
    client: MlflowClient


@pytest.fixture(scope="module")
def trained(mesh: Mesh) -> Trained:
    spec = a_spec(mesh)
    events: list[Event] = []
    result = train(spec, events.append, lambda: False)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    return Trained(spec, result, events, client.get_run(result.mlflow_run_id), client)


def test_events_come_in_order(trained: Trained) -> None:
    events = trained.events
    started, *middle, epoch = events
    assert isinstance(started, JobStarted) and isinstance(epoch, EpochCompleted)
    assert {type(event) for event in middle} == {BatchProgress}
    assert started.mlflow_run_id == trained.result.mlflow_run_id
    assert started.attempt == 1
    assert started.device in ("cpu", "cuda:0")
    batches = [event for event in events if isinstance(event, BatchProgress)]
    assert batches[0].batch == 1
    assert all(event.epoch == 1 and event.total_batches == 16 for event in batches)
    assert all(np.isfinite(event.train_loss) for event in batches)
    assert (epoch.epoch, epoch.total_epochs) == (1, 1)
    assert set(epoch.metrics) == set(EPOCH_METRICS)
    assert pickle.loads(pickle.dumps(events)) == events  # they cross a process boundary


def test_the_run_holds_every_param_metric_and_tag(trained: Trained) -> None:
    run, spec = trained.run, trained.spec
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(HYPERPARAMETERS + SIZES_AND_DATA) <= set(params)
    assert params["architecture"] == "cnn"
    assert float(params["learning_rate"]) == spec.params.learning_rate
    assert (params["train_size"], params["val_size"], params["test_size"]) == (
        "2000",
        "10000",
        "10000",
    )
    assert len(params["dataset_digest"]) == 64
    metrics = run.data.metrics
    assert {*EPOCH_METRICS, "test_accuracy", "test_loss"} <= set(metrics)
    assert metrics["test_accuracy"] > 0.8  # 2,000 images, one epoch
    assert trained.result.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    history = trained.client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]
    tags = run.data.tags
    assert tags["mlmesh.job_id"] == spec.job_id
    assert tags["mlmesh.client"] == "alice"
    assert tags["mlmesh.attempt"] == "1"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist"
    assert params["dataset_digest"].startswith(dataset_input.dataset.digest)


def test_the_run_holds_every_artifact(trained: Trained, tmp_path: Path) -> None:
    run_id = trained.run.info.run_id
    listed = {info.path for info in trained.client.list_artifacts(run_id)}
    assert set(report.ARTIFACTS) <= listed
    local = Path(trained.client.download_artifacts(run_id, "", str(tmp_path)))
    for png in (report.TRAINING_CURVES, report.CONFUSION_MATRIX):
        with Image.open(io.BytesIO((local / png).read_bytes())) as image:
            image.load()
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
    report_json = json.loads((local / report.REPORT_JSON).read_text())
    assert report_json["accuracy"] == pytest.approx(trained.run.data.metrics["test_accuracy"])
    assert "macro avg" in (local / report.REPORT_TEXT).read_text()
    reference = json.loads((local / report.INPUT_REFERENCE).read_text())
    assert reference["dataset"] == "mnist"
    assert reference["n_images"] == 2000
    assert len(reference["histogram"]) == 10
    assert sum(reference["histogram"]) == pytest.approx(1.0)
    assert len(reference["bin_edges"]) == 11
    assert len(reference["pixel_mean"]) == 784


def test_the_model_is_registered_and_serves_probabilities(trained: Trained) -> None:
    spec, result = trained.spec, trained.result
    version = trained.client.get_model_version(spec.params.model_name, str(result.model_version))
    assert version.status == "READY"
    assert version.run_id == result.mlflow_run_id
    assert version.tags["mlmesh.job_id"] == spec.job_id
    with tracking_uri(spec.tracking_uri):
        uri = f"models:/{spec.params.model_name}/{result.model_version}"
        model = mlflow.pyfunc.load_model(uri)
    signature = model.metadata.signature
    assert signature is not None
    (tensor,) = signature.inputs.inputs
    assert (tensor.type, tensor.shape) == (np.dtype(np.float32), (-1, 784))
    assert model.metadata.saved_input_example_info is not None
    zeros = model.predict(np.zeros((2, 784), np.float32))
    assert zeros.shape == (2, 10)
    images = np.random.default_rng(0).random((7, 784), dtype=np.float32)
    probabilities = model.predict(images)
    assert probabilities.shape == (7, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()


def test_a_cancelled_job_ends_its_run_killed(mesh: Mesh) -> None:
    spec = a_spec(mesh)
    polls = 0

    def stop_after_a_few_batches() -> bool:
        nonlocal polls
        polls += 1
        return polls > 3

    events: list[Event] = []
    with pytest.raises(Cancelled):
        train(spec, events.append, stop_after_a_few_batches)
    assert polls == 4  # stopped at the first poll that said so
    started = events[0]
    assert isinstance(started, JobStarted)
    assert not any(isinstance(event, EpochCompleted) for event in events)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    run = client.get_run(started.mlflow_run_id)
    assert run.info.status == "KILLED"
    assert client.search_model_versions(f"name = '{spec.params.model_name}'") == []


def test_a_failed_job_ends_its_run_failed(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(report, "write_confusion_matrix", broken)
    spec = a_spec(mesh, train_subset=256, architecture="mlp")
    events: list[Event] = []
    with pytest.raises(RuntimeError, match="plotting broke"):
        train(spec, events.append, lambda: False)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    started = events[0]
    assert isinstance(started, JobStarted)
    assert client.get_run(started.mlflow_run_id).info.status == "FAILED"


def test_an_experiment_without_a_kind_is_marked_as_model_training(mesh: Mesh) -> None:
    uri = mesh.settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri)
    name = f"it-untagged-{secrets.token_hex(3)}"
    experiment_id = client.create_experiment(name)  # as made before mlmesh marked them
    assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags
    RunTracker.open(uri, name, "first", {}).end("FINISHED")
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    # A kind someone chose by hand stays.
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")
    RunTracker.open(uri, name, "second", {}).end("FINISHED")
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == (
        "genai_development"
    )
