"""The Registry and Inference services in this process (``services.common.process.serving``),
each on a free port, against real PostgreSQL, Redis and an MLflow server of their own: the
Registry's transitions, refusals, audit, pagination and errors, called over real channels.

Beside the whole-mesh tests (tests/integration/test_registry.py), these start in seconds and
reach the servicers without Envoy in between; the client identity is the header the gateway
would set.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2 as pb
from mlmesh.registry.v1 import registry_pb2_grpc
from services.common import db
from services.common.events import MODEL_EVENTS_CHANNEL
from services.common.headers import CLIENT_HEADER
from services.common.process import serving
from services.common.server import aio_service_channel
from services.common.settings import Settings
from services.inference import server as inference_server
from services.launcher.mesh import http_ok
from services.launcher.process import Child, ChildSpec, Command
from services.registry import server as registry_server
from tests.conftest import free_port, isolated_settings
from tests.integration.models import log_classifier, register_without_artifacts

ANY = "127.0.0.1:0"  # a free port
MLFLOW_START_S = 180.0  # a new database runs every MLflow migration first


def as_client(client: str) -> list[tuple[str, str]]:
    """The identity the gateway forwards for an API key's client."""
    return [(CLIENT_HEADER, client)]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on a free port, over SQLite, artifacts served from a temp dir;
    run and stopped (with its workers) the way the launcher runs its children."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mlflow", "server", "--workers", "1"]
    argv += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    argv += ["--artifacts-destination", str(root / "artifacts")]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    spec = ChildSpec(
        name="mlflow",
        what=f"MLflow server at {uri}",
        command=lambda: Command(argv),
        ready=partial(http_ok, f"{uri}/health"),
    )
    child = Child(spec, spec.command(), root / "mlflow.log", os.environ)
    child.start()
    try:
        deadline = time.monotonic() + MLFLOW_START_S
        while not spec.ready():
            if child.exit_code() is not None:
                raise child.failure(f"exited with code {child.exit_code()}")
            if time.monotonic() > deadline:
                raise child.failure(f"not ready after {MLFLOW_START_S:.0f} s")
            time.sleep(0.5)
        yield uri
    finally:
        child.stop(30)


@pytest.fixture(scope="module")
def settings(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = isolated_settings(
        tmp_path_factory.mktemp("inprocess"),
        mlflow_tracking_uri=mlflow_uri,
        shutdown_grace_s=1.0,
        promotion_load_timeout_s=60.0,
    )
    yield settings
    asyncio.run(db.drop_database(settings.database_url))


@dataclass(frozen=True)
class Services:
    registry: registry_pb2_grpc.RegistryServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    settings: Settings


@pytest.fixture(scope="module")
async def services(settings: Settings) -> AsyncIterator[Services]:
    """Inference, then the Registry that asks it whether a version can be served."""
    async with serving(
        settings, ANY, free_port(), inference_server.build, health_address=ANY
    ) as inference:
        registry_settings = settings.model_copy(
            update={"registry_inference_target": inference.address}
        )
        async with (
            serving(
                registry_settings, ANY, free_port(), registry_server.build, health_address=ANY
            ) as registry,
            aio_service_channel(settings, registry.address) as registry_channel,
            aio_service_channel(settings, inference.address) as inference_channel,
        ):
            yield Services(
                registry_pb2_grpc.RegistryServiceStub(registry_channel),
                inference_pb2_grpc.InferenceServiceStub(inference_channel),
                registry_settings,
            )


def model(settings: Settings, prefix: str, accuracies: tuple[float, ...]) -> str:
    """A new registered model with a servable version per accuracy (v1 favours class 1...)."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    for favourite, accuracy in enumerate(accuracies, start=1):
        log_classifier(
            settings.mlflow_tracking_uri,
            name,
            favourite=favourite,
            metrics={"test_accuracy": accuracy},
        )
    return name


async def transition(
    services: Services, name: str, version: int, stage: str, *, client: str = "alice", **flags
) -> pb.TransitionModelVersionResponse:
    request = pb.TransitionModelVersionRequest(
        model_name=name, version=version, stage=stage, **flags
    )
    return await services.registry.TransitionModelVersion(request, metadata=as_client(client))


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def audit(services: Services, name: str, page_size: int = 0, token: str = ""):
    request = pb.ListAuditEventsRequest(model_name=name, page_size=page_size, page_token=token)
    return await services.registry.ListAuditEvents(request, metadata=as_client("alice"))


async def stages(services: Services, name: str) -> list[tuple[int, str, list[str]]]:
    reply = await services.registry.ListModelVersions(pb.ListModelVersionsRequest(name=name))
    return [(v.version, v.stage, list(v.aliases)) for v in reply.model_versions]


# -- transitions and audit ---------------------------------------------------------------------


async def test_transitions_move_aliases_archive_and_are_audited(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-moves", (0.9, 0.95, 0.5))
    first = await transition(services, name, 1, "production")
    assert (first.model_version.stage, list(first.model_version.aliases)) == (
        "Production",
        ["production"],
    )
    assert first.previous_version == 0
    assert first.audit_event.client == "alice"
    assert first.comparison.candidate_value == pytest.approx(0.9)

    second = await transition(
        services, name, 2, "Production", client="bob", archive_existing_versions=True
    )
    assert second.previous_version == 1
    assert list(second.archived_versions) == [1]
    assert second.comparison.production_version == 1 and not second.comparison.worse
    await transition(services, name, 3, "Staging", client="bob")
    assert await stages(services, name) == [
        (3, "Staging", ["staging"]),
        (2, "Production", ["production"]),
        (1, "Archived", []),
    ]

    events = (await audit(services, name)).audit_events
    assert [(e.client, e.version, e.from_stage, e.to_stage) for e in events] == [
        ("bob", 3, "None", "Staging"),
        ("bob", 2, "None", "Production"),
        ("alice", 1, "None", "Production"),
    ]
    assert events[1].previous_version == 1 and list(events[1].archived_versions) == [1]


async def test_audit_events_page_newest_first(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-pages", (0.5, 0.6, 0.7))
    for version in (1, 2, 3):
        await transition(services, name, version, "Production")
    pages, token = [], ""
    while True:
        page = await audit(services, name, page_size=2, token=token)
        pages.append([e.version for e in page.audit_events])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[3, 2], [1]]
    bad = await refused(audit(services, name, page_size=2, token="not-a-token"))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_transition_is_announced_to_inference_replicas(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-events", (0.9,))
    redis = Redis.from_url(services.settings.redis_url)
    try:
        async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(MODEL_EVENTS_CHANNEL)
            done = await transition(services, name, 1, "Production")
            deadline = time.monotonic() + 10
            while True:
                message = await pubsub.get_message(timeout=1.0)
                body = json.loads(message["data"]) if message else {}
                if body.get("model_name") == name:  # other meshes share this Redis
                    break
                assert time.monotonic() < deadline, "no model event"
    finally:
        await redis.aclose()
    assert body == {
        "model_name": name,
        "version": 1,
        "stage": "Production",
        "event_id": done.audit_event.event_id,
        "action": "transition",
    }


# -- refusals: nothing moves, nothing is audited -------------------------------------------------


async def test_a_worse_candidate_needs_force(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-worse", (0.987, 0.11))
    await transition(services, name, 1, "Production")
    err = await refused(transition(services, name, 2, "Production"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "v2's test_accuracy 0.11 is worse than production v1's 0.987" in err.details()
    assert await stages(services, name) == [(2, "None", []), (1, "Production", ["production"])]
    assert [e.version for e in (await audit(services, name)).audit_events] == [1]

    forced = await transition(services, name, 2, "Production", force=True)
    assert forced.forced and forced.comparison.worse
    assert forced.audit_event.note.startswith("forced: v2's test_accuracy 0.11 is worse")


async def test_moving_production_away_needs_force(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-away", (0.9,))
    await transition(services, name, 1, "Production")
    for stage in ("Staging", "Archived"):
        err = await refused(transition(services, name, 1, stage))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "without a production version" in err.details()
    assert await stages(services, name) == [(1, "Production", ["production"])]


async def test_a_version_inference_cannot_load_is_never_promoted(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-broken", (0.9,))
    await transition(services, name, 1, "Production")
    uri = services.settings.mlflow_tracking_uri
    assert await asyncio.to_thread(register_without_artifacts, uri, name) == 2
    for stage in ("Production", "Staging"):
        err = await refused(transition(services, name, 2, stage))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"version 2 of {name!r} cannot be served" in err.details()
    assert await stages(services, name) == [(2, "None", []), (1, "Production", ["production"])]
    assert [e.version for e in (await audit(services, name)).audit_events] == [1]


# -- errors and pagination of reads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"model_name": "x", "version": 1, "stage": "Retired"}, "INVALID_ARGUMENT", "stage"),
        ({"model_name": "x", "stage": "Production"}, "INVALID_ARGUMENT", "version must be"),
        ({"version": 1, "stage": "Production"}, "INVALID_ARGUMENT", "model_name is required"),
        ({"model_name": "ip-none", "version": 4, "stage": "Staging"}, "NOT_FOUND", "ip-none"),
    ],
)
async def test_bad_transitions_name_the_problem(
    services: Services, fields: dict, code: str, words: str
) -> None:
    request = pb.TransitionModelVersionRequest(**fields)
    call = services.registry.TransitionModelVersion(request, metadata=as_client("alice"))
    err = await refused(call)
    assert err.code() == getattr(grpc.StatusCode, code)
    assert words in err.details()


async def test_registered_models_page_and_unknown_ones_are_not_found(services: Services) -> None:
    prefix = f"ip-list-{secrets.token_hex(2)}"
    names = [await asyncio.to_thread(model, services.settings, prefix, (0.5,)) for _ in range(3)]
    seen, token = [], ""
    while True:
        page = await services.registry.ListRegisteredModels(
            pb.ListRegisteredModelsRequest(
                filter=f"name LIKE '{prefix}-%'", page_size=2, page_token=token
            )
        )
        assert len(page.registered_models) <= 2
        seen += [m.name for m in page.registered_models]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(names)
    err = await refused(
        services.registry.GetRegisteredModel(pb.GetRegisteredModelRequest(name=f"{prefix}-no"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(
        services.registry.ListRegisteredModels(pb.ListRegisteredModelsRequest(page_size=-1))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- Inference, in this process too ------------------------------------------------------------


async def test_inference_serves_what_the_registry_promoted(services: Services) -> None:
    name = await asyncio.to_thread(model, services.settings, "ip-serve", (0.5, 0.9))
    loaded = await services.inference.LoadModelVersion(
        inference_pb2.LoadModelVersionRequest(model_name=name, model_version="2")
    )
    assert loaded.runtime
    await transition(services, name, 1, "Production")
    await transition(services, name, 2, "Production")
    image = inference_pb2.PredictRequest(image=[0.0] * 784, model_name=name)
    deadline = time.monotonic() + 10
    while True:  # the alias move reaches inference through Redis within a moment
        answer = await services.inference.Predict(image, metadata=as_client("alice"))
        if answer.model_version == 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert (answer.model_name, answer.model_version) == (name, 2)
    assert answer.prediction == 2  # v2 favours class 2
    assert len(answer.probabilities) == 10


# -- the lifecycle itself -----------------------------------------------------------------------


async def test_serving_starts_healthy_and_stops_draining(settings: Settings) -> None:
    async with serving(
        settings, ANY, free_port(), registry_server.build, health_address=ANY
    ) as running:
        async with aio_service_channel(settings, running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(running.health_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        address = running.address
        assert not running.backends.pool.is_closing()
    assert running.backends.pool.is_closing()  # every client closed
    async with grpc.aio.insecure_channel(address) as channel:
        err = await refused(
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        )
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
