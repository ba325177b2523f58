"""The gateway's promises: every RPC classified and enforced over REST and gRPC, tools work."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.keys import API_KEY_HEADER
from gateway.render import NOT_RUNNING, build_descriptor_set, render_envoy_config, tool
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from mlmesh.training.v1 import training_pb2, training_pb2_grpc
from services.common.settings import MESH_SERVICE_NAME
from services.launcher.mesh import Mesh
from tests.conftest import cancel_live_jobs, isolated_settings
from tests.unit.test_strict_json import error_message

DESCRIPTOR = build_descriptor_set(Path(__file__).parents[2] / "gateway" / "build" / "mlmesh.binpb")


# The auth matrix of every RPC over gRPC and REST is tests/integration/test_auth_matrix.py.


def test_services_not_running_answer_unavailable(tmp_path: Path) -> None:
    # The gateway alone: nothing listens at any service address.
    settings = isolated_settings(tmp_path, api_keys="alice=" + "k" * 24)
    config = render_envoy_config(settings, DESCRIPTOR, tmp_path / "envoy.yaml")
    envoy = subprocess.Popen(
        [tool("envoy"), "-c", str(config), "--log-level", "error", "--use-dynamic-base-id"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = httpx.post(
                    f"{settings.gateway_url}/predict",
                    json={"image": [0.0] * 784},
                    headers={"x-api-key": "k" * 24},
                )
                break
            except httpx.TransportError:
                assert envoy.poll() is None and time.monotonic() < deadline, "envoy did not start"
                time.sleep(0.2)
        assert error_message(resp, 503, grpc.StatusCode.UNAVAILABLE.value[0]) == NOT_RUNNING
        # The Open Inference Protocol's REST face, in its protocol's shape.
        oip = httpx.get(f"{settings.gateway_url}/v2/health/live")
        assert oip.status_code == 503 and oip.headers["content-type"] == "application/json"
        assert oip.json() == {"error": NOT_RUNNING}
        # gRPC: UNAVAILABLE, the message as text.
        address = f"{settings.gateway_host}:{settings.gateway_port}"
        with grpc.insecure_channel(address) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                registry.ListExperiments(registry_pb2.ListExperimentsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == NOT_RUNNING
    finally:
        envoy.terminate()
        envoy.wait(10)


def test_unknown_route_is_404_with_a_key(rest: httpx.Client, keys: dict[str, str]) -> None:
    error_message(rest.get("/v1/nothing-here"), 401, 16)
    resp = rest.get("/v1/nothing-here", headers={"x-api-key": keys["alice"]})
    assert error_message(resp, 404, 5) == "no such route; see the README for the API"


def test_admin_is_loopback_only(mesh: Mesh) -> None:
    listeners = httpx.get(
        f"http://127.0.0.1:{mesh.settings.gateway_admin_port}/listeners?format=json"
    ).json()
    assert listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"] == (
        mesh.settings.gateway_port
    )
    config = (mesh.settings.state_dir / "envoy.yaml").read_text()
    assert re.search(r"admin:\s+address:\s+socket_address: \{address: 127\.0\.0\.1", config)


# -- grpcurl, the real binary ------------------------------------------------------------------


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_through_gateway_with_descriptor_set(mesh: Mesh, keys: dict[str, str]) -> None:
    target = f"127.0.0.1:{mesh.settings.gateway_port}"
    listed = _grpcurl("-plaintext", "-protoset", str(DESCRIPTOR), target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {
        "mlmesh.registry.v1.RegistryService",
        "mlmesh.training.v1.TrainingService",
        "mlmesh.inference.v1.InferenceService",
    } <= set(listed.stdout.split())
    called = _grpcurl(
        "-plaintext",
        "-protoset",
        str(DESCRIPTOR),
        "-d",
        '{"page_size": 5}',
        target,
        "mlmesh.registry.v1.RegistryService/ListExperiments",
    )
    assert called.returncode == 0, called.stderr
    assert "experiments" in json.loads(called.stdout)
    denied = _grpcurl(
        "-plaintext",
        "-protoset",
        str(DESCRIPTOR),
        target,
        "mlmesh.registry.v1.RegistryService/ListAuditEvents",
    )
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    allowed = _grpcurl(
        "-plaintext",
        "-protoset",
        str(DESCRIPTOR),
        "-H",
        f"x-api-key: {keys['bob']}",
        target,
        "mlmesh.registry.v1.RegistryService/ListAuditEvents",
    )
    assert allowed.returncode == 0, allowed.stderr


def test_grpcurl_via_reflection(mesh: Mesh) -> None:
    # A service directly: over mutual TLS with the mesh's certificates.
    s = mesh.settings
    files = s.mesh_tls
    mtls = ["-cacert", str(files.ca_cert), "-cert", str(files.service_cert), "-key",
            str(files.service_key), "-servername", MESH_SERVICE_NAME]  # fmt: skip
    target = s.registry_address
    listed = _grpcurl(*mtls, target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "mlmesh.registry.v1.RegistryService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = _grpcurl(*mtls, target, "describe", "mlmesh.registry.v1.RegistryService")
    assert "TransitionModelVersion" in described.stdout
    # Without the certificates: nothing on the service port; health (and reflection, which
    # grpcurl needs to ask) on the health port, and no call of the service.
    assert _grpcurl("-plaintext", target, "list").returncode != 0
    health_port = s.health_address(target)
    health = _grpcurl("-plaintext", health_port, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}
    refused = _grpcurl(
        "-plaintext", health_port, "mlmesh.registry.v1.RegistryService/ListExperiments"
    )
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr


def test_unknown_json_fields_are_400_after_the_key_check(
    rest: httpx.Client, keys: dict[str, str]
) -> None:
    body = {"epochs": 1, "lr": 0.01, "colour": "red"}
    assert rest.post("/train", json=body).status_code == 401
    resp = rest.post("/train", json=body, headers={"x-api-key": keys["alice"]})
    assert resp.status_code == 400
    assert resp.json() == {
        "code": 3,
        "message": 'unknown field "colour" in mlmesh.training.v1.SubmitTrainingJobRequest',
        "details": [],
    }
    batch = {"images": [{"pixels": [0.0] * 784, "pixel": []}]}
    resp = rest.post("/v1/predict:batch", json=batch, headers={"x-api-key": keys["alice"]})
    assert resp.status_code == 400
    assert resp.json()["message"] == 'unknown field "pixel" in mlmesh.inference.v1.Image'


# -- what a REST caller gets wrong: JSON answers, nothing queued --------------------------------


@pytest.fixture(scope="module")
def alice(keys: dict[str, str]) -> list[tuple[str, str]]:
    return [(API_KEY_HEADER, keys["alice"])]


@pytest.fixture(scope="module", autouse=True)
def leave_no_job_running(mesh: Mesh, alice: list[tuple[str, str]]) -> Iterator[None]:
    yield
    cancel_live_jobs(mesh, alice)


def _job_count(gateway_channel: grpc.Channel, alice: list[tuple[str, str]]) -> int:
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    request = training_pb2.ListTrainingJobsRequest(page_size=1000)
    return len(training.ListTrainingJobs(request, metadata=alice).jobs)


def test_malformed_json_on_train_is_400_and_queues_nothing(
    rest: httpx.Client, gateway_channel: grpc.Channel, alice: list[tuple[str, str]]
) -> None:
    """The transcoder's own parser took {'epochs': 1} and queued a real training job."""
    before = _job_count(gateway_channel, alice)
    headers = dict(alice)
    message = error_message(rest.post("/train", content="{'epochs': 1}", headers=headers), 400, 3)
    assert message == (
        "invalid JSON at line 1, column 2: expected a key in double quotes, found \"'epochs': 1}\""
    )
    for body in ('{"epochs": 1,}', "{epochs: 1}", '{"lr": NaN}', '{"epochs": 1} {}'):
        resp = rest.post("/train", content=body, headers=headers)
        assert error_message(resp, 400, 3).startswith("invalid JSON at line 1, column "), body
    assert _job_count(gateway_channel, alice) == before


def test_errors_through_the_gateway_are_json(
    rest: httpx.Client, gateway_channel: grpc.Channel, alice: list[tuple[str, str]]
) -> None:
    no_key = "missing or invalid API key: send it in the x-api-key header"
    assert error_message(rest.post("/train", json={"epochs": 1}), 401, 16) == no_key
    wrong = rest.post("/train", json={"epochs": 1}, headers={API_KEY_HEADER: "w" * 24})
    assert error_message(wrong, 401, 16) == no_key
    bad_value = rest.post("/v1/training/jobs", json={"epochs": "three"}, headers=dict(alice))
    assert error_message(bad_value, 400, 3) == 'epochs: invalid value "three" for type TYPE_INT32'
    # A refusal by the service itself is in the same envelope (the transcoder's).
    unknown = rest.get("/v1/training/jobs/no-such-job", headers=dict(alice))
    assert "no-such-job" in error_message(unknown, 404, 5)
    # Over gRPC: the status, and the message as text.
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    with pytest.raises(grpc.RpcError) as err:
        training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "missing or invalid API key: send it in the x-api-key metadata"


def test_rest_calls_leave_no_lua_error_in_envoys_log(
    mesh: Mesh, rest: httpx.Client, alice: list[tuple[str, str]]
) -> None:
    """Every /train once logged "object used outside of proper scope" (strict_json.lua touched
    the response headers after reading the body)."""
    headers = dict(alice)
    tiny = {"epochs": 1, "train_subset": 100, "architecture": "mlp"}
    job = rest.post("/train", json=tiny, headers=headers)
    assert job.status_code == 200, job.text
    assert job.json()["state"] == "JOB_STATE_QUEUED"  # the job itself (response_body)
    assert int(job.headers["content-length"]) == len(job.content)
    job_id = job.json()["job_id"]
    assert rest.get(f"/train/status/{job_id}", headers=headers).json()["job_id"] == job_id
    cancel = rest.post(f"/v1/training/jobs/{job_id}:cancel", headers=headers)
    assert cancel.status_code in (200, 400), cancel.text  # 400: it finished already
    assert rest.post("/predict", json={"image": [0.0] * 784}, headers=headers).status_code < 500
    assert rest.post("/train", json={"colour": 1}, headers=headers).status_code == 400
    assert rest.get("/v1/models?page_size=1").status_code == 200
    time.sleep(0.5)  # Envoy writes its log as it goes
    log = (mesh.settings.state_dir / "logs" / "envoy.log").read_text(errors="replace")
    lua = [line for line in log.splitlines() if "[lua]" in line]
    assert not lua, lua[:3]
