"""Serving models mlmesh did not train: logged with plain MLflow to the mesh's tracking server,
promoted through mlmesh, called over gRPC and REST with tritonclient, and compared with the
models' own in-process answers.

- a scikit-learn pipeline with a column signature, on scikit-learn's wine data;
- a torchvision ResNet-18 (random weights) exported to ONNX, input [-1, 3, 224, 224];
- a PyTorch module with two inputs of different datatypes;
- a model without a signature (refused), and one whose predict raises (INTERNAL; the service
  stays up).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import mlflow
import mlflow.onnx
import mlflow.pytorch
import mlflow.sklearn
import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
import torchvision
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import Schema, TensorSpec
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.model_contract import DRIFT_REFERENCE, drift_reference
from services.launcher.mesh import Mesh
from tests.conftest import metric_sample
from tests.integration.models import tracking

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-tritonclient" / "bin" / "python"


@dataclass(frozen=True)
class Served:
    name: str
    version: int


def promote(rest: httpx.Client, key: str, name: str, version: int) -> httpx.Response:
    return rest.post(
        f"/v1/models/{name}/versions/{version}:transition",
        json={"stage": "production"},
        headers={"x-api-key": key},
    )


def triton(
    mesh: Mesh, key: str, protocol: str, name: str, request: dict, version: str = ""
) -> dict:
    """tritonclient's answer (oip_call.py), over ``protocol`` through the gateway."""
    done = subprocess.run(
        [
            str(TRITON_PYTHON),
            str(ROOT / "tests" / "integration" / "oip_call.py"),
            "--url",
            f"127.0.0.1:{mesh.settings.gateway_port}",
            "--protocol",
            protocol,
            f"--key={key}",  # one form: a key may start with "-" (token_urlsafe)
            "--model",
            name,
            "--version",
            version,
        ],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def scrape(mesh: Mesh) -> str:
    return httpx.get(f"http://127.0.0.1:{mesh.settings.inference_ops_port}/metrics").text


@pytest.fixture(scope="module")
def key(keys: dict[str, str]) -> str:
    return keys["alice"]


# -- scikit-learn: a column signature ----------------------------------------------------------


@dataclass(frozen=True)
class Wine:
    served: Served
    features: pd.DataFrame
    own: np.ndarray  # the pipeline's own predictions for ``features``


@pytest.fixture(scope="module")
def wine(mesh: Mesh, rest: httpx.Client, key: str) -> Wine:
    data = load_wine(as_frame=True)
    features = data.data.rename(columns=lambda c: c.replace("/", "_"))
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    pipeline.fit(features, data.target)
    name = f"it-wine-{secrets.token_hex(3)}"
    with tracking(mesh.settings.mlflow_tracking_uri), mlflow.start_run():
        mlflow.log_dict(drift_reference(dict(features.items())), DRIFT_REFERENCE)
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(features, pipeline.predict(features)),
            input_example=features.head(3),
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    assert promote(rest, key, name, version).status_code == 200
    sample = features.sample(20, random_state=0)
    return Wine(Served(name, version), sample, pipeline.predict(sample))


def wine_request(features: pd.DataFrame) -> dict:
    return {
        "inputs": [
            {"name": c, "datatype": "FP64", "shape": [len(features)], "data": features[c].tolist()}
            for c in features.columns
        ]
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_scikit_learn_pipeline_answers_as_it_does_in_process(
    mesh: Mesh, key: str, wine: Wine, protocol: str
) -> None:
    answer = triton(mesh, key, protocol, wine.served.name, wine_request(wine.features))
    assert answer["model_version"] == str(wine.served.version)
    (output,) = answer["outputs"].values()
    assert output["datatype"] == "INT64" and output["shape"] == [20]
    assert output["data"] == wine.own.tolist()


def test_its_metadata_and_drift_come_from_the_model(
    mesh: Mesh, rest: httpx.Client, key: str, wine: Wine
) -> None:
    meta = rest.get(f"/v2/models/{wine.served.name}", headers={"x-api-key": key}).json()
    assert meta["platform"] == "mlflow_pyfunc"
    assert meta["inputs"][0] == {"name": "alcohol", "datatype": "FP64", "shape": [-1]}
    assert len(meta["inputs"]) == 13
    assert meta["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1]}]
    # The same rows again come from the prediction cache.
    labels = {"model_name": wine.served.name}
    hits = metric_sample(scrape(mesh), "prediction_cache_hits_total", **labels)
    triton(mesh, key, "http", wine.served.name, wine_request(wine.features))
    assert metric_sample(scrape(mesh), "prediction_cache_hits_total", **labels) >= hits + 20
    # Drift per input feature, from the reference logged with the run.
    drift = metric_sample(scrape(mesh), "model_input_drift_psi", **labels, input="alcohol")
    assert 0.0 <= drift < 1.0


def test_a_wrong_tensor_is_named_with_what_the_model_takes(
    mesh: Mesh, key: str, wine: Wine
) -> None:
    request = wine_request(wine.features)
    request["inputs"][0]["datatype"] = "FP32"
    answer = triton(mesh, key, "grpc", wine.served.name, request)
    assert "INVALID_ARGUMENT" in answer["error"]
    assert "(alcohol) has datatype FP32; the model takes FP64" in answer["error"]
    del request["inputs"][0]
    answer = triton(mesh, key, "http", wine.served.name, request)
    assert "input 'alcohol' is missing" in answer["error"]


# -- ONNX: a torchvision ResNet ------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet(mesh: Mesh, rest: httpx.Client, key: str, tmp_path_factory: pytest.TempPathFactory):
    module = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    torch.onnx.export(
        module,
        (torch.zeros(2, 3, 224, 224),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 224, 224), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "logits")]),
    )
    name = f"it-resnet-{secrets.token_hex(3)}"
    with tracking(mesh.settings.mlflow_tracking_uri), mlflow.start_run():
        info = mlflow.onnx.log_model(
            onnx.load(str(path)), name="model", signature=signature, registered_model_name=name
        )
    version = int(info.registered_model_version)
    assert promote(rest, key, name, version).status_code == 200
    return Served(name, version), onnxruntime.InferenceSession(str(path))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_onnx_resnet_answers_as_onnx_runtime_does(
    mesh: Mesh, key: str, resnet, protocol: str
) -> None:
    served, session = resnet
    images = np.random.default_rng(1).random((2, 3, 224, 224), dtype=np.float32)
    own = session.run(None, {"image": images})[0]
    request = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [2, 3, 224, 224],
                "data": images.ravel().tolist(),
            }
        ]
    }
    answer = triton(mesh, key, protocol, served.name, request)
    logits = answer["outputs"]["logits"]
    assert logits["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(logits["data"]).reshape(2, 10), own, rtol=1e-4, atol=1e-4)
    # No drift reference was logged: no drift gauge for this version.
    assert "model_input_drift_psi{" not in _lines_of(scrape(mesh), served.name)


def _lines_of(text: str, name: str) -> str:
    return "\n".join(line for line in text.splitlines() if f'model_name="{name}"' in line)


# -- PyTorch: two inputs of different datatypes ---------------------------------------------------


class Scorer(torch.nn.Module):
    """Scores 4 features per row, shifted by an embedding of the row's category."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.category = torch.nn.Embedding(5, 3)

    def forward(self, features: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return self.linear(features) + self.category(category)


def test_a_pytorch_model_with_two_inputs_of_different_datatypes(
    mesh: Mesh, rest: httpx.Client, key: str
) -> None:
    torch.manual_seed(0)
    module = torch.jit.script(Scorer().eval())  # TorchScript: no pickled class to import
    signature = ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 4), "features"),
                TensorSpec(np.dtype(np.int64), (-1,), "category"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3), "scores")]),
    )
    name = f"it-two-inputs-{secrets.token_hex(3)}"
    with tracking(mesh.settings.mlflow_tracking_uri), mlflow.start_run():
        info = mlflow.pytorch.log_model(
            module,
            name="model",
            signature=signature,
            serialization_format="pickle",  # torch.jit.save's format for a ScriptModule
            pip_requirements=["torch"],
            registered_model_name=name,
        )
    assert promote(rest, key, name, int(info.registered_model_version)).status_code == 200
    features = np.random.default_rng(2).random((3, 4), dtype=np.float32)
    category = np.array([0, 4, 2], dtype=np.int64)
    with torch.no_grad():
        own = module(torch.from_numpy(features), torch.from_numpy(category)).numpy()
    request = {
        "inputs": [
            {"name": "category", "datatype": "INT64", "shape": [3], "data": category.tolist()},
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [3, 4],
                "data": features.ravel().tolist(),
            },
        ]
    }
    for protocol in ("grpc", "http"):
        scores = triton(mesh, key, protocol, name, request)["outputs"]["scores"]
        np.testing.assert_allclose(np.array(scores["data"]).reshape(3, 3), own, rtol=1e-5)
    meta = rest.get(f"/v2/models/{name}", headers={"x-api-key": key}).json()
    assert meta["platform"] == "pytorch"
    assert [i["name"] for i in meta["inputs"]] == ["features", "category"]


# -- refused, and failing ------------------------------------------------------------------------


def test_a_model_without_a_signature_is_refused_and_production_goes_on(
    mesh: Mesh, rest: httpx.Client, key: str, wine: Wine
) -> None:
    model = LogisticRegression(max_iter=200).fit(wine.features, wine.own)
    with tracking(mesh.settings.mlflow_tracking_uri), mlflow.start_run():
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=wine.served.name)
    version = int(info.registered_model_version)
    refused = promote(rest, key, wine.served.name, version)
    assert refused.status_code == 400
    message = refused.json()["message"]
    assert f"version {version} of {wine.served.name!r} cannot be served" in message
    assert "it has no signature" in message
    asked = triton(mesh, key, "http", wine.served.name, wine_request(wine.features), str(version))
    assert asked["error"].startswith("400") and "it has no signature" in asked["error"]
    # Production is still the version before, and answers.
    answer = triton(mesh, key, "grpc", wine.served.name, wine_request(wine.features))
    assert answer["model_version"] == str(wine.served.version)


def test_a_model_that_raises_is_internal_and_the_service_stays_up(
    mesh: Mesh, rest: httpx.Client, key: str, wine: Wine
) -> None:
    broken = KNeighborsClassifier(n_neighbors=3).fit(wine.features.head(5), wine.own[:5])
    broken.n_neighbors = 50  # more than it was fitted on: predict raises ValueError
    name = f"it-raises-{secrets.token_hex(3)}"
    with tracking(mesh.settings.mlflow_tracking_uri), mlflow.start_run():
        info = mlflow.sklearn.log_model(
            broken,
            name="model",
            signature=infer_signature(wine.features, wine.own),
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    assert promote(rest, key, name, version).status_code == 200
    errors = metric_sample(scrape(mesh), "model_errors_total", model_name=name)
    for protocol, status in (("grpc", "StatusCode.INTERNAL"), ("http", "500")):
        answer = triton(mesh, key, protocol, name, wine_request(wine.features))
        assert answer["error"].startswith(status), answer
        assert f"model {name!r} version {version} failed: ValueError:" in answer["error"]
    assert metric_sample(scrape(mesh), "model_errors_total", model_name=name) == errors + 2
    assert rest.get("/ready").status_code == 200
    healthy = triton(mesh, key, "grpc", wine.served.name, wine_request(wine.features))
    assert healthy["outputs"]["output-0"]["data"] == wine.own.tolist()


# -- the README's walk-through, as written ---------------------------------------------------


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Serve your own model") :]
    return section[: section.index("\n#### ")]


def test_the_readme_walk_through_runs_as_written(mesh: Mesh, key: str) -> None:
    section = _readme_section()
    log_model, ask = re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
    bash_lines = [
        line
        for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
        for line in block.splitlines()
    ]
    (promote_line,) = [line for line in bash_lines if line.startswith(".venv/bin/mlmesh")]
    # MLflow through the gateway, with the API key as MLflow's token, as the README sets it.
    (mlflow_env,) = [line for line in bash_lines if line.startswith("export MLFLOW_TRACKING_URI")]
    mlflow_env = mlflow_env.replace(
        "127.0.0.1:5000", f"127.0.0.1:{mesh.settings.gateway_mlflow_port}"
    )
    env = {
        **os.environ,
        "MLMESH_GATEWAY": f"127.0.0.1:{mesh.settings.gateway_port}",
        "MLMESH_API_KEY": key,
    }

    def run(argv: list[str], stdin: str = "") -> str:
        done = subprocess.run(
            argv, input=stdin, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    python = ROOT / ".venv" / "bin" / "python"
    logged = run(["bash", "-c", f'{mlflow_env} && exec "{python}" -'], log_model)
    promoted = run(["bash", "-c", promote_line])
    assert "wine-classifier v1 is now Production" in promoted
    gateway = f"127.0.0.1:{mesh.settings.gateway_port}"
    served = run([str(TRITON_PYTHON), "-"], ask.replace("127.0.0.1:8000", gateway))
    in_process = re.search(r"^in process: (\[.*\])$", logged, flags=re.M)
    answered = re.search(r"^served: (\[.*\]) by version 1$", served, flags=re.M)
    assert in_process and answered, (logged, served)
    assert answered.group(1) == in_process.group(1)


def test_predict_serves_any_image_classifier_in_its_own_layout(
    mesh: Mesh, gateway_channel, key: str, resnet
) -> None:
    # The ResNet takes channels-first [-1, 3, 224, 224]; Predict's images are channels last.
    served, session = resnet
    pixels = np.random.default_rng(3).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    stub = inference_pb2_grpc.InferenceServiceStub(gateway_channel)
    answer = stub.PredictBatch(
        inference_pb2.PredictBatchRequest(
            images=[inference_pb2.Image(raw=pixels.tobytes(), height=224, width=224, channels=3)],
            model_name=served.name,
        ),
        metadata=[("x-api-key", key)],
    )
    chw = (pixels.astype(np.float32) / 255.0).transpose(2, 0, 1)[np.newaxis]
    own = session.run(None, {"image": np.ascontiguousarray(chw)})[0][0]
    (prediction,) = answer.predictions
    assert prediction.prediction == int(own.argmax())
    np.testing.assert_allclose(prediction.probabilities, own, rtol=1e-4, atol=1e-4)
    assert prediction.class_name == ""  # the model names no classes
    # An image of another size is refused, naming what the model takes.
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(
            inference_pb2.PredictRequest(image_raw=bytes(784), model_name=served.name),
            metadata=[("x-api-key", key)],
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the image is 28x28 grey" in refused.value.details()
    assert "takes 224x224 RGB images" in refused.value.details()
