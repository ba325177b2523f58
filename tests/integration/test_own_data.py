"""Training on data mlmesh did not make, end to end through the gateway, the Training service,
its workers, MLflow and the Inference service: upload, train, register, promote, predict.

All of it offline, from what packages ship (scripts/sample_data.py writes it): scikit-learn's
digits as a folder of 8x8 PNGs, Fashion-MNIST as a folder of 32x32 RGB PNGs, scikit-learn's
wine as a CSV and as an .npz, and its breast-cancer data as a CSV (the README's walk-through,
run as written). Accuracies are asserted well above chance, and at the issue's bars where it
sets them (95% for the digits, 90% for a table by gradient boosting).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from mlflow import MlflowClient

from mlmesh.training.v1 import sweep_pb2 as spb
from mlmesh.training.v1 import training_pb2 as pb
from mlmesh_client import Client, MeshError
from scripts import sample_data
from services.launcher.mesh import Mesh
from tests.integration.readme import run_line, walk_through

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
ENDED = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


@pytest.fixture(scope="module")
def key(keys: dict[str, str]) -> str:
    return keys["alice"]


@pytest.fixture(scope="module")
def sdk(mesh: Mesh, key: str) -> Iterator[Client]:
    with Client(f"127.0.0.1:{mesh.settings.gateway_port}", api_key=key) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def train(sdk: Client, **fields: object) -> pb.TrainingJob:
    job = sdk.train(**fields)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    return job


def test_accuracy(mesh: Mesh, job: pb.TrainingJob) -> float:
    run = MlflowClient(mesh.settings.mlflow_tracking_uri).get_run(job.mlflow_run_id)
    return run.data.metrics["test_accuracy"]


test_accuracy.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def promote(sdk: Client, job: pb.TrainingJob) -> None:
    sdk.promote(job.model_name, job.model_version, force=True)


# -- images: 8x8 grey digits, 32x32 RGB clothes -------------------------------------------------


@pytest.fixture(scope="module")
def digits(sdk: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = unique("digits")
    path = sample_data.digits(tmp_path_factory.mktemp("digits") / "digits.zip")
    assert sdk.upload_dataset(name, path).dataset.samples == 1797
    return name


def test_the_cnn_learns_the_digits_and_predict_names_their_class(
    mesh: Mesh, sdk: Client, digits: str
) -> None:
    job = train(
        sdk, dataset=digits, architecture="cnn", epochs=15, learning_rate=0.003, batch_size=32
    )
    accuracy = test_accuracy(mesh, job)
    print(f"digits, cnn, 15 epochs: test accuracy {accuracy:.4f}")
    assert accuracy >= 0.95
    # The run logged the dataset version as its input, with the version's digest.
    run = MlflowClient(mesh.settings.mlflow_tracking_uri).get_run(job.mlflow_run_id)
    (logged,) = run.inputs.dataset_inputs
    version = sdk.get_dataset(digits)
    assert logged.dataset.name == digits and version.digest.startswith(logged.dataset.digest)
    assert run.data.params["dataset"] == f"{digits}@1"  # pinned at submission
    promote(sdk, job)
    right = 0
    for index in range(20):
        sample = sdk.dataset_sample(digits, index)
        answer = sdk.predict(
            np.asarray(sample.pixels, np.float32), shape=(8, 8, 1), model_name=job.model_name
        )
        assert answer.class_name == str(answer.prediction)  # the folders' names
        right += answer.prediction == sample.label
    assert right >= 17
    with pytest.raises(MeshError) as refused:  # a 28x28 image for an 8x8 model
        sdk.predict(np.zeros((28, 28), np.float32), model_name=job.model_name)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes 8x8 grey images" in str(refused.value)


def test_a_small_sweep_over_two_architectures_on_the_digits(
    mesh: Mesh, sdk: Client, digits: str
) -> None:
    model = unique("digits-sweep")
    sweep = sdk.sweep(
        dataset=digits,
        search_space={"architecture": {"choice": {"values": ["cnn", "resnet18"]}}},
        strategy="SEARCH_STRATEGY_GRID",
        max_trials=2,
        parallelism=2,
        # Two epochs: the bar is well above chance, not the digits' 95%. resnet18 is the cost
        # here (about a minute an epoch on the 2-core CI machine).
        epochs=2,
        learning_rate=0.003,
        batch_size=32,
        model_name=model,
    )
    assert sweep.state == spb.SWEEP_STATE_SUCCEEDED, sweep
    tried = {t.params["architecture"].string_value: t for t in sweep.trials}
    assert set(tried) == {"cnn", "resnet18"}
    assert {t.state for t in sweep.trials} == {spb.TRIAL_STATE_COMPLETE}
    scores = {a: t.value for a, t in tried.items()}
    print(f"digits sweep, 2 epochs: val_accuracy {scores}")
    assert min(scores.values()) > 0.5  # ten classes: chance is 0.1
    assert sweep.model_version == 1 and sweep.model_name == model


def test_rgb_pictures_of_another_size_train_a_mobilenet_with_augmentation(
    mesh: Mesh, sdk: Client, rest: httpx.Client, key: str, tmp_path: Path
) -> None:
    name = unique("fashion-rgb")
    path = sample_data.fashion(tmp_path / "fashion.zip", size=32, count=3000)
    found = sdk.upload_dataset(name, path).dataset
    assert (found.height, found.width, found.channels, found.samples) == (32, 32, 3, 3000)
    assert "Ankle boot" in [c.name for c in found.classes]
    job = train(
        sdk,
        dataset=name,
        architecture="mobilenet_v3_small",
        epochs=3,
        learning_rate=0.003,
        batch_size=64,
        augment=True,
    )
    accuracy = test_accuracy(mesh, job)
    print(f"fashion 32x32 RGB, mobilenet_v3_small, 3 epochs, augmented: {accuracy:.4f}")
    assert accuracy > 0.5
    promote(sdk, job)
    # REST, raw bytes with the image's size; the answer names the class.
    sample = sdk.dataset_sample(name, 0)
    pixels = np.rint(np.asarray(sample.pixels) * 255).astype(np.uint8)
    answer = rest.post(
        "/v1/predict",
        headers={"x-api-key": key},
        json={
            "image_raw": base64.b64encode(pixels.tobytes()).decode(),
            "height": 32,
            "width": 32,
            "channels": 3,
            "model_name": job.model_name,
        },
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["class_name"] in [c.name for c in found.classes]
    assert len(body["probabilities"]) == 10


# -- tables: wine as a CSV (gradient boosting) and as an .npz (the MLP) -------------------------


def oip_infer(mesh: Mesh, key: str, model: str, body: dict) -> dict:
    answer = httpx.post(
        f"{mesh.settings.gateway_url}/v2/models/{model}/infer",
        headers={"x-api-key": key},
        json=body,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_gradient_boosting_on_a_csv_is_served_by_column(
    mesh: Mesh, sdk: Client, key: str, tmp_path: Path
) -> None:
    name = unique("wine-csv")
    path = sample_data.table("wine", tmp_path / "wine.csv")
    assert sdk.upload_dataset(name, path, label_column="cultivar").dataset.samples == 178
    job = train(sdk, dataset=name)  # a table: gbm by default
    run = MlflowClient(mesh.settings.mlflow_tracking_uri).get_run(job.mlflow_run_id)
    assert run.data.params["architecture"] == "gbm"
    assert run.data.params["learning_rate"] == "0.1"
    accuracy = run.data.metrics["test_accuracy"]
    print(f"wine, gbm: test accuracy {accuracy:.4f}")
    assert accuracy >= 0.90
    promote(sdk, job)
    request = tmp_path / "request.json"
    sample_data.infer_request(path, request, "cultivar", 6)
    body = json.loads(request.read_text())
    answer = oip_infer(mesh, key, job.model_name, body)
    (output,) = answer["outputs"]
    probabilities = np.asarray(output["data"]).reshape(output["shape"])
    assert probabilities.shape == (6, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    # The rows run from the first cultivar's to the last's, two of each.
    assert probabilities.argmax(axis=1).tolist() == [0, 0, 1, 1, 2, 2]


def test_an_npz_table_trains_the_mlp_served_as_one_tensor(
    mesh: Mesh, sdk: Client, key: str, tmp_path: Path
) -> None:
    name = unique("wine-npz")
    path = sample_data.table("wine", tmp_path / "wine.npz")
    found = sdk.upload_dataset(name, path).dataset
    assert len(found.columns) == 13 and found.samples == 178
    job = train(sdk, dataset=name, architecture="mlp", epochs=30, learning_rate=0.01)
    accuracy = test_accuracy(mesh, job)
    print(f"wine npz, mlp, 30 epochs: test accuracy {accuracy:.4f}")
    assert accuracy > 0.8  # three classes: chance is 0.4 at most
    promote(sdk, job)
    with np.load(path) as arrays:
        x, y = arrays["x"], arrays["y"]
    rows = [0, 100, 177]
    body = {
        "inputs": [
            {
                "name": "input-0",
                "datatype": "FP32",
                "shape": [3, 13],
                "data": x[rows].ravel().tolist(),
            }
        ]
    }
    (output,) = oip_infer(mesh, key, job.model_name, body)["outputs"]
    assert np.asarray(output["data"]).reshape(3, 3).argmax(axis=1).tolist() == y[rows].tolist()


# -- what is refused ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(sdk: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = unique("cancer")
    path = sample_data.table("breast-cancer", tmp_path_factory.mktemp("cancer") / "cancer.csv")
    sdk.upload_dataset(name, path, label_column="diagnosis")
    return name


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"architecture": "gbm"}, "architecture gbm takes table, and this dataset is images"),
        ({"architecture": "mlp", "train_subset": 5000}, "at most the 1439 training samples"),
        ({"dataset_suffix": "@7"}, "version 7 of dataset"),
    ],
)
def test_submissions_that_cannot_take_the_digits_are_refused(
    sdk: Client, digits: str, fields: dict, words: str
) -> None:
    fields = dict(fields)
    dataset = digits + fields.pop("dataset_suffix", "")
    with pytest.raises(MeshError) as refused:
        sdk.submit_training_job(dataset=dataset, **fields)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(refused.value)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"architecture": "cnn"}, "architecture cnn takes images, and this dataset is a table"),
        ({"augment": True}, "is a table; augmenting is for images"),
    ],
)
def test_submissions_that_cannot_take_a_table_are_refused(
    sdk: Client, table: str, fields: dict, words: str
) -> None:
    with pytest.raises(MeshError) as refused:
        sdk.submit_training_job(dataset=table, **fields)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(refused.value)
    with pytest.raises(MeshError) as unknown:
        sdk.submit_training_job(dataset=unique("nothing"))
    assert unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not exist" in str(unknown.value)


def test_a_version_in_use_cannot_be_deleted_until_its_job_ends(sdk: Client, table: str) -> None:
    job = sdk.submit_training_job(dataset=table, architecture="mlp", epochs=100, batch_size=1)
    with pytest.raises(MeshError) as refused:
        sdk.delete_dataset_version(table, 1)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert job.job_id in str(refused.value)
    sdk.cancel_training_job(job.job_id)
    deadline = time.monotonic() + 120
    while sdk.get_training_job(job.job_id).state not in ENDED:
        assert time.monotonic() < deadline, "the cancelled job did not end"
        time.sleep(0.5)
    assert sdk.delete_dataset_version(table, 1).version == 1


# -- the README's walk-through, as written ----------------------------------------------------


def test_the_readme_walk_through_runs_as_written(mesh: Mesh, key: str, tmp_path: Path) -> None:
    # In a directory of its own (the files it writes stay there), with the venv and scripts
    # where the README's lines look for them, and the test mesh's gateway for localhost:8000.
    for name in (".venv", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    gateway = f"127.0.0.1:{mesh.settings.gateway_port}"
    env = {**os.environ, "MLMESH_GATEWAY": gateway, "MLMESH_API_KEY": key}
    outputs = []
    for line in walk_through("### Train on your own data"):
        done = run_line(line.replace("localhost:8000", gateway), cwd=tmp_path, env=env, timeout=600)
        outputs.append((line, done.stdout, done.stderr))
    text = {line: out + err for line, out, err in outputs}

    def said(prefix: str) -> str:
        return next(output for line, output in text.items() if line.startswith(prefix))

    print(said(".venv/bin/mlmesh datasets upload digits"))  # for the README's example
    assert "1797 images" in said(".venv/bin/mlmesh datasets upload digits")
    digits = re.search(r"test_accuracy (\d\.\d+)", said(".venv/bin/mlmesh train --dataset digits"))
    cancer = re.search(r"test_accuracy (\d\.\d+)", said(".venv/bin/mlmesh train --dataset cancer"))
    assert digits and cancer
    print(f"walk-through: digits {digits.group(1)}, cancer {cancer.group(1)}")
    assert float(digits.group(1)) >= 0.95 and float(cancer.group(1)) >= 0.90
    seven = said(".venv/bin/mlmesh predict --model digits-classifier --image")
    print(seven)
    assert seven.startswith("prediction: 7  confidence"), seven
    assert "model:      digits-classifier v1" in seven
    labels = re.search(
        r"their labels: \[(.*)\]", said(".venv/bin/python scripts/sample_data.py infer")
    )
    assert labels
    answer = json.loads(said("curl "))
    (output,) = answer["outputs"]
    predicted = np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1)
    assert predicted.tolist() == [int(v) for v in labels.group(1).split(",")]
