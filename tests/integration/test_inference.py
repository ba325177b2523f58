"""The Inference service against the real mesh: two trained versions of one registered model,
promoted through the Registry, asked over gRPC and REST through Envoy."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlmesh.inference.v1 import inference_pb2 as pb
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.server import aio_service_channel, service_channel
from services.launcher.mesh import Mesh
from services.training.ml.data import load_dataset
from services.training.ml.models import Probabilities, build_model
from services.training.ml.train import TrainResult, train
from tests.conftest import free_port
from tests.conftest import metric_sample as metric
from tests.integration.replicas import PrivateRedisServer, inference_replica
from tests.integration.test_training_ml import a_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class Models:
    name: str
    v1: TrainResult
    v2: TrainResult
    images: np.ndarray  # the MNIST test split, (10000, 784) float32
    labels: np.ndarray


@pytest.fixture(scope="module")
def models(mesh: Mesh, keys: dict[str, str]) -> Models:
    """Two versions of one model (a CNN and an MLP); v1 holds production."""
    name = f"it-infer-{secrets.token_hex(3)}"
    v1 = train(a_spec(mesh, model_name=name, train_subset=3000), lambda _: None, lambda: False)
    v2 = train(
        a_spec(mesh, model_name=name, architecture="mlp", seed=7, train_subset=3000),
        lambda _: None,
        lambda: False,
    )
    assert (v1.model_version, v2.model_version) == (1, 2)
    promote(mesh, keys, name, 1)
    test = load_dataset("mnist").test
    return Models(name, v1, v2, test.images.numpy(), test.labels.numpy())


@pytest.fixture(scope="module")
def stub(gateway_channel: grpc.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def auth(keys: dict[str, str]) -> list[tuple[str, str]]:
    return [("x-api-key", keys["alice"])]


def promote(
    mesh: Mesh, keys: dict[str, str], name: str, version: int, stage: str = "production"
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.settings.gateway_port}") as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).TransitionModelVersion(
            # force: these tests move traffic between versions whatever their accuracy
            registry_pb2.TransitionModelVersionRequest(
                model_name=name, version=version, stage=stage, force=True
            ),
            metadata=[("x-api-key", keys["bob"])],
        )


def serving(stub: inference_pb2_grpc.InferenceServiceStub, auth, name: str, version: int) -> None:
    """Wait until production answers are ``version``'s (a promotion is applied in ~0.2 s)."""
    request = pb.PredictRequest(image=[0.0] * 784, model_name=name)
    deadline = time.monotonic() + 5
    while stub.Predict(request, metadata=auth).model_version != version:
        assert time.monotonic() < deadline, f"production never switched to v{version}"
        time.sleep(0.05)


def batch_request(images: np.ndarray, name: str, version: str = "") -> pb.PredictBatchRequest:
    return pb.PredictBatchRequest(
        images=[pb.Image(pixels=image.tolist()) for image in images],
        model_name=name,
        model_version=version,
    )


def random_image() -> np.ndarray:
    return np.random.default_rng(secrets.randbits(32)).random(784, dtype=np.float32)


def scrape(mesh: Mesh) -> str:
    return httpx.get(f"http://127.0.0.1:{mesh.settings.inference_ops_port}/metrics").text


# -- answers -------------------------------------------------------------------------------------


def test_predictions_equal_the_models_own_forward_pass(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth, mesh: Mesh
) -> None:
    images = models.images[:64]
    reply = stub.PredictBatch(batch_request(images, models.name, "1"), metadata=auth)
    assert (reply.model_name, reply.model_version) == (models.name, 1)
    served = np.array([list(p.probabilities) for p in reply.predictions], dtype=np.float32)
    uri = f"models:/{models.name}/1"
    mlflow.set_tracking_uri(mesh.settings.mlflow_tracking_uri)
    try:
        module = mlflow.pytorch.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    with torch.inference_mode():
        own = module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(served, own, atol=1e-5)
    assert [p.prediction for p in reply.predictions] == own.argmax(axis=1).tolist()
    for p, row in zip(reply.predictions, own, strict=True):
        assert p.confidence == pytest.approx(float(row.max()), abs=1e-5)


def test_accuracy_matches_the_accuracy_logged_at_training(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth
) -> None:
    predicted = []
    for start in range(0, len(models.images), 250):
        chunk = models.images[start : start + 250]
        reply = stub.PredictBatch(batch_request(chunk, models.name, "1"), metadata=auth)
        predicted += [p.prediction for p in reply.predictions]
    accuracy = float(np.mean(np.array(predicted) == models.labels))
    assert accuracy == pytest.approx(models.v1.metrics["test_accuracy"], abs=0.002)


def test_raw_bytes_are_the_same_image_as_floats(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth
) -> None:
    image = models.images[123]
    as_floats = stub.Predict(
        pb.PredictRequest(image=image.tolist(), model_name=models.name, model_version="1"),
        metadata=auth,
    )
    raw = np.rint(image * 255).astype(np.uint8).tobytes()
    as_raw = stub.Predict(
        pb.PredictRequest(image_raw=raw, model_name=models.name, model_version="1"), metadata=auth
    )
    assert as_raw.prediction == as_floats.prediction
    assert list(as_raw.probabilities) == list(as_floats.probabilities)
    assert as_raw.cached  # one canonical input, one cache entry


def test_production_is_the_default_and_versions_and_aliases_resolve(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth, mesh: Mesh
) -> None:
    image = models.images[0].tolist()

    def version_of(**fields: str) -> int:
        request = pb.PredictRequest(image=image, model_name=models.name, **fields)
        return stub.Predict(request, metadata=auth).model_version

    assert version_of() == 1
    assert version_of(model_version="production") == 1
    assert version_of(model_version="2") == 2
    with pytest.raises(grpc.RpcError) as missing_alias:
        version_of(model_version="staging")
    assert missing_alias.value.code() == grpc.StatusCode.NOT_FOUND
    assert "staging" in missing_alias.value.details()
    with pytest.raises(grpc.RpcError) as missing_version:
        version_of(model_version="99")
    assert missing_version.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as missing_model:
        stub.Predict(pb.PredictRequest(image=image, model_name="it-no-such-model"), metadata=auth)
    assert missing_model.value.code() == grpc.StatusCode.NOT_FOUND
    assert "it-no-such-model" in missing_model.value.details()

    empty = f"{models.name}-unpromoted"
    MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri).create_registered_model(empty)
    with pytest.raises(grpc.RpcError) as unpromoted:
        stub.Predict(pb.PredictRequest(image=image, model_name=empty), metadata=auth)
    assert unpromoted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "mlmesh promote" in unpromoted.value.details()


def test_rest_seed_route_and_v1_route(
    models: Models, rest: httpx.Client, keys: dict[str, str]
) -> None:
    body = {"image": models.images[7].tolist(), "modelName": models.name}
    assert rest.post("/predict", json=body).status_code == 401
    for path in ("/predict", "/v1/predict"):
        resp = rest.post(path, json=body, headers={"x-api-key": keys["alice"]})
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["prediction"] == int(models.labels[7])
        assert 0.5 < answer["confidence"] <= 1.0
        assert len(answer["probabilities"]) == 10
        assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert (answer["model_name"], answer["model_version"]) == (models.name, 1)
        assert isinstance(answer["cached"], bool)


def test_stream_answers_in_order(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth
) -> None:
    images = models.images[200:260]
    requests = [
        pb.PredictStreamRequest(
            request_id=f"r{i}", image=pb.Image(pixels=image.tolist()), model_name=models.name
        )
        for i, image in enumerate(images)
    ]
    answers = list(stub.PredictStream(iter(requests), metadata=auth))
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    batch = stub.PredictBatch(batch_request(images, models.name), metadata=auth)
    assert [a.prediction.prediction for a in answers] == [p.prediction for p in batch.predictions]
    assert {a.model_version for a in answers} == {1}


# -- invalid input --------------------------------------------------------------------------------

FLOATS = [0.5] * 784
INVALID = [
    # (RPC, gRPC request fields, REST path, REST body, words the message must hold)
    ("Predict", {"image": [0.5] * 783}, "/predict", {"image": [0.5] * 783}, "783 values"),
    ("Predict", {"image": []}, "/predict", {}, "image is empty"),
    ("Predict", {"image": [*FLOATS[:-1], float("nan")]}, "/predict",
     {"image": [*FLOATS[:-1], "NaN"]}, "image[783] is NaN"),
    ("Predict", {"image": [*FLOATS[:-1], 1.5]}, "/predict", {"image": [*FLOATS[:-1], 1.5]},
     "image[783] is 1.5"),
    ("Predict", {"image": [-0.25, *FLOATS[1:]]}, "/v1/predict", {"image": [-0.25, *FLOATS[1:]]},
     "image[0] is -0.25"),
    ("Predict", {"image_raw": b"\x00" * 10}, "/v1/predict", {"imageRaw": "AAAAAAAAAAAAAA=="},
     "image_raw has 10 bytes"),
    ("Predict", {"image": FLOATS, "image_raw": b"\x00" * 784}, "/predict",
     {"image": FLOATS, "imageRaw": "AA" * 100}, "not both"),
    ("Predict", {"image": FLOATS, "model_version": "-1"}, "/predict",
     {"image": FLOATS, "modelVersion": "0"}, "model_version must be 1 or more"),
    ("PredictBatch", {"images": []}, "/v1/predict:batch", {"images": []}, "images is empty"),
    ("PredictBatch", {"images": [pb.Image(raw=b"\x01" * 784)] * 257}, "/v1/predict:batch",
     {"images": [{"raw": "AQ=="}] * 257}, "257 images; at most 256"),
    ("PredictBatch", {"images": [pb.Image(pixels=FLOATS), pb.Image(pixels=[2.0] * 784)]},
     "/v1/predict:batch", {"images": [{"pixels": FLOATS}, {"pixels": [2.0] * 784}]},
     "images[1].pixels[0] is 2"),
]  # fmt: skip


@pytest.mark.parametrize(("rpc", "fields", "path", "body", "needle"), INVALID)
def test_invalid_input_is_invalid_argument_over_grpc_and_rest(
    models: Models,
    stub: inference_pb2_grpc.InferenceServiceStub,
    auth,
    rest: httpx.Client,
    keys: dict[str, str],
    rpc: str,
    fields: dict,
    path: str,
    body: dict,
    needle: str,
) -> None:
    request_type = pb.PredictRequest if rpc == "Predict" else pb.PredictBatchRequest
    with pytest.raises(grpc.RpcError) as failed:
        getattr(stub, rpc)(request_type(model_name=models.name, **fields), metadata=auth)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in failed.value.details()
    resp = rest.post(
        path, json={"modelName": models.name, **body}, headers={"x-api-key": keys["alice"]}
    )
    assert resp.status_code == 400, resp.text
    assert re.search(re.escape(needle.split(" is ")[0]), resp.json()["message"]), resp.text


# -- cache, batching, hot reload ------------------------------------------------------------------


def test_a_repeat_is_cached_and_a_promotion_is_not_served_stale(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth, mesh: Mesh, keys
) -> None:
    request = pb.PredictRequest(image=random_image().tolist(), model_name=models.name)
    first, again = stub.Predict(request, metadata=auth), stub.Predict(request, metadata=auth)
    assert (first.model_version, first.cached, again.cached) == (1, False, True)
    assert list(again.probabilities) == list(first.probabilities)
    fresh = stub.Predict(request, metadata=[*auth, ("cache-control", "no-cache")])
    assert not fresh.cached

    promote(mesh, keys, models.name, 2)
    try:
        serving(stub, auth, models.name, 2)
        after = stub.Predict(request, metadata=auth)
        assert (after.model_version, after.cached) == (2, False)  # v1's answer is not v2's
        assert stub.Predict(request, metadata=auth).cached
    finally:
        promote(mesh, keys, models.name, 1)
        serving(stub, auth, models.name, 1)


def test_promotion_while_requests_flow_fails_none_and_switches_within_2_s(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth, mesh: Mesh, keys
) -> None:
    answers: list[tuple[float, float, int]] = []  # (sent, answered, version)
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            request = pb.PredictRequest(image=random_image().tolist(), model_name=models.name)
            sent = time.monotonic()
            try:
                version = stub.Predict(request, metadata=auth, timeout=10).model_version
            except grpc.RpcError as exc:
                errors.append(exc)
            else:
                answers.append((sent, time.monotonic(), version))

    serving(stub, auth, models.name, 1)
    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        promoted_at = time.monotonic()
        promote(mesh, keys, models.name, 2)
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        promote(mesh, keys, models.name, 1)
        serving(stub, auth, models.name, 1)
    assert not errors, errors[:3]
    assert {v for _, done, v in answers if done < promoted_at} == {1}
    first_v2 = min(done for _, done, v in answers if v == 2)
    assert first_v2 - promoted_at < 2.0
    # Once v2 answered, requests sent afterwards are all v2's.
    assert {v for sent, _, v in answers if sent > first_v2} == {2}


def test_concurrent_requests_share_forward_passes(models: Models, mesh: Mesh) -> None:
    before = scrape(mesh)

    async def burst() -> list[pb.PredictResponse]:
        async with aio_service_channel(mesh.settings, mesh.settings.inference_address) as channel:
            direct = inference_pb2_grpc.InferenceServiceStub(channel)
            calls = [
                direct.Predict(
                    pb.PredictRequest(image=random_image().tolist(), model_name=models.name)
                )
                for _ in range(64)
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(burst())
    assert all(not r.cached for r in replies)
    after = scrape(mesh)
    passes = metric(after, "inference_batch_size_count") - metric(
        before, "inference_batch_size_count"
    )
    images = metric(after, "inference_batch_size_sum") - metric(before, "inference_batch_size_sum")
    assert images == 64
    assert passes < 64, "no two requests shared a forward pass"


def test_metrics_count_predictions_cache_and_drift(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth, mesh: Mesh
) -> None:
    # Fill v2's drift window (2000 images) with real test images: little drift.
    for start in range(0, 2000, 250):
        chunk = models.images[start : start + 250]
        stub.PredictBatch(batch_request(chunk, models.name, "2"), metadata=auth)
    text = scrape(mesh)
    labels = {"model_name": models.name, "model_version": "2"}
    assert metric(text, "model_input_drift_psi", **labels) < 0.1
    assert metric(text, "model_input_drift_window_images", **labels) == 2000
    # Inverted images (white background) are far from MNIST's intensities.
    for start in range(0, 2000, 250):
        chunk = 1.0 - models.images[start : start + 250]
        stub.PredictBatch(batch_request(chunk, models.name, "2"), metadata=auth)
    text = scrape(mesh)
    assert metric(text, "model_input_drift_psi", **labels) > 0.25
    assert metric(text, "model_predictions_total", **labels) >= 4000
    # The last chunk again: all 250 answers come from the cache.
    hits = metric(text, "prediction_cache_hits_total", model_name=models.name)
    stub.PredictBatch(batch_request(chunk, models.name, "2"), metadata=auth)
    stub.PredictBatch(batch_request(chunk[:1], models.name), metadata=auth)  # production's
    text = scrape(mesh)
    assert metric(text, "prediction_cache_hits_total", model_name=models.name) >= hits + 250
    assert metric(text, "prediction_cache_misses_total", model_name=models.name) > 0
    assert metric(text, "model_prediction_duration_seconds_count", method="PredictBatch") > 0
    assert metric(text, "model_alias_version", model_name=models.name, alias="production") == 1


# -- a Redis outage --------------------------------------------------------------------------


@pytest.fixture
def replica_on_private_redis(
    mesh: Mesh, models: Models
) -> Iterator[tuple[str, PrivateRedisServer]]:
    """A second inference replica whose cache is a private Redis, and that Redis."""
    redis = PrivateRedisServer()
    redis.start()
    settings = mesh.settings.model_copy(
        update={
            "redis_url": redis.url,
            "inference_address": f"127.0.0.1:{free_port()}",
            "inference_ops_port": free_port(),
            "inference_http_port": free_port(),
            "inference_health_port": free_port(),
        }
    )
    try:
        with inference_replica(settings, mesh.log_dir / "inference-private-redis.log"):
            yield settings.inference_address, redis
    finally:
        redis.stop()


def test_a_redis_outage_degrades_to_uncached_serving(
    models: Models, mesh: Mesh, replica_on_private_redis: tuple[str, PrivateRedisServer]
) -> None:
    address, redis = replica_on_private_redis
    with service_channel(mesh.settings, address) as channel:
        direct = inference_pb2_grpc.InferenceServiceStub(channel)

        def ask(image: np.ndarray) -> pb.PredictResponse:
            request = pb.PredictRequest(image=image.tolist(), model_name=models.name)
            return direct.Predict(request, timeout=10)

        image = random_image()
        assert [ask(image).cached, ask(image).cached] == [False, True]

        redis.stop()
        during = [ask(image) for _ in range(3)] + [ask(random_image()) for _ in range(3)]
        assert all(not r.cached for r in during)
        assert {r.model_version for r in during} == {1}

        redis.start()  # empty again: nothing survives a restart of this Redis
        again = random_image()
        deadline = time.monotonic() + 10
        while not ask(again).cached:
            assert time.monotonic() < deadline, "caching did not resume after Redis returned"
            time.sleep(0.2)


def test_a_model_registered_by_other_means_serves_on_torch_without_a_drift_score(
    models: Models, stub: inference_pb2_grpc.InferenceServiceStub, auth, mesh: Mesh
) -> None:
    # MLflow's pytorch flavor only: no ONNX export, no input_reference.json. Serving knows
    # nothing of training's datasets, so the version is served without a drift score.
    name = f"{models.name}-external"
    module = Probabilities(build_model("mlp", "images", (28, 28, 1), 10)).eval()
    mlflow.set_tracking_uri(mesh.settings.mlflow_tracking_uri)
    try:
        # An experiment of its own, named in start_run: set_experiment would leave it active
        # (and in MLFLOW_EXPERIMENT_ID) for every later test of this process.
        experiment_id = MlflowClient(mesh.settings.mlflow_tracking_uri).create_experiment(name)
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.log_param("dataset", "mnist")
            mlflow.pytorch.log_model(
                module,
                name="model",
                input_example=np.zeros((2, 784), np.float32),
                serialization_format="pt2",
                registered_model_name=name,
            )
    finally:
        mlflow.set_tracking_uri(None)
    images = models.images[:256]
    reply = stub.PredictBatch(batch_request(images, name, "1"), metadata=auth)
    with torch.inference_mode():
        own = module(torch.from_numpy(images)).numpy()
    served = np.array([list(p.probabilities) for p in reply.predictions], dtype=np.float32)
    np.testing.assert_allclose(served, own, atol=1e-5)
    text = scrape(mesh)
    loaded = {"model_name": name, "model_version": "1"}
    assert metric(text, "inference_models_loaded", **loaded, runtime="torch") == 1
    assert not [
        line
        for line in text.splitlines()
        if line.startswith("model_input_drift_psi{") and f'model_name="{name}"' in line
    ]
