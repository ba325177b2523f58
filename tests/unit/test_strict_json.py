"""REST bodies that are not strict JSON (RFC 8259), or have keys their message lacks, are a
400 at the gateway (gateway/strict_json.lua); every reply Envoy makes itself is in the
services' JSON error shape (local_reply_config, gateway/render.py).

The Lua filter is tested for real: the rendered Envoy runs on free ports in front of a tiny
in-process gRPC server that answers every mlmesh RPC with an empty message (SubmitTrainingJob
with a job, so that /train's response_body has something to unwrap) and records the requests
the transcoder made of the JSON.
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
from gateway.tls import ensure_mesh_certificates
from mlmesh.inference.v1 import inference_pb2
from mlmesh.registry.v1 import registry_pb2
from mlmesh.training.v1 import training_pb2
from services.common.settings import MeshTlsFiles, Settings

KEY = "k" * 20
TRANSITION = "mlmesh.registry.v1.TransitionModelVersionRequest"
SUBMIT = "/mlmesh.training.v1.TrainingService/SubmitTrainingJob"
SUBMIT_REQUEST = "mlmesh.training.v1.SubmitTrainingJobRequest"
JOB = training_pb2.TrainingJob(job_id="job-1", dataset="mnist")


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

    answers = {SUBMIT: training_pb2.SubmitTrainingJobResponse(job=JOB).SerializeToString()}

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            path = details.method
            if path not in kinds:
                return None
            seen = upstream.seen[path]

            def unary(request: bytes, _: grpc.ServicerContext) -> bytes:
                seen.append(request)
                return answers.get(path, b"")

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
    log: Path


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
    """The rendered Envoy on free ports in front of an Upstream, until the block ends; the
    upstream takes the gateway's mutual TLS, as the services do."""
    upstream = Upstream()
    mesh_tls = MeshTlsFiles(tmp / "mtls")
    ensure_mesh_certificates(mesh_tls)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = health.HealthServicer()
    for service in SERVICE_CLUSTERS:
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_handlers(descriptor, upstream),))
    credentials = grpc.ssl_server_credentials(
        [(mesh_tls.service_key.read_bytes(), mesh_tls.service_cert.read_bytes())],
        root_certificates=mesh_tls.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    upstream.port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    address = f"127.0.0.1:{upstream.port}"
    settings = Settings(
        api_keys=f"alice={KEY}",
        api_keys_file=None,
        registry_address=address,
        training_address=address,
        inference_address=address,
        inference_processes=1,  # the one upstream stands for every service
        registry_ops_port=_free_port(),
        gateway_port=_free_port(),
        gateway_admin_port=_free_port(),
        gateway_mlflow_port=_free_port(),
        mtls_dir=mesh_tls.directory,
    )
    config = render_envoy_config(settings, descriptor, tmp / "envoy.yaml")
    log = tmp / "envoy.log"
    envoy = _start_envoy(config, log)
    try:
        _wait_healthy(settings.gateway_admin_port, envoy, log)
        with httpx.Client(
            base_url=settings.gateway_url, headers={"x-api-key": KEY}, timeout=10
        ) as client:
            yield Gateway(client, upstream, settings.gateway_url, log)
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
    settings = Settings(api_keys=f"alice={KEY}", state_dir=tmp_path)
    ensure_mesh_certificates(settings.mesh_tls)
    config = render_envoy_config(settings, descriptor, tmp_path / "e.yaml")
    result = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = config.read_text()
    filters = ["header_mutation", "api_key_auth", "lua", "grpc_json_transcoder", "router"]
    positions = [text.index(f"- name: envoy.filters.http.{f}\n") for f in filters]
    assert positions == sorted(positions)
    assert f'envoy.filters.http.lua:\n                      message: "{TRANSITION}"\n' in text
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
        "images",
    )
    assert "mlmesh.inference.v1.Image" in batch
    # Maps of messages are followed into their values; well-known types are not entered.
    run = message_schemas(descriptor, ["mlmesh.registry.v1.Run"])
    assert run["mlmesh.registry.v1.Run"]["start_time"] == ("-", "", "start_time")
    assert run["mlmesh.registry.v1.Run"]["metrics"] == (
        "message",
        "mlmesh.registry.v1.Metric",
        "metrics",
    )
    assert not any(name.startswith("google.") for name in run)
    # Both names of a field name the one field: giving both is a duplicate.
    assert keys["lr"].field == keys["learning_rate"].field == "learning_rate"
    lua = strict_json_lua(schemas)
    assert '["lr"] = true' in lua and '["lr"] = "learning_rate"' in lua
    assert "@SCHEMA@" not in lua


def test_body_naming_one_field_maps_to_that_fields_message(descriptor: Path) -> None:
    rpc = Rpc("s", "m", False, (), "mlmesh.inference.v1.PredictBatchRequest")
    assert body_message(rpc, Binding("POST", "/x", "images"), descriptor) == (
        "mlmesh.inference.v1.Image"
    )
    # A body naming a scalar field is JSON all the same: checked as such, with no keys.
    assert body_message(rpc, Binding("POST", "/x", "model_name"), descriptor) == ""
    assert body_message(rpc, Binding("POST", "/x", "*"), descriptor) == rpc.input_type
    assert body_message(rpc, Binding("GET", "/x"), descriptor) is None


# -- the filter, through Envoy -----------------------------------------------------------------


def _post(
    gw: Gateway, path: str, body: object, content_type: str = "application/json"
) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return gw.client.post(path, content=content, headers={"content-type": content_type})


def _last(gw: Gateway, rpc: str, message_type: type) -> object:
    return message_type.FromString(gw.upstream.seen[rpc][-1])


def error_message(resp: httpx.Response, status: int, code: int) -> str:
    """The message of an error answer, checked to be the JSON error envelope with ``code``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body == {"code": code, "message": body["message"], "details": []}
    return body["message"]


def _rejected(resp: httpx.Response, key: str, message: str) -> None:
    assert error_message(resp, 400, 3) == f'unknown field "{key}" in {message}'


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
    for key in ("lr", "learning_rate"):
        resp = _post(gateway, "/train", {"epochs": 1, key: 0.25, "batchSize": 8})
        assert resp.status_code == 200, resp.text
        request = _last(gateway, SUBMIT, training_pb2.SubmitTrainingJobRequest)
        assert (request.learning_rate, request.batch_size) == (0.25, 8)
    # With json_name = "lr" the transcoder would drop "learningRate": it is unknown.
    for key in ("learningRate", "learningrate"):
        _rejected(_post(gateway, "/train", {"epochs": 1, key: 0.25}), key, SUBMIT_REQUEST)


# Bodies that are not RFC 8259 JSON, each with the line, column and expectation its 400 names.
# The transcoder's own parser takes many of them (single quotes, bare keys, trailing commas,
# "1.", unknown escapes, \f and \v as blanks), and took {'epochs': 1} as a training job.
NOT_JSON = [
    ("{'epochs': 1}", 1, 2, "a key in double quotes"),
    ("{epochs: 1}", 1, 2, "a key in double quotes"),
    ('{"epochs": 1,}', 1, 14, "another key after the comma (JSON has no trailing commas)"),
    ('{"seed": [1, 2,]}', 1, 16, "another value after the comma (JSON has no trailing commas)"),
    ("{\"dataset\": 'mnist'}", 1, 13, "a value"),
    ('{"lr": 01}', 1, 8, "a number without leading zeros"),
    ('{"lr": +1}', 1, 8, "a value"),
    ('{"lr": .5}', 1, 8, "a value"),
    ('{"lr": 1.}', 1, 8, "a digit after the decimal point"),
    ('{"lr": 1e}', 1, 8, "a digit in the exponent"),
    ('{"lr": -}', 1, 8, "a digit after the minus sign"),
    ('{"lr": 0x10}', 1, 8, "a decimal number"),
    ('{"lr": 1.5.2}', 1, 8, "a decimal number"),
    ('{"lr": NaN}', 1, 8, "a value (NaN and Infinity are no JSON numbers"),
    ('{"lr": Infinity}', 1, 8, "a value (NaN and Infinity are no JSON numbers"),
    ('{"lr": -Infinity}', 1, 8, "a digit after the minus sign"),
    ('{"epochs": tru}', 1, 12, "a value"),
    ('{"epochs": True}', 1, 12, "a value"),
    ('{"dataset": "mn\tist"}', 1, 16, "an escape for a control character in a string"),
    ('{"dataset": "mn\x00ist"}', 1, 16, "an escape for a control character in a string"),
    ('{"dataset": "a\\x"}', 1, 15, "one of the escapes"),
    ('{"dataset": "a\\u12"}', 1, 15, "four hexadecimal digits after \\u"),
    ('{"dataset": "\\ud800"}', 1, 14, "\\uDC00-\\uDFFF after \\uD800-\\uDBFF"),
    ('{"dataset": "\\ud800\\u0041"}', 1, 14, "\\uDC00-\\uDFFF after \\uD800-\\uDBFF"),
    ('{"dataset": "\\udc00"}', 1, 14, "\\uD800-\\uDBFF before \\uDC00-\\uDFFF"),
    ('{"dataset": "mnist}', 1, 13, "a closing quote for this string"),
    ('{"epochs" 1}', 1, 11, "a colon after the key"),
    ('{"epochs": 1', 1, 13, "a comma or } after the value"),
    ('{"seed": [1 2]}', 1, 13, "a comma or ] after the value"),
    ('{"epochs": 1} x', 1, 15, "the end of the body after the value"),
    ("{}{}", 1, 3, "the end of the body after the value"),
    ("   \n ", 2, 2, "a value (the body is only whitespace)"),
    ("\ufeff{}", 1, 1, "a value"),  # a byte order mark
    ('{"epochs":\f1}', 1, 11, "a value"),  # \f is no JSON whitespace
    ('{\n  "epochs": 1,\n  "lr": 1.\n}', 3, 9, "a digit after the decimal point"),
    (b'{"dataset": "\xff"}', 1, 14, "UTF-8 text"),
    (b'{"dataset": "\xc0\xaf"}', 1, 14, "UTF-8 text"),  # an overlong "/"
    (b'{"dataset": "\xed\xa0\x80"}', 1, 14, "UTF-8 text"),  # a surrogate, encoded
    (b'{"dataset": "\xe2\x82"}', 1, 14, "UTF-8 text"),  # cut short
    (b'{"dataset": "\xf4\x90\x80\x80"}', 1, 14, "UTF-8 text"),  # above U+10FFFF
    (b"{\xff: 1}", 1, 2, "a key in double quotes"),
]


@pytest.mark.parametrize(("body", "line", "column", "expected"), NOT_JSON, ids=repr)
def test_what_is_not_json_is_400_naming_where(
    gateway: Gateway, body: str | bytes, line: int, column: int, expected: str
) -> None:
    sent = len(gateway.upstream.seen[SUBMIT])
    message = error_message(_post(gateway, "/train", body), 400, 3)
    assert message.startswith(f"invalid JSON at line {line}, column {column}: expected {expected}")
    assert ", found " in message
    assert len(gateway.upstream.seen[SUBMIT]) == sent, "the body reached the service"


def test_the_400_quotes_what_it_found(gateway: Gateway) -> None:
    message = error_message(_post(gateway, "/train", "{'epochs': 1}"), 400, 3)
    assert message == (
        "invalid JSON at line 1, column 2: expected a key in double quotes, found \"'epochs': 1}\""
    )
    message = error_message(_post(gateway, "/train", '{"epochs": 1'), 400, 3)
    assert message.endswith("found the end of the body")
    message = error_message(_post(gateway, "/train", b'{"dataset": "\x01"}'), 400, 3)
    assert message.endswith("found the control character U+0001")
    # The quote stops before what is not UTF-8.
    message = error_message(_post(gateway, "/train", b"{'\xc3\xa9\xff'}"), 400, 3)
    assert message.endswith('found "\'\u00e9..."')
    long = '{"dataset": ' + "x" * 100 + "}"
    assert error_message(_post(gateway, "/train", long), 400, 3).endswith(
        'found "xxxxxxxxxxxxxxxx..."'
    )


def test_every_json_body_route_is_strict(gateway: Gateway) -> None:
    """Not only /train: every REST route with a body, seed and /v1, whatever the content-type
    (curl -d sends application/x-www-form-urlencoded)."""
    for path in ("/predict", "/v1/predict", "/models/transition", "/v1/training/jobs",
                 "/v1/training/sweeps", "/v1/models/m/versions/1:transition"):  # fmt: skip
        message = error_message(_post(gateway, path, "{'model_name': 'm'}"), 400, 3)
        assert message.startswith("invalid JSON at line 1, column 2:"), path
    form = "application/x-www-form-urlencoded"
    assert error_message(_post(gateway, "/train", "{epochs: 1}", form), 400, 3).startswith(
        "invalid JSON at line 1, column 2:"
    )
    assert _post(gateway, "/train", '{"epochs": 1}', form).status_code == 200
    stream = '[{"request_id": "a"}, {"request_id": "b",}]'
    message = error_message(_post(gateway, "/v1/predict:stream", stream), 400, 3)
    assert message.startswith("invalid JSON at line 1, column 42:")


def test_strict_json_reaches_the_upstream_as_sent(gateway: Gateway) -> None:
    text = (
        ' {\t"dataset" :\r\n"a\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00 \u00e9\U0001f600",'
        ' "lr": -2.5E-3, "epochs": 1, "seed": 0, "batch_size": 1e2, "optimizer": "" }\n'
    )
    resp = _post(gateway, "/train", text.encode())
    assert resp.status_code == 200, resp.text
    request = _last(gateway, SUBMIT, training_pb2.SubmitTrainingJobRequest)
    assert request.dataset == 'a"\\/\b\f\n\r\t\u00e9\U0001f600 \u00e9\U0001f600'
    assert (request.learning_rate, request.epochs, request.seed) == (-0.0025, 1, 0)
    assert request.batch_size == 100
    # A float field takes "NaN" and "Infinity" as strings (the protobuf JSON mapping).
    assert _post(gateway, "/train", '{"lr": "NaN"}').status_code == 200


def test_an_empty_body_is_the_empty_message(gateway: Gateway) -> None:
    """No bytes at all is no body, as for gRPC-gateway: the transcoder sends the empty
    message (a POST without -d works); whitespace alone is not JSON (NOT_JSON above)."""
    sent = len(gateway.upstream.seen[SUBMIT])
    resp = gateway.client.post("/train")
    assert resp.status_code == 200, resp.text
    assert gateway.upstream.seen[SUBMIT][sent:] == [b""]


TWICE = "given twice in one object at line 1, column"
GIVEN_TWICE = [
    ("/train", '{"epochs": 1, "epochs": 2}', f'key "epochs" {TWICE} 15'),
    ("/train", '{"epochs": 1, "epoch\\u0073": 2}', f'key "epochs" {TWICE} 15'),
    (
        "/train",
        '{"lr": 0.1, "learning_rate": 0.2}',
        'field learning_rate given twice in one object (as "lr" and "learning_rate") '
        "at line 1, column 13",
    ),
    ("/v1/predict:batch", '{"images": [{"pixels": [], "pixels": []}]}', f'key "pixels" {TWICE} 28'),
    ("/v1/training/sweeps", '{"search_space": {"lr": {}, "lr": {}}}', f'key "lr" {TWICE} 29'),
]


@pytest.mark.parametrize(("path", "body", "expected"), GIVEN_TWICE)
def test_a_key_given_twice_is_400(gateway: Gateway, path: str, body: str, expected: str) -> None:
    """RFC 8259 leaves which of two equal keys wins to the parser: the gateway refuses them,
    and a field given under both its names ("lr" and "learning_rate") too."""
    assert error_message(_post(gateway, path, body), 400, 3) == expected


def test_the_same_key_in_two_objects_is_no_duplicate(gateway: Gateway) -> None:
    body = '{"images": [{"pixels": [0.5]}, {"pixels": [0.5]}]}'
    assert _post(gateway, "/v1/predict:batch", body).status_code == 200


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
    assert error_message(resp, 400, 3) == (
        'unknown field "s\u00e9ed"" in mlmesh.training.v1.SubmitTrainingJobRequest'
    )
    resp = _post(gateway, "/train", '{"learning\\u005frate": 0.5, "\\ud83d\\ude00": 1}')
    assert resp.json()["message"].startswith('unknown field "\U0001f600"')


def test_deep_nesting_is_400(gateway: Gateway) -> None:
    deep = '{"model_name": ' + "[" * 40 + "]" * 40 + "}"
    resp = _post(gateway, "/models/transition", deep)
    assert error_message(resp, 400, 3) == "JSON nested deeper than 32 levels at line 1, column 47"


def test_requests_without_checked_body_pass(gateway: Gateway) -> None:
    assert gateway.client.get("/v1/models/m").status_code == 200
    assert gateway.client.get("/v1/training/jobs/x:watch").status_code == 200
    resp = gateway.client.post("/v1/training/jobs/x:cancel")
    assert resp.status_code == 200, resp.text
    # Public REST routes stay public, protected ones still need a key.
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 200
    assert httpx.post(f"{gateway.url}/train", json={}).status_code == 401


def test_train_answers_the_job_without_a_lua_error(gateway: Gateway) -> None:
    """/train's response_body: the transcoder's {"job": X} answered as X. The filter once
    touched the response headers after reading the body, which Envoy refuses ("object used
    outside of proper scope", logged on every /train)."""
    resp = _post(gateway, "/train", {"epochs": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["job_id"] == JOB.job_id and resp.json()["dataset"] == "mnist"
    assert int(resp.headers["content-length"]) == len(resp.content)
    v1 = _post(gateway, "/v1/training/jobs", {"epochs": 1})
    assert v1.json()["job"]["job_id"] == JOB.job_id  # /v1 keeps the response message
    time.sleep(0.2)  # Envoy writes its log as it goes
    assert "[lua]" not in gateway.log.read_text()


# -- replies Envoy makes itself ----------------------------------------------------------------


def test_errors_envoy_answers_itself_are_json(gateway: Gateway) -> None:
    unauthenticated = "missing or invalid API key: send it in the x-api-key header"
    assert error_message(httpx.post(f"{gateway.url}/train", json={}), 401, 16) == unauthenticated
    wrong = httpx.post(f"{gateway.url}/train", json={}, headers={"x-api-key": "w" * 20})
    assert error_message(wrong, 401, 16) == unauthenticated
    transcoder = _post(gateway, "/v1/training/jobs", {"epochs": "three"})
    assert error_message(transcoder, 400, 3) == 'epochs: invalid value "three" for type TYPE_INT32'
    query = gateway.client.get("/v1/models/m", params={"colour": "red"})
    assert '"colour"' in error_message(query, 400, 3)
    not_found = gateway.client.get("/v1/nothing-here")
    assert error_message(not_found, 404, 5) == "no such route; see the README for the API"
    # The Open Inference Protocol's REST face answers in its protocol's shape.
    oip = httpx.get(f"{gateway.url}/v2/models/m")
    assert oip.status_code == 401 and oip.headers["content-type"] == "application/json"
    assert oip.json() == {"error": unauthenticated}
    # A reply that is not an error is left alone.
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "healthy"}


def test_grpc_callers_get_grpc_statuses_with_text(gateway: Gateway) -> None:
    """Envoy turns a local reply to a gRPC request into grpc-status and grpc-message: the
    message is text, not the REST envelope."""
    target = gateway.url.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/mlmesh.training.v1.TrainingService/ListTrainingJobs",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as denied:
            call(b"", timeout=10)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert denied.value.details() == (
            "missing or invalid API key: send it in the x-api-key metadata"
        )
        nowhere = channel.unary_unary(
            "/mlmesh.training.v1.TrainingService/NoSuchMethod",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as missing:
            nowhere(b"", metadata=[("x-api-key", KEY)], timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert missing.value.details() == "no such route; see the README for the API"
