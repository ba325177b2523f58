"""The gateway's promises: every RPC classified and enforced over REST and gRPC, tools work."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx

from gateway.render import build_descriptor_set, render_envoy_config, tool
from services.launcher.mesh import Mesh
from tests.conftest import isolated_settings

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
        assert resp.status_code == 503
        assert "not running" in resp.text
    finally:
        envoy.terminate()
        envoy.wait(10)


def test_unknown_route_is_404_with_a_key(rest: httpx.Client, keys: dict[str, str]) -> None:
    assert rest.get("/v1/nothing-here").status_code == 401
    resp = rest.get("/v1/nothing-here", headers={"x-api-key": keys["alice"]})
    assert resp.status_code == 404
    assert "no such route" in resp.json()["message"]


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
    target = mesh.settings.registry_address
    listed = _grpcurl("-plaintext", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "mlmesh.registry.v1.RegistryService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = _grpcurl("-plaintext", target, "describe", "mlmesh.registry.v1.RegistryService")
    assert "TransitionModelVersion" in described.stdout
    health = _grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}


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
