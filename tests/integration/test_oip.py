"""The Open Inference Protocol (KServe V2) through the gateway: NVIDIA's tritonclient over gRPC
and HTTP, unchanged, plus the protocol's errors, against a model trained and promoted here."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from mlmesh.inference.v1 import inference_pb2 as pb
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.oip.v2 import grpc_predict_v2_pb2 as oip
from mlmesh.oip.v2 import grpc_predict_v2_pb2_grpc
from services.launcher.mesh import Mesh
from services.training.ml.data import load_dataset
from services.training.ml.train import train
from tests.conftest import metric_sample as metric
from tests.integration.models import log_classifier
from tests.integration.test_inference import promote, scrape
from tests.integration.test_training_ml import a_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-tritonclient" / "bin" / "python"
EXAMPLE = ROOT / "examples" / "tritonclient_oip.py"


@dataclass(frozen=True)
class Served:
    name: str
    images: np.ndarray  # 8 MNIST test images, (8, 784) float32
    images_file: Path


@pytest.fixture(scope="module")
def served(mesh: Mesh, keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A model with two versions: v1 holds production, v2 staging."""
    name = f"it-oip-{secrets.token_hex(3)}"
    train(a_spec(mesh, model_name=name), lambda _: None, lambda: False)
    train(a_spec(mesh, model_name=name, architecture="mlp", seed=7), lambda _: None, lambda: False)
    promote(mesh, keys, name, 1)
    promote(mesh, keys, name, 2, stage="staging")
    images = load_dataset("mnist").test.images[:8].numpy()
    path = tmp_path_factory.mktemp("oip") / "digits.npy"
    np.save(path, images)
    return Served(name, images, path)


@pytest.fixture(scope="module")
def auth(keys: dict[str, str]) -> list[tuple[str, str]]:
    return [("x-api-key", keys["alice"])]


@pytest.fixture(scope="module")
def oip_stub(gateway_channel: grpc.Channel) -> grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def rest_key(mesh: Mesh, keys: dict[str, str]) -> Iterator[httpx.Client]:
    """An HTTP client for the gateway that sends alice's key."""
    with httpx.Client(
        base_url=mesh.settings.gateway_url, headers={"x-api-key": keys["alice"]}, timeout=30.0
    ) as client:
        yield client


def predict_answers(
    gateway_channel: grpc.Channel, auth, name: str, version: str, images: np.ndarray
) -> np.ndarray:
    """mlmesh's own Predict API's probabilities for ``images``."""
    reply = inference_pb2_grpc.InferenceServiceStub(gateway_channel).PredictBatch(
        pb.PredictBatchRequest(
            images=[pb.Image(pixels=image.tolist()) for image in images],
            model_name=name,
            model_version=version,
        ),
        metadata=auth,
    )
    return np.array([list(p.probabilities) for p in reply.predictions], dtype=np.float32)


def triton_python(args: list[str], key: str) -> str:
    """Run Python in .venv-tritonclient (tritonclient's own environment); its stdout."""
    done = subprocess.run(
        [str(TRITON_PYTHON), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"MLMESH_API_KEY": key},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_example(mesh: Mesh, keys: dict[str, str], served: Served, version: str) -> dict:
    """examples/tritonclient_oip.py, as the README runs it, with --json."""
    args = [
        str(EXAMPLE),
        f"--url=127.0.0.1:{mesh.settings.gateway_port}",
        f"--model={served.name}",
        f"--version={version}",
        f"--images={served.images_file}",
        "--json",
    ]
    return json.loads(triton_python(args, keys["alice"]))


def infer_request(name: str, images: np.ndarray, version: str = "") -> oip.ModelInferRequest:
    """A raw ModelInferRequest of ``images``."""
    request = oip.ModelInferRequest(model_name=name, model_version=version)
    request.inputs.add(name="input-0", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.astype("<f4").tobytes())
    return request


def test_the_readme_snippet_runs_as_written(
    mesh: Mesh, keys: dict[str, str], served: Served
) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The Open Inference Protocol") :]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start : section.index("```\n", start)]
    snippet = snippet.replace("mnist-classifier", served.name).replace(
        "127.0.0.1:8000", f"127.0.0.1:{mesh.settings.gateway_port}"
    )
    stdout = triton_python(["-c", snippet], keys["alice"])
    assert stdout.splitlines()[-1].startswith("1 [")  # production is v1


# -- registry-aware semantics -------------------------------------------------------------------


def test_model_ready_only_once_the_version_is_loaded(
    mesh: Mesh, served: Served, oip_stub, auth, rest: httpx.Client, rest_key: httpx.Client
) -> None:
    # A version nothing has asked for (promotions load theirs first): asking for readiness
    # does not load it.
    name = f"{served.name}-ready"
    version = str(log_classifier(mesh.settings.mlflow_tracking_uri, name))
    ready = oip.ModelReadyRequest(name=name, version=version)
    assert oip_stub.ModelReady(ready).ready is False  # public: no key needed
    not_ready = rest.get(f"/v2/models/{name}/versions/{version}/ready")
    assert (not_ready.status_code, not_ready.json()) == (400, {"name": name, "ready": False})
    assert oip_stub.ModelReady(ready).ready is False
    oip_stub.ModelInfer(infer_request(name, served.images[:1], version), metadata=auth)
    assert oip_stub.ModelReady(ready).ready is True
    assert rest.get(f"/v2/models/{name}/versions/{version}/ready").status_code == 200
    # an unknown model or alias is simply not ready
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name="no-such-model")).ready is False
    assert rest.get(f"/v2/models/{served.name}/versions/canary/ready").status_code == 400
    assert rest.get("/v2/health/live").json() == {"live": True}
    assert rest.get("/v2/health/ready").json() == {"ready": True}


# -- tritonclient, a client nobody here wrote -----------------------------------------------------


@pytest.mark.parametrize(("version", "answering"), [("", "1"), ("1", "1"), ("staging", "2")])
def test_tritonclient_over_grpc_and_http_gets_predicts_answers(
    mesh: Mesh,
    keys: dict[str, str],
    served: Served,
    gateway_channel: grpc.Channel,
    auth,
    version: str,
    answering: str,
) -> None:
    found = run_example(mesh, keys, served, version)
    expected = predict_answers(gateway_channel, auth, served.name, answering, served.images)
    for face in ("grpc", "http"):
        f = found[face]
        assert (f["live"], f["ready"], f["model_ready"]) == (True, True, True), face
        meta = f["metadata"]
        assert meta["name"] == served.name
        assert meta["versions"] == ["2", "1"]
        assert meta["platform"] == "onnxruntime_onnx"
        # proto3 JSON (tritonclient's as_json) writes int64 as strings; REST has numbers
        shape = [int(d) for d in meta["inputs"][0]["shape"]]
        assert (meta["inputs"][0]["name"], meta["inputs"][0]["datatype"], shape) == (
            "input-0",
            "FP32",
            [-1, 784],
        )
        assert [int(d) for d in meta["outputs"][0]["shape"]] == [-1, 10]
        for form in ("raw", "typed"):
            assert f[form]["version"] == answering, (face, form)
            np.testing.assert_allclose(
                np.array(f[form]["probabilities"], dtype=np.float32), expected, atol=1e-6
            )
        errors = f["errors"]
        not_found = "StatusCode.NOT_FOUND" if face == "grpc" else "404"
        invalid = "StatusCode.INVALID_ARGUMENT" if face == "grpc" else "400"
        assert errors["unknown model"]["status"] == not_found
        assert "no-such-model" in errors["unknown model"]["message"]
        assert errors["unknown version"]["status"] == not_found
        assert "999" in errors["unknown version"]["message"]
        assert errors["wrong shape"]["status"] == invalid
        assert "shape [8, 100]" in errors["wrong shape"]["message"]
        assert errors["wrong datatype"]["status"] == invalid
        assert "datatype FP64" in errors["wrong datatype"]["message"]


def test_the_readme_example_runs_as_written(
    mesh: Mesh, keys: dict[str, str], served: Served, tmp_path: Path
) -> None:
    """As the README runs it: four MNIST test digits, readable lines."""
    digits = tmp_path / "digits.npy"
    np.save(digits, served.images[:4])
    url = f"--url=127.0.0.1:{mesh.settings.gateway_port}"
    stdout = triton_python(
        [str(EXAMPLE), url, f"--model={served.name}", f"--images={digits}"], keys["bob"]
    )
    print(stdout)  # what tritonclient printed, for the record (pytest -s)
    assert "grpc: live=True ready=True model_ready=True" in stdout
    assert "http: raw   version 1 answered" in stdout
    assert "http: unknown model -> 404" in stdout


def test_raw_requests_get_raw_answers_and_typed_requests_typed(
    served: Served, oip_stub, auth
) -> None:
    raw = oip_stub.ModelInfer(infer_request(served.name, served.images[:3]), metadata=auth)
    assert len(raw.raw_output_contents) == 1
    assert not raw.outputs[0].HasField("contents")
    from_raw = np.frombuffer(raw.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    request = oip.ModelInferRequest(model_name=served.name, id="req-7")
    request.inputs.add(
        name="input-0",
        datatype="FP32",
        shape=[3, 784],
        contents=oip.InferTensorContents(fp32_contents=served.images[:3].ravel().tolist()),
    )
    typed = oip_stub.ModelInfer(request, metadata=auth)
    assert (typed.id, typed.model_version, len(typed.raw_output_contents)) == ("req-7", "1", 0)
    assert (typed.outputs[0].name, typed.outputs[0].datatype, list(typed.outputs[0].shape)) == (
        "output-0",
        "FP32",
        [3, 10],
    )
    from_typed = np.array(typed.outputs[0].contents.fp32_contents, dtype=np.float32)
    np.testing.assert_array_equal(from_typed.reshape(3, 10), from_raw)


# -- errors ----------------------------------------------------------------------------------------


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_grpc_errors_name_the_problem(served: Served, oip_stub, auth) -> None:
    image = served.images[:1]
    cases: list[tuple[oip.ModelInferRequest, grpc.StatusCode, str]] = [
        (infer_request("no-such-model", image), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (infer_request(served.name, image, "999"), grpc.StatusCode.NOT_FOUND, "999"),
        (infer_request(served.name, image, "canary"), grpc.StatusCode.NOT_FOUND, "canary"),
        (infer_request(served.name, image, "0"), grpc.StatusCode.INVALID_ARGUMENT, "1 or more"),
        (infer_request("", image), grpc.StatusCode.INVALID_ARGUMENT, "model name is empty"),
    ]
    wrong = infer_request(served.name, image)
    wrong.inputs[0].datatype = "INT32"
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "datatype INT32; the model takes FP32"))
    wrong = infer_request(served.name, image)
    wrong.inputs[0].datatype = "COMPLEX"
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "'COMPLEX' is not a datatype"))
    wrong = infer_request(served.name, image)
    wrong.inputs[0].name = "image"
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "named 'image'; the model takes"))
    wrong = infer_request(served.name, image)
    wrong.raw_input_contents[0] = wrong.raw_input_contents[0][:-4]
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "3132 bytes"))
    wrong = infer_request(served.name, image)
    wrong.raw_input_contents.append(b"")
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "one per input"))
    wrong = infer_request(served.name, image)
    wrong.inputs[0].contents.fp32_contents.extend([0.0] * 784)
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "use one form"))
    wrong = infer_request(served.name, np.zeros((0, 784), dtype=np.float32))
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "is empty"))
    wrong = infer_request(served.name, np.zeros((300, 784), dtype=np.float32))
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "at most 256"))
    wrong = infer_request(served.name, image)
    wrong.outputs.add(name="logits")
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "the model's outputs are 'output-0'"))
    wrong = infer_request(served.name, image)
    wrong.outputs.add(name="output-0").parameters["classification"].int64_param = 3
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "classification extension"))
    wrong = oip.ModelInferRequest(model_name=served.name)
    typed = wrong.inputs.add(name="input-0", datatype="FP32", shape=[1, 784])
    typed.contents.int_contents.append(1)
    cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT, "contents.int_contents does not match"))
    for request, code, words in cases:
        got = _code(lambda r=request: oip_stub.ModelInfer(r, metadata=auth))
        assert got[0] == code and words in got[1], (request.model_name, code, words, got)
    nope = oip.ModelMetadataRequest(name="nope")
    got = _code(lambda: oip_stub.ModelMetadata(nope, metadata=auth))
    assert got[0] == grpc.StatusCode.NOT_FOUND
    # protected RPCs need the key; the health RPCs do not
    got = _code(lambda: oip_stub.ModelInfer(infer_request(served.name, image)))
    assert got[0] == grpc.StatusCode.UNAUTHENTICATED
    assert oip_stub.ServerLive(oip.ServerLiveRequest()).live is True
    assert _code(lambda: oip_stub.ServerMetadata(oip.ServerMetadataRequest()))[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    meta = oip_stub.ServerMetadata(oip.ServerMetadataRequest(), metadata=auth)
    assert (meta.name, list(meta.extensions)) == ("mlmesh", ["binary_tensor_data"])


def test_rest_errors_use_the_protocols_body(
    served: Served, rest: httpx.Client, rest_key: httpx.Client
) -> None:
    path = f"/v2/models/{served.name}/infer"
    good = {
        "inputs": [
            {"name": "input-0", "shape": [1, 784], "datatype": "FP32",
             "data": served.images[0].tolist()}
        ]
    }  # fmt: skip
    ok = rest_key.post(path, json=good)
    assert ok.status_code == 200, ok.text
    answer = ok.json()
    assert (answer["model_name"], answer["model_version"]) == (served.name, "1")
    assert answer["outputs"][0]["shape"] == [1, 10] and len(answer["outputs"][0]["data"]) == 10
    assert rest.post(path, json=good).status_code == 401  # protected
    nested = {"inputs": [{**good["inputs"][0], "data": [served.images[0].tolist()]}]}
    assert rest_key.post(path, json=nested).json()["outputs"] == answer["outputs"]

    def tensor(**changes: object) -> dict:
        return {"inputs": [{**good["inputs"][0], **changes}]}

    cases: list[tuple[str, object, int, str]] = [
        ("/v2/models/no-such-model/infer", good, 404, "no-such-model"),
        (f"/v2/models/{served.name}/versions/999/infer", good, 404, "999"),
        (path, tensor(datatype="FP64"), 400, "datatype FP64"),
        (path, tensor(shape=[1, 28, 28]), 400, "shape [1, 28, 28]"),
        (path, tensor(shape=[2, 784]), 400, "needs 1568"),
        (path, tensor(data=["a"] * 784), 400, "must hold FP32 values"),
        (path, tensor(data=[[0.0] * 784, [0.0]]), 400, "ragged"),
        (path, tensor(data=[True] * 784), 400, "must hold FP32 values"),
        (path, tensor(shape="784"), 400, "shape must be a list of integers"),
        (path, tensor(colour="red"), 400, "unknown key 'colour'"),
        (path, {"inputs": []}, 400, "non-empty list"),
        (path, {"inputs": "x"}, 400, "non-empty list"),
        (path, [1, 2], 400, "must be a JSON object"),
        (path, {**good, "extra": 1}, 400, "unknown key 'extra'"),
        (path, {**good, "outputs": [{"name": "logits"}]}, 400, "outputs are 'output-0'"),
    ]
    for route, body, status, words in cases:
        resp = rest_key.post(route, json=body)
        assert resp.status_code == status, (route, body, resp.text)
        assert words in resp.json()["error"], (words, resp.json())
    for raw, words in [(b"", "not valid JSON"), (b"{", "not valid JSON"), (b"\xff", "not valid")]:
        resp = rest_key.post(path, content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and words in resp.json()["error"], resp.text
    resp = rest_key.post(
        path, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "99"}
    )
    assert resp.status_code == 400 and "Inference-Header-Content-Length" in resp.json()["error"]
    resp = rest_key.get(f"/v2/models/{served.name}/versions/1/nonsense")
    assert resp.status_code == 404, resp.text
    meta = rest_key.get(f"/v2/models/{served.name}").json()
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 784]}]
    assert rest.get(f"/v2/models/{served.name}").status_code == 401
    assert rest_key.get("/v2").json()["name"] == "mlmesh"


# -- one data plane ------------------------------------------------------------------------------


def test_oip_and_predict_share_the_cache_and_the_metrics(
    mesh: Mesh, served: Served, oip_stub, gateway_channel: grpc.Channel, auth
) -> None:
    image = np.random.default_rng(secrets.randbits(32)).random((1, 784), dtype=np.float32)
    before = scrape(mesh)
    predict_answers(gateway_channel, auth, served.name, "1", image)  # a miss, then stored
    oip_stub.ModelInfer(infer_request(served.name, image, "1"), metadata=auth)  # a hit
    after = scrape(mesh)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("model_predictions_total", model_name=served.name, model_version="1") == 2
    assert delta("prediction_cache_hits_total", model_name=served.name) == 1
    assert delta("prediction_cache_misses_total", model_name=served.name) == 1
    assert delta("model_prediction_duration_seconds_count", method="ModelInfer") == 1
    assert (
        delta(
            "grpc_server_handled_total",
            grpc_service="inference.GRPCInferenceService",
            grpc_method="ModelInfer",
            grpc_code="OK",
        )
        == 1
    )
