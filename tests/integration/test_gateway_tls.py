"""The gateway terminates TLS: HTTPS and gRPC over TLS with the launcher's development
certificate, plain text refused on the TLS listener, and the SDK and the CLI speak TLS to it."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from mlmesh_client import Client, MeshError
from services.common.settings import Settings
from services.launcher.mesh import Mesh, child_env
from tests.integration.replicas import second_gateway
from tests.integration.rpcs import DESCRIPTOR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tls_gateway(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A TLS-only Envoy in front of the session's services, with a certificate made by
    `python -m services.launcher dev-cert`."""
    state = tmp_path_factory.mktemp("tls")
    made = subprocess.run(
        [sys.executable, "-m", "services.launcher", "dev-cert", "--dir", str(state / "tls")],
        capture_output=True,
        text=True,
        env=child_env(mesh.settings),
        check=True,
        timeout=60,
    )
    exports = dict(line.removeprefix("export ").split("=", 1) for line in made.stdout.splitlines())
    with second_gateway(
        mesh.settings,
        DESCRIPTOR,
        state,
        gateway_tls_cert_file=Path(exports["MLMESH_GATEWAY_TLS_CERT_FILE"]),
        gateway_tls_key_file=Path(exports["MLMESH_GATEWAY_TLS_KEY_FILE"]),
    ) as settings:
        yield settings


def test_https_with_the_development_certificate(tls_gateway: Settings, keys) -> None:
    assert tls_gateway.gateway_url.startswith("https://")
    trusting = ssl.create_default_context(cafile=tls_gateway.gateway_tls_cert_file)
    with httpx.Client(base_url=tls_gateway.gateway_url, verify=trusting, timeout=30) as client:
        assert client.get("/health").json() == {"status": "healthy"}
        assert client.get("/v1/audit-events").status_code == 401
        assert client.get("/v1/audit-events", headers={"x-api-key": keys["alice"]}).is_success
    with httpx.Client(http2=False, verify=True, timeout=10) as untrusting:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.get(f"{tls_gateway.gateway_url}/health")


def test_grpc_over_tls(tls_gateway: Settings, keys) -> None:
    root = tls_gateway.gateway_tls_cert_file.read_bytes()
    address = f"localhost:{tls_gateway.gateway_port}"
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(root)) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        registry.ListRegisteredModels(registry_pb2.ListRegisteredModelsRequest(), timeout=30)
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            inference.Predict(inference_pb2.PredictRequest(image=[0.0] * 784), timeout=30)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plain_text_is_refused_on_the_tls_listener(tls_gateway: Settings) -> None:
    plain = f"http://{tls_gateway.gateway_host}:{tls_gateway.gateway_port}"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/health", timeout=10)
    address = f"{tls_gateway.gateway_host}:{tls_gateway.gateway_port}"
    with grpc.insecure_channel(address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            registry.ListRegisteredModels(registry_pb2.ListRegisteredModelsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    cert = tmp_path / "gateway.crt"
    cert.write_text("x")
    with pytest.raises(ValueError, match="together"):
        Settings(gateway_tls_cert_file=cert)
    with pytest.raises(ValueError, match="is not a file"):
        Settings(gateway_tls_cert_file=cert, gateway_tls_key_file=tmp_path / "missing.key")


def test_the_sdk_and_the_cli_speak_tls(
    tls_gateway: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cert = tls_gateway.gateway_tls_cert_file
    target = f"localhost:{tls_gateway.gateway_port}"
    monkeypatch.delenv("MLMESH_GATEWAY_CA_FILE", raising=False)
    with Client(target, ca_file=cert) as mesh:
        assert isinstance(mesh.list_registered_models(), list)
    # Plain text, or TLS trusting the system's CAs only: the call fails.
    for plain_or_untrusting in (Client(target), Client(target, tls=True)):
        with plain_or_untrusting as mesh, pytest.raises(MeshError) as failed:
            mesh.list_registered_models()
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(MeshError, match="cannot read the CA file"):
        Client(target, ca_file=tmp_path / "missing.pem")
    monkeypatch.setenv("MLMESH_GATEWAY_CA_FILE", str(cert))
    with Client(target) as mesh:
        assert isinstance(mesh.list_registered_models(), list)
    # The CLI: --ca-file, and the variable.
    mlmesh = str(Path(sys.executable).with_name("mlmesh"))
    env = {k: v for k, v in child_env(tls_gateway).items() if not k.startswith("MLMESH_")}
    for argv, extra in (
        ([mlmesh, "--gateway", target, "--ca-file", str(cert), "models"], {}),
        ([mlmesh, "--gateway", target, "models"], {"MLMESH_GATEWAY_CA_FILE": str(cert)}),
    ):
        done = subprocess.run(
            argv, env={**env, **extra}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    refused = subprocess.run(
        [mlmesh, "--gateway", target, "--tls", "models"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused.stderr
