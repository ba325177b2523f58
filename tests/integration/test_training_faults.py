"""Training under faults: MLflow going away makes jobs wait and retry, never fail for good."""

from __future__ import annotations

import asyncio
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from arq.connections import ArqRedis

from services.common import db
from services.common.settings import Settings
from services.datasets.service import Datasets
from services.launcher.mesh import Mesh, child_env
from services.training.jobs import Job, JobStore
from services.training.params import Submission
from services.training.service import Training
from tests.conftest import free_port


class _Relay(socketserver.ThreadingTCPServer):
    """A TCP relay to MLflow that the test switches on: 'MLflow is back'."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", port), _Pipe)


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with socket.create_connection(self.server.upstream) as up:

            def pump(src: socket.socket, dst: socket.socket) -> None:
                try:
                    while data := src.recv(65536):
                        dst.sendall(data)
                except OSError:
                    pass
                finally:
                    for s in (src, dst):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass

            back = threading.Thread(target=pump, args=(up, self.request), daemon=True)
            back.start()
            pump(self.request, up)
            back.join(timeout=30)


async def _submit(settings: Settings) -> str:
    pool = await db.connect_pool(settings.database_url)
    redis = ArqRedis.from_url(settings.redis_url)
    try:
        jobs = JobStore(pool, redis)
        datasets = Datasets.from_settings(settings, pool, jobs.using_dataset)
        training = Training(jobs, redis, settings.training_queue, datasets)
        params = {"train_subset": 1000, "epochs": 1}
        sub = Submission(params | {"experiment_name": "it-outage", "model_name": "it-outage"})
        return (await training.submit(sub, "tester")).job_id
    finally:
        await redis.aclose()
        await pool.close()


async def _job(settings: Settings, job_id: str) -> Job:
    pool = await db.connect_pool(settings.database_url)
    try:
        job = await JobStore(pool, None).get(job_id)  # type: ignore[arg-type]
        assert job is not None
        return job
    finally:
        await pool.close()


@pytest.fixture()
def outage(mesh: Mesh, tmp_path: Path) -> Iterator[tuple[Settings, int]]:
    """A worker of its own, on a queue of its own, whose MLflow (a relay) is down."""
    relay_port = free_port()
    settings = mesh.settings.model_copy(
        update={
            "training_queue": f"arq:it-outage-{secrets.token_hex(3)}",
            "worker_ops_port": 0,
            "mlflow_tracking_uri": f"http://127.0.0.1:{relay_port}",
        }
    )
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.training.worker"],
        env=child_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield settings, relay_port
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
    log.close()


def test_mlflow_outage_makes_the_job_wait_then_finish(
    mesh: Mesh, outage: tuple[Settings, int]
) -> None:
    settings, relay_port = outage
    job_id = asyncio.run(_submit(settings))
    deadline = time.monotonic() + 180
    while True:  # the first attempt meets a dead MLflow and is re-queued, not failed
        job = asyncio.run(_job(settings, job_id))
        assert job.state != "failed", job.error
        if job.attempts >= 1 and job.state == "queued" and "waiting to retry" in job.error:
            break
        assert time.monotonic() < deadline, f"no retry seen: {job}"
        time.sleep(0.5)
    assert "MLflow" in job.error or "connect" in job.error.lower()

    mlflow = urlsplit(mesh.settings.mlflow_tracking_uri)
    relay = _Relay(relay_port, (mlflow.hostname, mlflow.port))
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        assert httpx.get(f"http://127.0.0.1:{relay_port}/health").status_code == 200
        deadline = time.monotonic() + 300
        while job.state not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job never finished: {job}"
            time.sleep(1)
            job = asyncio.run(_job(settings, job_id))
        assert job.state == "succeeded", job.error
        assert job.attempts >= 2 and job.model_version >= 1
    finally:
        relay.shutdown()
        relay.server_close()
