"""Unknown JSON body fields are a 400 at the gateway (gateway/strict_json.lua).

The Lua filter is tested for real: the rendered Envoy runs on free ports in front of a tiny
in-process gRPC server that answers every mlmesh RPC with an empty message and records the
requests the transcoder made of the JSON.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.policy import SERVICE_CLUSTERS
from gateway.render import (
    Binding,
    Rpc,
    body_message,
    build_descriptor_set,
    mesh_rpcs,
    message_schemas,
    render_envoy_config,
    response_field,
    strict_json_lua,
    tool,
)
from mlmesh.inference.v1 import inference_pb2
from mlmesh.registry.v1 import registry_pb2
from mlmesh.training.v1 import training_pb2
from services.common.settings import Settings

KEY = "k" * 20
TRANSITION = "mlmesh.registry.v1.TransitionModelVersionRequest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Upstream:
    """Answers every mlmesh RPC with an empty message; keeps the raw requests by RPC path."""

    port: int = 0
    seen: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))


def _handlers(descriptor: Path, upstream: Upstream) -> grpc.GenericRpcHandler:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    kinds = {
        f"/{f.package}.{s.name}/{m.name}": (m.client_streaming, m.server_streaming)
        for f in fds.file
        if f.package.startswith("mlmesh.")
        for s in f.service
        for m in s.method
    }

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            path = details.method
            if path not in kinds:
                return None
            seen = upstream.seen[path]

            def unary(request: bytes, _: grpc.ServicerContext) -> bytes:
                seen.append(request)
                return b""

            def stream(requests: Iterator[bytes], _: grpc.ServicerContext) -> Iterator[bytes]:
                for request in requests:
                    seen.append(request)
                    yield b""

            def watch(request: bytes, _: grpc.ServicerContext) -> Iterator[bytes]:
                seen.append(request)
                return iter(())

            client_streaming, server_streaming = kinds[path]
            if client_streaming:
                return grpc.stream_stream_rpc_method_handler(stream)
            if server_streaming:
                return grpc.unary_stream_rpc_method_handler(watch)
            return grpc.unary_unary_rpc_method_handler(unary)

    return Handler()


@dataclass
class Gateway:
    client: httpx.Client
    upstream: Upstream
    url: str


def _start_envoy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [tool("envoy"), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_healthy(admin: int, envoy: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert envoy.poll() is None, log.read_text()[-3000:]
        try:
            clusters = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=1).text
        except httpx.TransportError:
            clusters = ""
        healthy = [
            line
            for line in clusters.splitlines()
            if "::health_flags::healthy" in line
            and line.split("::")[0] in SERVICE_CLUSTERS.values()
        ]
        if len(healthy) == len(set(SERVICE_CLUSTERS.values())):
            return
        time.sleep(0.1)
    raise AssertionError("Envoy's upstream clusters never became healthy")


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_descriptor_set(tmp_path_factory.mktemp("sj") / "mlmesh.binpb")


@contextmanager
def running_gateway(tmp: Path, descriptor: Path) -> Iterator[Gateway]:
    """The rendered Envoy on free ports in front of an Upstream, until the block ends."""
    upstream = Upstream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = health.HealthServicer()
    for service in SERVICE_CLUSTERS:
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_handlers(descriptor, upstream),))
    upstream.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{upstream.port}"
    settings = Settings(
        api_keys=f"alice={KEY}",
        api_keys_file=None,
        registry_address=address,
        training_address=address,
        inference_address=address,
        registry_ops_port=_free_port(),
        gateway_port=_free_port(),
        gateway_admin_port=_free_port(),
    )
    config = render_envoy_config(settings, descriptor, tmp / "envoy.yaml")
    log = tmp / "envoy.log"
    envoy = _start_envoy(config, log)
    try:
        _wait_healthy(settings.gateway_admin_port, envoy, log)
        with httpx.Client(
            base_url=settings.gateway_url, headers={"x-api-key": KEY}, timeout=10
        ) as client:
            yield Gateway(client, upstream, settings.gateway_url)
    finally:
        envoy.terminate()
        try:
            envoy.wait(10)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait()
        server.stop(0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, descriptor: Path) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gw"), descriptor) as gw:
        yield gw


def _post(gw: Gateway, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return gw.client.post(path, content=content, headers={"content-type": "application/json"})


def _last(gw: Gateway, rpc: str, message_type: type) -> object:
    return message_type.FromString(gw.upstream.seen[rpc][-1])


def _rejected(resp: httpx.Response, key: str, message: str) -> None:
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {
        "code": 3,
        "message": f'unknown field "{key}" in {message}',
        "details": [],
    }


# -- the rendered config -----------------------------------------------------------------------


def test_config_with_lua_filter_is_valid(tmp_path: Path, descriptor: Path) -> None:
    config = render_envoy_config(Settings(api_keys=f"alice={KEY}"), descriptor, tmp_path / "e.yaml")
    result = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = config.read_text()
    filters = ["header_mutation", "api_key_auth", "lua", "grpc_json_transcoder", "router"]
    positions = [text.index(f"- name: envoy.filters.http.{f}\n") for f in filters]
    assert positions == sorted(positions)
    assert f"envoy.filters.http.lua:\n                      message: {TRANSITION}\n" in text
    assert "response_body: job" in text  # the seed's /train and /train/status answer the job


def test_response_body_must_be_the_only_field(descriptor: Path) -> None:
    rpc = next(r for r in mesh_rpcs(descriptor) if r.method == "SubmitTrainingJob")
    seed = next(b for b in rpc.bindings if b.template == "/train")
    assert response_field(rpc, seed, descriptor) == "job"
    bad = Binding(seed.verb, seed.template, seed.body, "jobs")
    with pytest.raises(ValueError, match="only field"):
        response_field(rpc, bad, descriptor)


def test_schema_lists_proto_json_and_camel_names(descriptor: Path) -> None:
    schemas = message_schemas(descriptor, ["mlmesh.training.v1.SubmitTrainingJobRequest"])
    keys = schemas["mlmesh.training.v1.SubmitTrainingJobRequest"]
    assert {"learning_rate", "lr", "batch_size", "batchSize", "idempotencyKey"} <= set(keys)
    assert "job" not in keys
    batch = message_schemas(descriptor, ["mlmesh.inference.v1.PredictBatchRequest"])
    assert batch["mlmesh.inference.v1.PredictBatchRequest"]["images"] == (
        "message",
        "mlmesh.inference.v1.Image",
    )
    assert "mlmesh.inference.v1.Image" in batch
    # Maps of messages are followed into their values; well-known types are not entered.
    run = message_schemas(descriptor, ["mlmesh.registry.v1.Run"])
    assert run["mlmesh.registry.v1.Run"]["start_time"] == ("-", "")
    assert run["mlmesh.registry.v1.Run"]["metrics"] == ("message", "mlmesh.registry.v1.Metric")
    assert not any(name.startswith("google.") for name in run)
    lua = strict_json_lua(schemas)
    assert '["lr"] = true' in lua and "@SCHEMA@" not in lua


def test_body_naming_one_field_maps_to_that_fields_message(descriptor: Path) -> None:
    rpc = Rpc("s", "m", False, (), "mlmesh.inference.v1.PredictBatchRequest")
    assert body_message(rpc, Binding("POST", "/x", "images"), descriptor) == (
        "mlmesh.inference.v1.Image"
    )
    assert body_message(rpc, Binding("POST", "/x", "model_name"), descriptor) is None
    assert body_message(rpc, Binding("POST", "/x", "*"), descriptor) == rpc.input_type
    assert body_message(rpc, Binding("GET", "/x"), descriptor) is None


# -- the filter, through Envoy -----------------------------------------------------------------


def test_unknown_top_level_field_is_400(gateway: Gateway) -> None:
    body = {"model_name": "m", "version": 1, "stage": "Staging", "colour": 1}
    _rejected(_post(gateway, "/models/transition", body), "colour", TRANSITION)
    path = "/v1/models/m/versions/1:transition"
    _rejected(_post(gateway, path, {"stage": "Staging", "colour": 1}), "colour", TRANSITION)


def test_known_fields_reach_the_upstream(gateway: Gateway) -> None:
    rpc = "/mlmesh.registry.v1.RegistryService/TransitionModelVersion"
    body = {"modelName": "m", "version": 2, "stage": "Staging", "archive_existing_versions": True}
    resp = _post(gateway, "/models/transition", body)
    assert resp.status_code == 200, resp.text
    request = _last(gateway, rpc, registry_pb2.TransitionModelVersionRequest)
    assert (request.model_name, request.version, request.archive_existing_versions) == (
        "m",
        2,
        True,
    )


def test_unknown_nested_field_is_400(gateway: Gateway) -> None:
    image = {"pixels": [0.5] * 784}
    body = {"images": [image, {**image, "pixles": []}], "model_name": "m"}
    _rejected(_post(gateway, "/v1/predict:batch", body), "pixles", "mlmesh.inference.v1.Image")
    resp = _post(gateway, "/v1/predict:batch", {"images": [image, image]})
    assert resp.status_code == 200, resp.text


def test_proto_names_and_json_names_are_accepted(gateway: Gateway) -> None:
    rpc = "/mlmesh.training.v1.TrainingService/SubmitTrainingJob"
    for key in ("lr", "learning_rate"):
        resp = _post(gateway, "/train", {"epochs": 1, key: 0.25, "batchSize": 8})
        assert resp.status_code == 200, resp.text
        request = _last(gateway, rpc, training_pb2.SubmitTrainingJobRequest)
        assert (request.learning_rate, request.batch_size) == (0.25, 8)
    # With json_name = "lr" the transcoder would drop "learningRate": it is unknown.
    for key in ("learningRate", "learningrate"):
        _rejected(
            _post(gateway, "/train", {"epochs": 1, key: 0.25}),
            key,
            "mlmesh.training.v1.SubmitTrainingJobRequest",
        )


@pytest.mark.parametrize(
    ("bad", "good"),
    [
        ("{colour: 1, lr: 0.5}", "{epochs: 1, lr: 0.5}"),  # bare keys
        ("{'colour': 'x', 'lr': 0.5}", "{'dataset': 'x', 'lr': 0.5}"),  # single quotes
        ('{"lr": 0.5, "colour": 1,}', '{"lr": 0.5, "epochs": 1,}'),  # a trailing comma
        ('{"lr": 1., "colour": 1}', '{"lr": 1., "epochs": 1}'),  # "1."
        ('{"col\\our": 1}', '{"epo\\chs": 1}'),  # an unknown escape is its character
        ('{"dataset": "a\\x", "colour": 1}', '{"dataset": "a\\x", "seed": 1}'),
        ('{"seed": "7",\f\v"colour": 1}', '{"seed": "7",\f\v"epochs": 1}'),  # C blanks
    ],
)
def test_what_the_transcoder_takes_beyond_json_is_checked(
    gateway: Gateway, bad: str, good: str
) -> None:
    """The transcoder's parser takes more than JSON; unknown keys there are found too."""
    message = "mlmesh.training.v1.SubmitTrainingJobRequest"
    _rejected(_post(gateway, "/train", bad), "colour", message)
    resp = _post(gateway, "/train", good)
    assert resp.status_code == 200, resp.text


def test_trailing_comma_in_an_array(gateway: Gateway) -> None:
    text = '{"image": [0.5, 0.25,], "colour": 1}'
    _rejected(_post(gateway, "/predict", text), "colour", "mlmesh.inference.v1.PredictRequest")
    resp = _post(gateway, "/predict", text.replace('"colour": 1', '"model_name": "m"'))
    assert resp.status_code == 200, resp.text


def test_predict_hot_path(gateway: Gateway) -> None:
    rpc = "/mlmesh.inference.v1.InferenceService/Predict"
    pixels = [round(i / 784, 6) for i in range(784)]
    pixels[3] = -1.5e-3
    resp = _post(gateway, "/predict", {"image": pixels, "model_version": "3"})
    assert resp.status_code == 200, resp.text
    request = _last(gateway, rpc, inference_pb2.PredictRequest)
    assert len(request.image) == 784 and request.model_version == "3"
    # Whitespace of any kind between the numbers, and an unknown key after them.
    text = '{ "image" : [ 0.1 ,\n 2E+3,-0 , 1e-9 ] , "model_version":"3", "extra" : [1, 2] }'
    _rejected(_post(gateway, "/v1/predict", text), "extra", "mlmesh.inference.v1.PredictRequest")


def test_array_body_is_checked_per_element(gateway: Gateway) -> None:
    rpc = "/mlmesh.inference.v1.InferenceService/PredictStream"
    image = {"pixels": [0.0] * 784}
    good = [{"request_id": "a", "image": image}, {"requestId": "b", "image": image}]
    resp = _post(gateway, "/v1/predict:stream", good)
    assert resp.status_code == 200, resp.text
    ids = [
        inference_pb2.PredictStreamRequest.FromString(r).request_id
        for r in gateway.upstream.seen[rpc][-2:]
    ]
    assert ids == ["a", "b"]
    bad = [*good, {"request_id": "c", "image": {**image, "colour": 1}}]
    _rejected(_post(gateway, "/v1/predict:stream", bad), "colour", "mlmesh.inference.v1.Image")
    bad = [*good, {"request_id": "c", "colour": 1}]
    _rejected(
        _post(gateway, "/v1/predict:stream", bad),
        "colour",
        "mlmesh.inference.v1.PredictStreamRequest",
    )


def test_escaped_keys_are_decoded(gateway: Gateway) -> None:
    resp = _post(gateway, "/train", '{"learning\\u005frate": 0.5, "s\\u00e9ed\\"": 1}')
    assert resp.status_code == 400
    assert resp.json()["message"] == (
        'unknown field "s\u00e9ed"" in mlmesh.training.v1.SubmitTrainingJobRequest'
    )
    resp = _post(gateway, "/train", '{"learning\\u005frate": 0.5, "\\ud83d\\ude00": 1}')
    assert resp.json()["message"].startswith('unknown field "\U0001f600"')


def test_malformed_json_is_left_to_the_transcoder(gateway: Gateway) -> None:
    for text in ('{"colour": 1', '{"colour": [1, 2}', '{"colour": tru}', "[1, 2] x"):
        resp = _post(gateway, "/models/transition", text)
        assert resp.status_code == 400, text
        assert "unknown field" not in resp.text, text


def test_deep_nesting_is_400(gateway: Gateway) -> None:
    deep = '{"model_name": ' + "[" * 40 + "]" * 40 + "}"
    resp = _post(gateway, "/models/transition", deep)
    assert resp.status_code == 400
    assert resp.json() == {
        "code": 3,
        "message": "JSON body nests deeper than 32 levels",
        "details": [],
    }


def test_requests_without_checked_body_pass(gateway: Gateway) -> None:
    assert gateway.client.get("/v1/models/m").status_code == 200
    assert gateway.client.get("/v1/training/jobs/x:watch").status_code == 200
    resp = gateway.client.post("/v1/training/jobs/x:cancel")
    assert resp.status_code == 200, resp.text
    # Public REST routes stay public, protected ones still need a key.
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 200
    assert httpx.post(f"{gateway.url}/train", json={}).status_code == 401
