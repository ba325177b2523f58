"""/ready names each dependency, and a service drains on SIGTERM after flipping its health."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher.mesh import child_env
from tests.conftest import drop_databases, free_port, isolated_settings


def test_ready_is_503_naming_the_missing_dependency(tmp_path: Path) -> None:
    # A Registry whose MLflow is absent (nothing listens there); PostgreSQL and Redis are real.
    settings = isolated_settings(tmp_path, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    ops = f"http://127.0.0.1:{settings.registry_ops_port}"
    log = (tmp_path / "registry.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.registry"],
        env=child_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = httpx.get(f"{ops}/ready", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "registry.log").read_text()
                assert time.monotonic() < deadline, "registry ops port never opened"
                time.sleep(0.5)
        assert resp.status_code == 503
        body = resp.json()
        assert body["status"] == "not_ready"
        assert (body["mlflow"], body["redis"], body["postgres"]) == (
            "disconnected",
            "connected",
            "connected",
        )
        assert body["errors"]["mlflow"]
        assert httpx.get(f"{ops}/health").json() == {"status": "healthy"}

        # SIGTERM: health turns NOT_SERVING first, then the process exits cleanly.
        # On the plain-text health port, as the probes of Kubernetes and compose ask.
        with grpc.insecure_channel(settings.health_address(settings.registry_address)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        drop_databases(settings)
