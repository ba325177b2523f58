"""One front door (issue 17): MLflow behind the gateway, what serves moved only through mlmesh,
and identity between the gateway and the services.

- A plain MLflow client works through the gateway with MLFLOW_TRACKING_TOKEN; its writes need
  the key, and the registry writes that change what serves are refused naming the RPC.
- An alias moved around the gateway (this test's own MlflowClient at MLflow's own address, as
  someone with direct access would) is recorded in the audit log as changed outside mlmesh,
  counted, and not served; a replica set to follow MLflow's aliases does serve it.
- A service port takes nothing without a client certificate of the mesh's CA, over gRPC and
  over the Open Inference Protocol's REST port; the health port answers health only.
- The MLflow UI loads through the gateway in headless Chromium.

The bypass tests print what happened (run with -s to see it).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import grpc
import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gateway.keys import API_KEY_HEADER
from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.aliases import recorded_alias
from services.common.events import MODEL_EVENTS_CHANNEL
from services.common.headers import CLIENT_HEADER
from services.common.interceptors import NO_CERTIFICATE
from services.common.server import CHANNEL_OPTIONS, service_channel
from services.common.settings import MESH_SERVICE_NAME
from services.launcher.mesh import Mesh
from services.registry.audit import CHANGED_OUTSIDE, OUTSIDE_CLIENT
from tests.conftest import free_port, metric_sample
from tests.integration.models import log_classifier
from tests.integration.replicas import inference_replica

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
T = TypeVar("T")


def wait_for(
    get: Callable[[], T], done: Callable[[T], bool], what: str, timeout_s: float = 20
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = get()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}; last: {value}"
        time.sleep(0.2)


def auth(keys: dict[str, str], client: str = "alice") -> list[tuple[str, str]]:
    return [(API_KEY_HEADER, keys[client])]


def promote(mesh: Mesh, keys: dict[str, str], name: str, version: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.settings.gateway_port}") as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).TransitionModelVersion(
            registry_pb2.TransitionModelVersionRequest(
                model_name=name, version=version, stage="production", force=True
            ),
            metadata=auth(keys, "bob"),
        )


def served(channel: grpc.Channel, name: str, metadata: list[tuple[str, str]] = ()) -> int:
    """The version that answers a prediction of ``name`` at its production alias."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.PredictRequest(image=[0.0] * 784, model_name=name)
    return stub.Predict(request, metadata=metadata, timeout=30).model_version


def audit_events(mesh: Mesh, keys: dict[str, str], name: str) -> list[registry_pb2.AuditEvent]:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.settings.gateway_port}") as channel:
        return list(
            registry_pb2_grpc.RegistryServiceStub(channel)
            .ListAuditEvents(
                registry_pb2.ListAuditEventsRequest(model_name=name), metadata=auth(keys)
            )
            .audit_events
        )


def mlflow_alias(mesh: Mesh, name: str, alias: str = "production") -> int | None:
    """Where MLflow itself has ``alias`` (read at MLflow's own address)."""
    aliases = MlflowClient(mesh.settings.mlflow_tracking_uri).get_registered_model(name).aliases
    return int(aliases[alias]) if alias in aliases else None


def registry_metrics(mesh: Mesh) -> str:
    return httpx.get(f"http://127.0.0.1:{mesh.settings.registry_ops_port}/metrics").text


@pytest.fixture(scope="module")
def gateway(mesh: Mesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.settings.gateway_port}") as channel:
        yield channel


@pytest.fixture
def model(mesh: Mesh, keys: dict[str, str], gateway: grpc.Channel) -> str:
    """A model with two servable versions (logged at MLflow's own address, the trusted side
    the workers use), v2 promoted through mlmesh and served."""
    name = f"it-door-{secrets.token_hex(3)}"
    uri = mesh.settings.mlflow_tracking_uri
    assert [log_classifier(uri, name, favourite=f) for f in (1, 2)] == [1, 2]
    promote(mesh, keys, name, 2)
    wait_for(lambda: served(gateway, name, auth(keys)), lambda v: v == 2, "v2 is not served")
    return name


# -- MLflow through the gateway --------------------------------------------------------------


def test_a_plain_mlflow_client_logs_and_registers_with_its_token(
    mesh: Mesh, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = mesh.settings.gateway_mlflow_url
    name = f"it-door-token-{secrets.token_hex(3)}"
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with pytest.raises(MlflowException) as no_key:
        MlflowClient(url).create_experiment(name)
    assert no_key.value.error_code == "UNAUTHENTICATED"
    assert "MLFLOW_TRACKING_TOKEN" in no_key.value.message
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "wrong-" + secrets.token_urlsafe(16))
    with pytest.raises(MlflowException) as wrong:
        MlflowClient(url).create_experiment(name)
    assert wrong.value.error_code == "UNAUTHENTICATED"
    # With the key: mlflow.pytorch.log_model uploads the artifacts, makes the logged model,
    # the registered model and its version, all through the gateway.
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", keys["erin"])
    assert log_classifier(url, name, favourite=3) == 1
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    version = MlflowClient(url).get_model_version(name, "1")  # reads need no key
    assert version.status == "READY"
    # The gateway logged who wrote (the key's client), never the key. (Envoy writes its
    # access log out every second or so.)
    wanted = {"path": "/api/2.0/mlflow/model-versions/create", "client": "erin", "code": 200}
    wait_for(
        lambda: [
            json.loads(line)
            for line in (mesh.log_dir / "envoy.log").read_text().splitlines()
            if line.startswith("{") and '"upstream":"mlflow"' in line
        ],
        lambda entries: any(wanted.items() <= entry.items() for entry in entries),
        "the access log has no line of the model version's registration",
    )
    assert keys["erin"] not in (mesh.log_dir / "envoy.log").read_text()


def test_an_alias_set_through_the_gateway_is_refused(
    mesh: Mesh,
    keys: dict[str, str],
    model: str,
    gateway: grpc.Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", keys["alice"])  # a valid key does not help
    client = MlflowClient(mesh.settings.gateway_mlflow_url)
    attempts = {
        "set alias": lambda: client.set_registered_model_alias(model, "production", "1"),
        "delete alias": lambda: client.delete_registered_model_alias(model, "production"),
        "stage transition": lambda: client.transition_model_version_stage(model, "1", "Production"),
        "delete version": lambda: client.delete_model_version(model, "2"),
        "delete model": lambda: client.delete_registered_model(model),
        "rename model": lambda: client.rename_registered_model(model, model + "-renamed"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.error_code == "PERMISSION_DENIED", what
        assert "TransitionModelVersion" in refused.value.message, what
        print(f"through the gateway, {what} -> 403 {refused.value.message[:90]}...")
    # The request as it was made, and the same path spelled otherwise: never MLflow's.
    base = mesh.settings.gateway_mlflow_url
    body = {"name": model, "alias": "production", "version": "1"}
    for path in [
        "/api/2.0/mlflow/registered-models/alias",
        "/ajax-api/2.0/mlflow/registered-models/alias",
        "/api/2.0/mlflow/registered-models/%61lias",
        "/api/2.0/mlflow/runs/../registered-models/alias",
        "//api/2.0/mlflow//registered-models/alias",
        "/api/2.0/mlflow/registered-models%2Falias",
        "/api/2.0/mlflow/registered-models%2falias",
    ]:
        for headers in ({}, {API_KEY_HEADER: keys["alice"]}):
            answer = httpx.post(base + path, json=body, headers=headers, timeout=10)
            assert answer.status_code in (400, 403), (path, answer.status_code, answer.text)
            assert "x-envoy-upstream-service-time" not in answer.headers, path  # not MLflow's
        print(f"POST {path} through the gateway -> {answer.status_code}")
    assert mlflow_alias(mesh, model) == 2
    assert served(gateway, model, auth(keys)) == 2
    assert [e.action for e in audit_events(mesh, keys, model)] == ["transition"]


# -- changes made around the gateway ----------------------------------------------------------


@pytest.fixture
def follower(mesh: Mesh, model: str) -> Iterator[grpc.Channel]:
    """A second Inference replica set to follow MLflow's own aliases, and a channel to it."""
    settings = mesh.settings.model_copy(
        update={
            "inference_address": f"127.0.0.1:{free_port()}",
            "inference_ops_port": free_port(),
            "inference_http_port": free_port(),
            "inference_health_port": free_port(),
            "inference_follow_mlflow_aliases": True,
        }
    )
    with inference_replica(settings, mesh.log_dir / "inference-follower.log"):
        with service_channel(settings, settings.inference_address) as channel:
            assert served(channel, model) == 2
            yield channel


def announce(mesh: Mesh, name: str) -> None:
    """A model event as the Registry publishes one: every replica re-reads ``name``'s aliases
    now, rather than at its next periodic check."""
    with redis.Redis.from_url(mesh.settings.redis_url) as r:
        r.publish(MODEL_EVENTS_CHANNEL, json.dumps({"model_name": name}))


def test_an_alias_set_directly_in_mlflow_is_recorded_and_not_served(
    mesh: Mesh, keys: dict[str, str], model: str, gateway: grpc.Channel, follower: grpc.Channel
) -> None:
    before = registry_metrics(mesh)
    # Someone with direct access to MLflow moves production back to v1.
    MlflowClient(mesh.settings.mlflow_tracking_uri).set_registered_model_alias(
        model, "production", "1"
    )
    events = wait_for(
        lambda: audit_events(mesh, keys, model),
        lambda e: e[0].action == CHANGED_OUTSIDE,
        "the Registry did not record the change",
    )
    event = events[0]
    assert (event.client, event.version, event.previous_version) == (OUTSIDE_CLIENT, 1, 2)
    assert (event.to_stage, event.from_stage) == ("Production", "")
    assert event.note.startswith("changed outside mlmesh: MLflow's production alias of")
    assert "goes on serving what mlmesh recorded" in event.note
    after = registry_metrics(mesh)
    labels = {"model_name": model, "alias": "production"}
    total = "registry_alias_changes_outside_mlmesh_total"
    assert metric_sample(after, total, **labels) - metric_sample(before, total, **labels) == 1
    assert metric_sample(after, "registry_alias_mismatch", **labels) == 1
    # Every replica re-reads the aliases now: the follower takes MLflow's, the mesh's does not.
    announce(mesh, model)
    wait_for(lambda: served(follower, model), lambda v: v == 1, "the follower kept v2")
    for _ in range(10):
        assert served(gateway, model, auth(keys)) == 2
        time.sleep(0.2)
    # Found once, however often the Registry looks (every second in the tests).
    time.sleep(3)
    assert [e.action for e in audit_events(mesh, keys, model)] == [CHANGED_OUTSIDE, "transition"]
    print(
        f"alias set directly in MLflow: production -> v1; audit: {event.action} "
        f"(v{event.version}, recorded v{event.previous_version}); served through the gateway: "
        f"v{served(gateway, model, auth(keys))}; a replica following MLflow's aliases: "
        f"v{served(follower, model)}"
    )

    # Promoted through mlmesh, v1 serves, and the difference is over.
    promote(mesh, keys, model, 1)
    wait_for(lambda: served(gateway, model, auth(keys)), lambda v: v == 1, "v1 is not served")
    wait_for(
        lambda: metric_sample(registry_metrics(mesh), "registry_alias_mismatch", **labels),
        lambda v: v == 0,
        "registry_alias_mismatch stayed 1",
    )


def test_an_alias_removed_directly_is_recorded_and_production_keeps_serving(
    mesh: Mesh, keys: dict[str, str], model: str, gateway: grpc.Channel
) -> None:
    MlflowClient(mesh.settings.mlflow_tracking_uri).delete_registered_model_alias(
        model, "production"
    )
    event = wait_for(
        lambda: audit_events(mesh, keys, model)[0],
        lambda e: e.action == CHANGED_OUTSIDE,
        "the Registry did not record the removal",
    )
    assert (event.version, event.previous_version) == (0, 2)
    assert "(removed)" in event.note
    announce(mesh, model)
    time.sleep(1)
    assert served(gateway, model, auth(keys)) == 2


# -- identity between the gateway and the services ---------------------------------------------


def other_ca_certificate() -> tuple[bytes, bytes]:
    """A client certificate (PEM) and key named like the gateway's, from a CA that is not the
    mesh's."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlmesh-gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mlmesh-gateway")]), False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def _rpc_code(channel: grpc.Channel, method: str, metadata=()) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=bytes)
    try:
        call(b"", metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


SERVICE_CALLS = {
    "registry": "/mlmesh.registry.v1.RegistryService/ListAuditEvents",
    "training": "/mlmesh.training.v1.TrainingService/ListTrainingJobs",
    "inference": "/mlmesh.inference.v1.InferenceService/LoadModelVersion",
}


@pytest.mark.parametrize("service", sorted(SERVICE_CALLS))
def test_a_service_takes_calls_only_with_the_mesh_s_certificate(mesh: Mesh, service: str) -> None:
    s = mesh.settings
    address = getattr(s, f"{service}_address")
    method = SERVICE_CALLS[service]
    forged = [(CLIENT_HEADER, "mallory")]
    ca = s.mesh_tls.ca_cert.read_bytes()
    cert, key = other_ca_certificate()
    refused = {
        "plain text": grpc.insecure_channel(address),
        "TLS without a client certificate": grpc.secure_channel(
            address, grpc.ssl_channel_credentials(ca), options=CHANNEL_OPTIONS
        ),
        "a certificate of another CA": grpc.secure_channel(
            address, grpc.ssl_channel_credentials(ca, key, cert), options=CHANNEL_OPTIONS
        ),
    }
    for what, channel in refused.items():
        with channel:
            code, details = _rpc_code(channel, method, forged)
        assert code == grpc.StatusCode.UNAVAILABLE, (what, code, details)
        print(f"{service} {address}, {what}: {code.name} ({details[:70]})")
    # The health port: plain text, health only; a forged identity gets nothing.
    with grpc.insecure_channel(s.health_address(address)) as channel:
        assert _rpc_code(channel, "/grpc.health.v1.Health/Check")[0] == grpc.StatusCode.OK
        code, details = _rpc_code(channel, method, forged)
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, NO_CERTIFICATE)
    print(f"{service} health port, {method}: {code.name}")
    # With the mesh's certificate the call is the service's to answer.
    with service_channel(s, address) as channel:
        code, _ = _rpc_code(channel, method)
    assert code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), code
    for log in ("registry.log", "training.log", "inference.log"):
        assert "mallory" not in (mesh.log_dir / log).read_text()


def test_the_open_inference_rest_port_takes_only_the_mesh_s_certificate(mesh: Mesh) -> None:
    s = mesh.settings
    url = f"127.0.0.1:{s.inference_http_port}/v2/health/live"
    files = s.mesh_tls
    with pytest.raises(httpx.TransportError) as plain:
        httpx.get(f"http://{url}", headers={CLIENT_HEADER: "mallory"}, timeout=10)
    trusting = ssl.create_default_context(cafile=files.ca_cert)
    trusting.check_hostname = False  # the certificate names the service, not the address
    with pytest.raises(httpx.TransportError) as no_cert:
        httpx.get(f"https://{url}", verify=trusting, timeout=10)
    print(f"OIP REST port, plain HTTP: {type(plain.value).__name__}; HTTPS without a client "
          f"certificate: {type(no_cert.value).__name__} ({no_cert.value})")  # fmt: skip
    with_cert = ssl.create_default_context(cafile=files.ca_cert)
    with_cert.check_hostname = False
    with_cert.load_cert_chain(files.service_cert, files.service_key)
    answer = httpx.get(f"https://{url}", verify=with_cert, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"live": True}
    # The certificate names the services, wherever they listen.
    cert = x509.load_pem_x509_certificate(files.service_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [MESH_SERVICE_NAME]


# -- the MLflow UI ---------------------------------------------------------------------------


def chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium (Debian's) on ``url``, letting the page run up to 20 s of its time
    (network fetches pause that clock), then ``mode``: --dump-dom or --screenshot=PATH."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "chromium is not installed: run scripts/install-system-packages.sh as root (it "
            "installs Debian's chromium, as CI does)"
        )
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-extensions", "--no-first-run",
         f"--user-data-dir={profile}", "--window-size=1400,1000",
         "--virtual-time-budget=20000", *mode, url],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip


def test_the_mlflow_ui_loads_through_the_gateway(mesh: Mesh, tmp_path: Path) -> None:
    client = MlflowClient(mesh.settings.mlflow_tracking_uri)
    experiment = f"it-ui-{secrets.token_hex(3)}"
    experiment_id = client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"ui-run-{secrets.token_hex(3)}")
    client.log_metric(run.info.run_id, "val_accuracy", 0.9731)
    client.set_terminated(run.info.run_id)
    base = mesh.settings.gateway_mlflow_url
    pages = {
        "experiments": (f"{base}/#/experiments", [experiment]),
        "run": (
            f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}",
            [run.info.run_name, "val_accuracy", "0.9731"],
        ),
    }
    for page, (url, expected) in pages.items():
        dom = chromium(url, tmp_path / "profile", "--dump-dom").stdout
        (tmp_path / f"{page}.html").write_text(dom)
        missing = [text for text in expected if text not in dom]
        assert not missing, f"{page} page lacks {missing}; DOM in {tmp_path / f'{page}.html'}"
        screenshot = tmp_path / f"mlflow-ui-{page}.png"
        chromium(url, tmp_path / "profile", f"--screenshot={screenshot}")
        assert screenshot.stat().st_size > 10_000, screenshot
        print(f"MLflow UI {page} page through the gateway: {url}; screenshot {screenshot}")
    # The pages' API calls went through the gateway, into its access log.
    wait_for(
        lambda: (mesh.log_dir / "envoy.log").read_text(),
        lambda log: '"path":"/ajax-api/2.0/mlflow/' in log and '"path":"/graphql"' in log,
        "the UI's API calls are not in the gateway's access log",
    )


def test_recorded_aliases_replay_the_transitions(mesh: Mesh) -> None:
    """services/common/aliases.py against the real audit table: what the Registry's
    transitions did to the aliases (store.py), replayed from their records alone."""
    name = f"it-door-replay-{secrets.token_hex(3)}"

    async def replay() -> list[tuple[int | None, int | None]]:
        conn = await asyncpg.connect(mesh.settings.database_url)
        seen = []
        try:
            for version, stage, action in [
                (1, "Production", "transition"),  # production v1
                (2, "Staging", "transition"),  # staging v2
                (2, "Production", "transition"),  # v2 leaves staging for production
                (3, "Production", CHANGED_OUTSIDE),  # recorded, but not a transition
                (1, "Staging", "transition"),  # v1, out of production already, to staging
                (2, "Archived", "transition"),  # production left empty (forced)
            ]:
                await conn.execute(
                    "INSERT INTO audit_events (client, action, model_name, version, from_stage,"
                    " to_stage) VALUES ('t', $1, $2, $3, '', $4)",
                    action, name, version, stage,
                )  # fmt: skip
                seen.append(
                    (
                        await recorded_alias(conn, name, "production"),
                        await recorded_alias(conn, name, "staging"),
                    )
                )
        finally:
            await conn.close()
        return seen

    assert asyncio.run(replay()) == [(1, None), (1, 2), (2, None), (2, None), (2, 1), (None, 1)]
