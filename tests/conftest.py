"""Shared fixtures: free ports, an isolated Settings, and the whole mesh started as a user would."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import new_api_key
from gateway.tls import ensure_mesh_certificates
from mlmesh.training.v1 import training_pb2, training_pb2_grpc
from services.common import db
from services.common.settings import Settings
from services.launcher.mesh import Mesh

SHARED_POSTGRES = "postgresql://postgres@127.0.0.1:5432"
SHARED_REDIS = "redis://127.0.0.1:6379"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings with unique databases, a Redis db of its own and free ports for everything,
    and the mesh's certificates in the state directory (as the launcher makes them), so that
    a test may also start a service or a gateway on its own."""
    tag = secrets.token_hex(4)
    values: dict[str, object] = {
        "database_url": f"{SHARED_POSTGRES}/mlmesh_t_{tag}",
        "mlflow_backend_store_uri": f"{SHARED_POSTGRES}/mlflow_t_{tag}",
        "redis_url": f"{SHARED_REDIS}/{9 + secrets.randbelow(6)}",
        "mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}",
        "registry_address": f"127.0.0.1:{free_port()}",
        "registry_ops_port": free_port(),
        "registry_health_port": free_port(),
        "training_address": f"127.0.0.1:{free_port()}",
        "training_ops_port": free_port(),
        "training_health_port": free_port(),
        "training_queue": f"arq:mlmesh-training-{tag}",
        "worker_ops_port": free_port(),
        "inference_address": f"127.0.0.1:{free_port()}",
        "inference_ops_port": free_port(),
        "inference_http_port": free_port(),
        "inference_health_port": free_port(),
        # One Inference process, whatever the cores (the default): two cores are shared by
        # the whole mesh here. test_inference_processes.py runs two.
        "inference_processes": 1,
        "gateway_port": free_port(),
        "gateway_admin_port": free_port(),
        "gateway_metrics_port": free_port(),
        "gateway_mlflow_port": free_port(),
        "state_dir": state_dir,
        "api_keys": ",".join(f"{c}={new_api_key(24)}" for c in ("alice", "bob", "erin", "dave")),
        # Roomy for the tests' own traffic (the fuzzing among it); erin gets small buckets
        # that tests/integration/test_rate_limits.py drains, and dave one.
        "rate_limits": (
            "predictions=10000/s:10000,training_submissions=1000/s:1000,"
            "registry_writes=1000/s:1000,predictions@erin=1/m:3,"
            "training_submissions@erin=1/m:2,registry_writes@erin=1/m:2,predictions@dave=1/m:4"
        ),
        "api_keys_file": None,
        "shutdown_grace_s": 3.0,
        # A change made around mlmesh is found within a second or two, not ten.
        "registry_alias_check_interval_s": 1.0,
        "worker_lease_s": 5.0,
        # Small enough for a test to go over it; a dataset cache of the run's own.
        "dataset_max_bytes": 8 * 1024 * 1024,
        "dataset_cache_dir": state_dir / "dataset-cache",
    }
    values.update(overrides)
    settings = Settings(**values)
    ensure_mesh_certificates(settings.mesh_tls)
    return settings


def metric_sample(text: str, name: str, **labels: str) -> float:
    """The first sample ``name`` of a /metrics text whose labels include ``labels`` (0 if none)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def drop_databases(settings: Settings) -> None:
    """Drop the databases a test run created on the shared server."""
    for url in (settings.database_url, settings.mlflow_backend_store_uri):
        asyncio.run(db.drop_database(url))


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The whole local mesh (MLflow, Registry, Envoy) on free ports, started by the launcher."""
    settings = isolated_settings(tmp_path_factory.mktemp("mesh"))
    try:
        with Mesh(settings) as running:
            yield running
    finally:
        drop_databases(settings)


@pytest.fixture(scope="session")
def keys(mesh: Mesh) -> dict[str, str]:
    """client -> API key of the running mesh."""
    return dict(pair.split("=", 1) for pair in mesh.settings.api_keys.split(","))


@pytest.fixture(scope="session")
def rest(mesh: Mesh) -> Iterator[httpx.Client]:
    """An HTTP client for the gateway, without a key."""
    with httpx.Client(base_url=mesh.settings.gateway_url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="session")
def gateway_channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    """A gRPC channel to the gateway (h2c)."""
    address = f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"
    with grpc.insecure_channel(address) as channel:
        yield channel


def cancel_live_jobs(mesh: Mesh, auth: list[tuple[str, str]]) -> None:
    """Cancel every queued or running training job of the mesh, and wait until none is live
    (a test that may have submitted real jobs leaves none running)."""
    live_states = (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)
    address = f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"
    with grpc.insecure_channel(address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:
            jobs = stub.ListTrainingJobs(
                training_pb2.ListTrainingJobsRequest(page_size=1000), metadata=auth
            ).jobs
            live = [j for j in jobs if j.state in live_states]
            if not live:
                return
            assert time.monotonic() < deadline, f"jobs would not stop: {live}"
            for job in live:
                try:
                    stub.CancelTrainingJob(
                        training_pb2.CancelTrainingJobRequest(job_id=job.job_id), metadata=auth
                    )
                except grpc.RpcError as err:  # it finished meanwhile
                    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            time.sleep(1)
