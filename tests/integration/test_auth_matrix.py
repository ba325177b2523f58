"""Auth, complete by construction: every RPC of every service in the gateway's descriptor set,
over REST and native gRPC through Envoy, and every route of MLflow's server through the
gateway's MLflow listener, without a key, with a wrong key and with a valid one, against
gateway/policy.py. Plus: forged identities, keys kept out of logs, key rotation.

The RPCs are read from the descriptor set itself (every service, whatever its package), and
MLflow's routes from the installed MLflow (tests/mlflow_routes.py), so an RPC or a route added
later is in the matrix without anyone touching this file, and one missing from the policy
fails it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.keys import (
    API_KEY_HEADER,
    BEARER_HEADER,
    ENVOY_KEYS_FILE,
    ENVOY_MLFLOW_KEYS_FILE,
    ApiKeysWatcher,
)
from gateway.policy import HTTP_ACCESS, OIP_REST_ROUTES, OIP_SERVICE, RPC_ACCESS
from gateway.render import NOT_CLASSIFIED, classify_mlflow, mlflow_routes
from mlmesh.training.v1 import training_pb2, training_pb2_grpc
from services.common.headers import CLIENT_HEADER
from services.common.settings import Settings
from services.launcher.mesh import Mesh
from tests.conftest import cancel_live_jobs
from tests.integration.replicas import second_gateway
from tests.integration.rpcs import DESCRIPTOR, Method, descriptor_methods
from tests.mlflow_routes import mlflow_server_routes

WRONG_KEY = "wrong-key-" + secrets.token_urlsafe(16)
METHODS = descriptor_methods(DESCRIPTOR)
REST_CALLS = [(m, verb, template, body) for m in METHODS for verb, template, body in m.rest]
# The Open Inference Protocol's REST face is forwarded, not transcoded: its routes come from
# gateway/policy.py, each with the access of the RPC it is.
_BY_PATH = {m.path: m for m in METHODS}
REST_CALLS += [
    (_BY_PATH[f"/{OIP_SERVICE}/{rpc}"], verb, template, "*" if verb == "POST" else "")
    for verb, template, rpc in OIP_REST_ROUTES
]


def _ident(b: bytes) -> bytes:
    return b


def call_raw(
    channel: grpc.Channel, method: Method, metadata: list[tuple[str, str]], timeout: float = 15
) -> grpc.RpcError | None:
    """Call an RPC with one empty request message, as its kind wants; the error, if any."""
    kw = {"request_serializer": _ident, "response_deserializer": _ident}
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(method.path, **kw)
            for _ in call(iter([b""]), metadata=metadata, timeout=timeout):
                pass
        elif method.client_streaming:
            channel.stream_unary(method.path, **kw)(iter([b""]), metadata=metadata, timeout=timeout)
        elif method.server_streaming:
            call = channel.unary_stream(method.path, **kw)
            for _ in call(b"", metadata=metadata, timeout=timeout):
                pass
        else:
            channel.unary_unary(method.path, **kw)(b"", metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err
    return None


def _code(err: grpc.RpcError | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if err is None else err.code()


def concrete(template: str) -> str:
    """A path a google.api.http template (or an HTTP_ACCESS route) matches: each variable "1"."""
    return re.sub(r"\{[^}]*\}", "1", template)


@pytest.fixture(scope="module")
def training(gateway_channel: grpc.Channel) -> training_pb2_grpc.TrainingServiceStub:
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


@pytest.fixture(scope="module", autouse=True)
def leave_no_job_running(mesh: Mesh, keys: dict[str, str]) -> Iterator[None]:
    """An empty SubmitTrainingJob is a valid job: leave none of this module's running."""
    yield
    cancel_live_jobs(mesh, [(API_KEY_HEADER, keys["alice"])])


def cancel_if_submitted(mesh: Mesh, keys: dict[str, str], method: Method) -> None:
    """After a Submit* that may have been accepted: cancel the job at once. An empty
    SubmitTrainingJob trains the full MNIST, and left running it takes the worker's cores from
    the rest of the matrix."""
    if method.path.rsplit("/", 1)[-1].startswith("Submit"):
        cancel_live_jobs(mesh, [(API_KEY_HEADER, keys["alice"])])


# -- completeness -------------------------------------------------------------------------------


def test_every_rpc_is_classified() -> None:
    declared = {m.path for m in METHODS}
    unclassified = sorted(declared - set(RPC_ACCESS))
    assert not unclassified, f"RPCs missing from gateway/policy.py RPC_ACCESS: {unclassified}"
    stale = sorted(set(RPC_ACCESS) - declared)
    assert not stale, f"RPC_ACCESS lists RPCs the contract does not have: {stale}"
    assert set(RPC_ACCESS.values()) <= {"public", "protected"}
    assert set(HTTP_ACCESS.values()) <= {"public", "protected"}
    # A standard protocol's own proto (the OIP's `inference` package) has no bindings: its REST
    # face is a plain HTTP handler, whose routes are gateway/policy.py's OIP_REST_ROUTES.
    missing_rest = [m.path for m in METHODS if not m.rest and m.path.startswith("/mlmesh.")]
    assert not missing_rest, f"RPCs without a google.api.http binding: {missing_rest}"
    kinds = {(m.client_streaming, m.server_streaming) for m in METHODS}
    assert (False, True) in kinds and (True, True) in kinds, "streaming RPCs are in the matrix"


def test_matrix_covers_what_the_gateway_serves(mesh: Mesh) -> None:
    # The running Envoy transcodes with the descriptor set the launcher built for it.
    served = descriptor_methods(mesh.settings.state_dir / "mlmesh.binpb")
    assert {m.path for m in served} == {m.path for m in METHODS}


# -- the matrix: native gRPC --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path)
def test_grpc(
    mesh: Mesh, gateway_channel: grpc.Channel, keys: dict[str, str], method: Method
) -> None:
    no_key = call_raw(gateway_channel, method, [])
    wrong = call_raw(gateway_channel, method, [(API_KEY_HEADER, WRONG_KEY)])
    valid = call_raw(gateway_channel, method, [(API_KEY_HEADER, keys["alice"])])
    cancel_if_submitted(mesh, keys, method)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    if RPC_ACCESS[method.path] == "protected":
        assert _code(no_key) == unauthenticated, no_key
        assert _code(wrong) == unauthenticated, wrong
        assert no_key.details(), "a refusal says why"
    else:
        assert _code(no_key) != unauthenticated, no_key
        assert _code(wrong) != unauthenticated, wrong
    assert _code(valid) != unauthenticated, valid
    # UNIMPLEMENTED would mean the gateway has no route to it: it must reach the service.
    for err in (no_key, wrong, valid):
        assert _code(err) != grpc.StatusCode.UNIMPLEMENTED, err


# -- the matrix: REST ---------------------------------------------------------------------------


def _rest_ids(call: tuple[Method, str, str, str]) -> str:
    method, verb, template, _ = call
    return f"{method.path.rsplit('/', 1)[-1]}:{verb} {template}"


@pytest.mark.parametrize("call", REST_CALLS, ids=_rest_ids)
def test_rest(
    mesh: Mesh, rest: httpx.Client, keys: dict[str, str], call: tuple[Method, str, str, str]
) -> None:
    method, verb, template, body = call
    path = concrete(template)
    content = ("[{}]" if method.client_streaming else "{}") if body else None

    def send(headers: dict[str, str]) -> httpx.Response:
        return rest.request(verb, path, content=content, headers=headers, timeout=30)

    no_key, wrong = send({}), send({API_KEY_HEADER: WRONG_KEY})
    valid = send({API_KEY_HEADER: keys["alice"]})
    cancel_if_submitted(mesh, keys, method)
    where = f"{verb} {path}"
    if RPC_ACCESS[method.path] == "protected":
        assert (no_key.status_code, wrong.status_code) == (401, 401), where
    else:
        assert no_key.status_code != 401 and wrong.status_code != 401, where
    for resp in (no_key, wrong, valid):
        assert resp.status_code != 403, f"{where}: {resp.text}"
        assert "no such route" not in resp.text, f"{where} is not routed"
        assert resp.status_code < 500 or resp.status_code == 503, f"{where}: {resp.text}"
    assert valid.status_code != 401, f"{where}: {valid.text}"


@pytest.mark.parametrize("route", sorted(HTTP_ACCESS))
def test_http_routes(rest: httpx.Client, keys: dict[str, str], route: str) -> None:
    path = concrete(route)
    no_key = rest.get(path)
    wrong = rest.get(path, headers={API_KEY_HEADER: WRONG_KEY})
    valid = rest.get(path, headers={API_KEY_HEADER: keys["alice"]})
    if HTTP_ACCESS[route] == "protected":
        assert (no_key.status_code, wrong.status_code) == (401, 401), path
    else:
        assert no_key.status_code != 401 and wrong.status_code != 401, path
    assert valid.status_code != 401, path
    for resp in (no_key, wrong, valid):
        assert resp.status_code < 500 or resp.status_code == 503, f"{path}: {resp.text}"


def test_key_is_read_from_the_header_only(rest: httpx.Client, keys: dict[str, str]) -> None:
    key = keys["alice"]
    assert rest.get("/v1/audit-events", headers={API_KEY_HEADER: ""}).status_code == 401
    assert rest.get("/v1/audit-events", params={"x-api-key": key}).status_code == 401
    assert rest.get("/v1/audit-events", headers={"authorization": key}).status_code == 401
    # MLflow's bearer token is the MLflow listener's key source, not the mesh listener's.
    bearer = {"authorization": f"Bearer {key}"}
    assert rest.get("/v1/audit-events", headers=bearer).status_code == 401
    assert rest.get("/v1/audit-events", headers={"X-API-Key": key}).status_code == 200


# -- the matrix: MLflow's routes, through the gateway's MLflow listener -------------------------

MLFLOW_CALLS = mlflow_server_routes()
_MLFLOW_ROUTES = mlflow_routes()
# Envoy's router puts this header on answers that came from MLflow; the gateway's own
# refusals (401, 403) have none.
FROM_MLFLOW = "x-envoy-upstream-service-time"


@pytest.fixture(scope="module")
def mlflow_gateway(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.settings.gateway_mlflow_url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("call", MLFLOW_CALLS, ids=lambda c: f"{c[0]} {c[1]}")
def test_mlflow(mlflow_gateway: httpx.Client, keys: dict[str, str], call: tuple[str, str]) -> None:
    verb, path = call
    route = classify_mlflow(verb, path, _MLFLOW_ROUTES)
    assert route is not None, f"{verb} {path} is not in gateway/policy.py MLFLOW_ROUTES"
    content = None if verb == "GET" else b"{}"

    def send(key: str | None) -> httpx.Response:
        # As MLflow's clients send MLFLOW_TRACKING_TOKEN.
        headers = {"content-type": "application/json"}
        if key is not None:
            headers[BEARER_HEADER] = f"Bearer {key}"
        return mlflow_gateway.request(verb, path, content=content, headers=headers)

    no_key, wrong, valid = send(None), send(WRONG_KEY), send(keys["alice"])
    where = f"{verb} {path} ({route.rule.access})"
    if route.rule.access == "refused":
        for resp in (no_key, wrong, valid):
            assert resp.status_code == 403 and FROM_MLFLOW not in resp.headers, where
            assert resp.json() == {"error_code": "PERMISSION_DENIED", "message": route.rule.why}
        return
    if route.rule.access == "protected":
        for resp in (no_key, wrong):
            assert resp.status_code == 401 and FROM_MLFLOW not in resp.headers, where
            assert resp.json()["error_code"] == "UNAUTHENTICATED", where
        answered = [valid]
    else:
        answered = [no_key, wrong, valid]
    for resp in answered:  # MLflow's own answer, whatever it is
        assert FROM_MLFLOW in resp.headers, f"{where}: {resp.status_code} {resp.text[:200]}"
        assert resp.status_code not in (401, 403), f"{where}: {resp.text[:200]}"


def test_mlflow_routes_not_in_the_table_are_refused(
    mlflow_gateway: httpx.Client, keys: dict[str, str]
) -> None:
    for verb, path in [
        ("GET", "/metrics"),
        ("GET", "/api/2.0/mlflow/no-such-endpoint"),
        ("HEAD", "/"),
        ("PUT", "/api/2.0/mlflow/registered-models/alias"),
        ("POST", "/api/2.0/mlflow/registered-models/alias/"),
    ]:
        for headers in ({}, {API_KEY_HEADER: keys["alice"]}):
            resp = mlflow_gateway.request(verb, path, headers=headers)
            assert resp.status_code == 403 and FROM_MLFLOW not in resp.headers, (verb, path)
            if verb != "HEAD":
                assert resp.json() == {"error_code": "PERMISSION_DENIED", "message": NOT_CLASSIFIED}


def test_mlflow_listener_takes_the_key_from_either_header(
    mlflow_gateway: httpx.Client, keys: dict[str, str]
) -> None:
    path = "/api/2.0/mlflow/experiments/create"
    for headers in (
        {API_KEY_HEADER: keys["bob"]},
        {BEARER_HEADER: f"Bearer {keys['bob']}"},
    ):
        resp = mlflow_gateway.post(path, json={}, headers=headers)
        assert resp.status_code == 400 and FROM_MLFLOW in resp.headers, resp.text  # no name
    for empty in ("Bearer", "Bearer x"):  # no key, or not one
        assert mlflow_gateway.post(path, json={}, headers={BEARER_HEADER: empty}).status_code == 401


# -- identity -----------------------------------------------------------------------------------


def _submit_small_job(
    training: training_pb2_grpc.TrainingServiceStub, metadata: list[tuple[str, str]]
) -> training_pb2.TrainingJob:
    request = training_pb2.SubmitTrainingJobRequest(
        architecture="mlp", epochs=1, train_subset=64, idempotency_key=secrets.token_hex(8)
    )
    return training.SubmitTrainingJob(request, metadata=metadata, timeout=30).job


def test_forged_identity_never_reaches_a_service(
    mesh: Mesh,
    rest: httpx.Client,
    training: training_pb2_grpc.TrainingServiceStub,
    keys: dict[str, str],
) -> None:
    forged = "mallory-" + secrets.token_hex(4)
    # gRPC, protected: the service records the key's owner, not the header the caller sent.
    job = _submit_small_job(
        training, [(API_KEY_HEADER, keys["bob"]), (CLIENT_HEADER, forged), (CLIENT_HEADER, forged)]
    )
    assert job.submitted_by == "bob"
    training.CancelTrainingJob(
        training_pb2.CancelTrainingJobRequest(job_id=job.job_id),
        metadata=[(API_KEY_HEADER, keys["bob"])],
    )
    # REST, protected, the header in another case.
    resp = rest.post(
        "/v1/training/jobs",
        json={"architecture": "mlp", "epochs": 1, "train_subset": 64},
        headers={API_KEY_HEADER: keys["bob"], CLIENT_HEADER.upper(): forged},
    )
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["job"]["job_id"]
    assert resp.json()["job"]["submitted_by"] == "bob"
    resp = rest.post(
        f"/v1/training/jobs/{job_id}:cancel", json={}, headers={API_KEY_HEADER: keys["bob"]}
    )
    assert resp.status_code == 200, resp.text
    # Public routes, with no key: the service sees an anonymous caller.
    registry_log = mesh.log_dir / "registry.log"
    before = registry_log.read_text().count("ListExperiments client=anonymous")
    assert rest.get("/v1/experiments", headers={CLIENT_HEADER: forged}).status_code == 200
    channel_call = Method("/mlmesh.registry.v1.RegistryService/ListExperiments", False, False, ())
    gateway = f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"
    with grpc.insecure_channel(gateway) as channel:
        assert call_raw(channel, channel_call, [(CLIENT_HEADER, forged)]) is None
    deadline = time.monotonic() + 10
    while registry_log.read_text().count("ListExperiments client=anonymous") < before + 2:
        assert time.monotonic() < deadline, "the registry did not log both calls as anonymous"
        time.sleep(0.2)
    for log_file in mesh.log_dir.glob("*.log"):
        assert forged not in log_file.read_text(errors="replace"), log_file.name


# -- key rotation -------------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.fixture
def own_gateway(mesh: Mesh, tmp_path: Path) -> Iterator[tuple[Settings, Path, ApiKeysWatcher]]:
    """A second Envoy in front of the session's services, its keys from a file: (its settings,
    keys file, the launcher's watcher of it). The first key is carol's."""
    keys_file = tmp_path / "api-keys"
    _write_atomically(keys_file, f"carol={secrets.token_urlsafe(24)}\n")
    with second_gateway(
        mesh.settings, DESCRIPTOR, tmp_path, api_keys="", api_keys_file=keys_file
    ) as settings:
        watcher = ApiKeysWatcher(settings, tmp_path / ENVOY_KEYS_FILE)
        yield settings, keys_file, watcher


def _key_of(keys_file: Path, client: str) -> str:
    return dict(line.split("=", 1) for line in keys_file.read_text().split())[client]


def test_key_rotation_keeps_in_flight_requests(
    own_gateway: tuple[Settings, Path, ApiKeysWatcher],
) -> None:
    settings, keys_file, watcher = own_gateway
    address = f"{settings.gateway_host}:{settings.gateway_port}"
    old = _key_of(keys_file, "carol")
    new = secrets.token_urlsafe(24)
    base = f"http://{address}"
    with grpc.insecure_channel(address) as channel:
        training = training_pb2_grpc.TrainingServiceStub(channel)
        old_auth, new_auth = [(API_KEY_HEADER, old)], [(API_KEY_HEADER, new)]
        # A job that trains for a while (a full MNIST epoch), watched over gRPC and over REST:
        # both streams stay open across the rotation.
        job = training.SubmitTrainingJob(
            training_pb2.SubmitTrainingJobRequest(
                architecture="mlp", epochs=2, idempotency_key=secrets.token_hex(8)
            ),
            metadata=old_auth,
            timeout=30,
        ).job
        assert job.submitted_by == "carol"
        watch = training.WatchTrainingJob(
            training_pb2.WatchTrainingJobRequest(job_id=job.job_id), metadata=old_auth, timeout=120
        )
        assert next(watch).HasField("queued")
        with httpx.Client(base_url=base, timeout=120) as http:
            with http.stream(
                "GET", f"/v1/training/jobs/{job.job_id}:watch", headers={API_KEY_HEADER: old}
            ) as rest_watch:
                assert rest_watch.status_code == 200
                lines = rest_watch.iter_lines()
                assert "queued" in json.loads(next(lines))

                # Rotate: carol's old key goes, her new one comes, dave is added.
                _write_atomically(keys_file, f"carol={new}\ndave={secrets.token_urlsafe(24)}\n")
                assert watcher.poll()
                assert not watcher.poll(), "an unchanged file is not reloaded"
                deadline = time.monotonic() + 10
                while True:
                    old_status = http.get("/v1/audit-events", headers={API_KEY_HEADER: old})
                    new_status = http.get("/v1/audit-events", headers={API_KEY_HEADER: new})
                    if (old_status.status_code, new_status.status_code) == (401, 200):
                        break
                    assert time.monotonic() < deadline, (old_status, new_status)
                    time.sleep(0.1)
                # The MLflow listener's keys rotate with them.
                mlflow = f"{settings.gateway_mlflow_url}/api/2.0/mlflow/experiments/create"
                for key, status in ((old, 401), (new, 400)):  # 400: MLflow's, no name given
                    answer = http.post(mlflow, json={}, headers={BEARER_HEADER: f"Bearer {key}"})
                    assert answer.status_code == status, answer.text
                # The same gRPC connection: the old key is refused from now on.
                with pytest.raises(grpc.RpcError) as err:
                    training.GetTrainingJob(
                        training_pb2.GetTrainingJobRequest(job_id=job.job_id), metadata=old_auth
                    )
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

                # The streams opened with the old key are still being served: cancel the job
                # (with the new key) and both see it to the end.
                training.CancelTrainingJob(
                    training_pb2.CancelTrainingJobRequest(job_id=job.job_id), metadata=new_auth
                )
                grpc_events = list(watch)
                rest_events = [json.loads(line) for line in lines if line]
        assert grpc_events and grpc_events[-1].HasField("cancelled"), grpc_events
        assert rest_events and "cancelled" in rest_events[-1], rest_events
        assert watch.code() == grpc.StatusCode.OK

        # A bad keys file is refused: the keys in force stay.
        _write_atomically(keys_file, "carol=short\n")
        assert not watcher.poll()
        time.sleep(1.5)
        reply = training.GetTrainingJob(
            training_pb2.GetTrainingJobRequest(job_id=job.job_id), metadata=new_auth
        )
        assert reply.job.state == training_pb2.JOB_STATE_CANCELLED
    text = keys_file.with_name("envoy.log").read_text()
    assert old not in text and new not in text


# -- keys stay out of logs (last: after everything above has been logged) -----------------------


def test_keys_never_appear_in_logs(mesh: Mesh, keys: dict[str, str]) -> None:
    logs = sorted(mesh.log_dir.glob("*.log"))
    assert {"envoy.log", "registry.log", "training.log", "inference.log", "mlflow.log"} <= {
        p.name for p in logs
    }
    secrets_sent = [*keys.values(), WRONG_KEY]
    for log_file in logs:
        text = log_file.read_text(errors="replace")
        for key in secrets_sent:
            assert key not in text, f"an API key is in {log_file.name}"
    # The rendered Envoy config holds no key either: they are in the 0600 file Envoy watches.
    config = (mesh.settings.state_dir / "envoy.yaml").read_text()
    assert not any(key in config for key in keys.values())
    for name in (ENVOY_KEYS_FILE, ENVOY_MLFLOW_KEYS_FILE):
        assert (mesh.settings.state_dir / name).stat().st_mode & 0o777 == 0o600
