"""Faults, with nothing lost: a mesh whose PostgreSQL, Redis and MLflow are this module's own.

The module starts private PostgreSQL, Redis and MLflow servers on free ports with the
launcher's own specs (services/launcher/backing.py, mesh.py), then a mesh that reuses them, as
it reuses any server that already answers. So the tests may stop and restart them; the
machine's shared servers are never touched. Every fault is followed by recovery without a
restart of any mlmesh service (the same processes throughout), and PostgreSQL's job records
and MLflow's registry are counted: every job succeeds exactly once, one model version each.
SIGTERM, which does end services, comes last.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient

from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from mlmesh.training.v1 import training_pb2 as pb
from mlmesh.training.v1 import training_pb2_grpc
from services.common.server import aio_service_channel
from services.common.settings import Settings
from services.launcher.backing import PrivatePostgres, PrivateRedis
from services.launcher.mesh import Mesh, child_env, mlflow_spec
from services.launcher.process import Child, ChildSpec
from tests.conftest import free_port, isolated_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "faults-model"
# Tiny jobs: a few hundred images, one epoch; the time goes to start-up, logging, registering.
TINY = {"train_subset": 500, "epochs": 1, "experiment_name": "it-faults", "model_name": MODEL}
REPORT_WITHIN_S = 5.0  # the bound on /ready reporting a missing dependency
RECOVER_WITHIN_S = 60.0
JOB_TIMEOUT_S = 240.0
SERVICES = ("registry", "training", "inference", "envoy")
FIGURES: dict[str, object] = {}  # what the tests saw, printed at the end (pytest -s)


# -- backing servers of this module's own ---------------------------------------------------------


class Backing:
    """One backing server started from the launcher's spec for it; stop() and start() at will."""

    def __init__(self, spec: ChildSpec, env: dict[str, str], log_dir: Path) -> None:
        self.spec = spec
        self._env = env
        self._log_dir = log_dir
        self._child: Child | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        assert self._child is None, f"{self.spec.what} is running already"
        assert not self.spec.ready(), f"something else answers as {self.spec.what}"
        if self.spec.install is not None:
            self.spec.install()
        child = Child(
            self.spec, self.spec.command(), self._log_dir / f"{self.spec.name}.log", self._env
        )
        child.start()
        self._child = child
        deadline = time.monotonic() + timeout_s
        while not self.spec.ready():
            code = child.exit_code()
            assert code is None, str(child.failure(f"exited with code {code}"))
            assert time.monotonic() < deadline, str(child.failure("not ready in time"))
            time.sleep(0.2)
        if self.spec.after_ready is not None:
            self.spec.after_ready()

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop(30.0)
            self._child = None


@dataclass
class Faults:
    """The running mesh, its backing servers, and what the tests keep across faults."""

    mesh: Mesh
    postgres: Backing
    redis: Backing
    mlflow: Backing
    keys: dict[str, str]
    channel: grpc.Channel
    service_pids: dict[str, int]
    worker_ops_port: int = 0  # the returning worker's (the mesh's own is SIGKILLed first)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)  # every job this module submitted

    @property
    def settings(self) -> Settings:
        return self.mesh.settings

    def auth(self, client: str = "alice") -> list[tuple[str, str]]:
        return [("x-api-key", self.keys[client])]

    @property
    def training(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(self.channel)

    @property
    def inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.channel)

    def ready_urls(self) -> dict[str, str]:
        """Every /ready there is: each process's ops port and the gateway's."""
        s = self.settings
        urls = {
            "registry": f"http://127.0.0.1:{s.registry_ops_port}/ready",
            "training": f"http://127.0.0.1:{s.training_ops_port}/ready",
            "inference": f"http://127.0.0.1:{s.inference_ops_port}/ready",
            "gateway": f"{s.gateway_url}/ready",
        }
        if self.worker_ops_port:
            urls["worker"] = f"http://127.0.0.1:{self.worker_ops_port}/ready"
        return urls

    def start_worker(self, log_path: Path) -> subprocess.Popen[bytes]:
        """A training worker started the way the launcher starts one, with /ready of its own."""
        self.worker_ops_port = free_port()
        settings = self.settings.model_copy(update={"worker_ops_port": self.worker_ops_port})
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.training.worker"],
                env=child_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.workers.append(proc)
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{self.worker_ops_port}/health"
        while not _answers(url):
            assert proc.poll() is None, f"the worker exited; see {log_path}"
            assert time.monotonic() < deadline, f"the worker did not start; see {log_path}"
            time.sleep(0.25)
        return proc

    def submit(self, **overrides: object) -> pb.TrainingJob:
        job = self.training.SubmitTrainingJob(
            pb.SubmitTrainingJobRequest(**{**TINY, **overrides}), metadata=self.auth(), timeout=10
        ).job
        assert job.state == pb.JOB_STATE_QUEUED
        self.jobs.append(job.job_id)
        return job

    def job(self, job_id: str) -> pb.TrainingJob:
        request = pb.GetTrainingJobRequest(job_id=job_id)
        return self.training.GetTrainingJob(request, metadata=self.auth(), timeout=10).job

    def wait_job(
        self, job_id: str, done: Callable[[pb.TrainingJob], bool], timeout_s: float
    ) -> pb.TrainingJob:
        deadline = time.monotonic() + timeout_s
        while not done(job := self.job(job_id)):
            assert job.state != pb.JOB_STATE_FAILED, job.error
            assert time.monotonic() < deadline, f"job {job_id}: {job}"
            time.sleep(0.3)
        return job

    def finished(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> pb.TrainingJob:
        job = self.wait_job(job_id, lambda j: j.state in TERMINAL, timeout_s)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        return job

    def predict(
        self, image: np.ndarray, *, no_cache: bool = False
    ) -> inference_pb2.PredictResponse:
        metadata = self.auth() + ([("cache-control", "no-cache")] if no_cache else [])
        request = inference_pb2.PredictRequest(image=image.tolist(), model_name=MODEL)
        return self.inference.Predict(request, metadata=metadata, timeout=10)

    def assert_same_services(self) -> None:
        """No mlmesh service was restarted: the processes the mesh started are all alive."""
        assert {n: p for n, p in self.mesh.pids().items() if n in SERVICES} == self.service_pids
        for name, pid in self.service_pids.items():
            assert _alive(pid), f"{name} (pid {pid}) is gone"


TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _image() -> np.ndarray:
    return np.random.default_rng(secrets.randbits(32)).random(784, dtype=np.float32)


@pytest.fixture(scope="module")
def faults() -> Iterator[Faults]:
    # Not pytest's tmp_path: its parents are 0700, and as root the private PostgreSQL runs as
    # the postgres user, which must reach its data directory (as in test_launcher.py).
    base = Path(tempfile.mkdtemp(prefix="mlmesh-faults-"))
    base.chmod(0o755)
    state_dir = base / "state"
    logs = state_dir / "logs"
    pg, redis_port = free_port(), free_port()
    settings = isolated_settings(
        state_dir,
        database_url=f"postgresql://postgres@127.0.0.1:{pg}/mlmesh",
        mlflow_backend_store_uri=f"postgresql://postgres@127.0.0.1:{pg}/mlflow",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        training_reconcile_interval_s=2.0,
        default_model_name=MODEL,
    )
    settings = settings.model_copy(update={"state_dir": state_dir.resolve()})
    env = child_env(settings)
    postgres = Backing(
        PrivatePostgres(
            [settings.database_url, settings.mlflow_backend_store_uri], state_dir / "postgres", logs
        ).spec("postgres"),
        env,
        logs,
    )
    redis = Backing(PrivateRedis(settings.redis_url, state_dir / "redis", logs).spec(), env, logs)
    mlflow = Backing(mlflow_spec(settings), env, logs)
    started: list[Backing] = []
    try:
        for backing in (postgres, redis, mlflow):
            backing.start()
            started.append(backing)
        with Mesh(settings) as mesh:  # reuses the three: each already answers
            keys = dict(pair.split("=", 1) for pair in mesh.settings.api_keys.split(","))
            pids = {n: p for n, p in mesh.pids().items() if n in SERVICES}
            assert set(pids) == set(SERVICES), "the mesh started a backing server of its own"
            address = f"{settings.gateway_host}:{settings.gateway_port}"
            with grpc.insecure_channel(address) as channel:
                state = Faults(mesh, postgres, redis, mlflow, keys, channel, pids)
                try:
                    yield state
                finally:
                    for worker in state.workers:
                        if worker.poll() is None:
                            worker.terminate()
                            try:
                                worker.wait(30)
                            except subprocess.TimeoutExpired:
                                worker.kill()
                                worker.wait()
    finally:
        for backing in reversed(started):
            backing.stop()
        print("\nfault figures:", *(f"  {k}: {v}" for k, v in FIGURES.items()), sep="\n")
        shutil.rmtree(base, ignore_errors=True)


# -- observations ------------------------------------------------------------------------------


def until_ready_reports(
    faults: Faults, dependency: str | None, timeout_s: float, since: float
) -> dict[str, float]:
    """Seconds (from ``since``) until every /ready reports ``dependency`` disconnected with a
    503, or, for None, ready with a 200; fails after ``timeout_s``."""
    urls = faults.ready_urls()
    seen: dict[str, float] = {}
    last: dict[str, object] = {}
    with httpx.Client(timeout=5.0) as http:
        while True:
            for name, url in urls.items():
                if name in seen:
                    continue
                try:
                    resp = http.get(url)
                    body = resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    last[name] = repr(exc)
                    continue
                last[name] = (resp.status_code, body)
                if dependency is None:
                    hit = resp.status_code == 200 and body.get("status") == "ready"
                else:
                    hit = resp.status_code == 503 and body.get(dependency) == "disconnected"
                if hit:
                    seen[name] = round(time.monotonic() - since, 2)
            if len(seen) == len(urls):
                return seen
            assert time.monotonic() - since < timeout_s, f"/ready after {timeout_s} s: {last}"
            time.sleep(0.1)


async def _query(faults: Faults, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(faults.settings.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def query(faults: Faults, sql: str, *args: object) -> list[asyncpg.Record]:
    return asyncio.run(_query(faults, sql, *args))


def assert_succeeded_once(faults: Faults, job_id: str) -> int:
    """The job's record says succeeded, with one succeeded event, and MLflow holds exactly one
    version of the model made by this job; returns that version."""
    [row] = query(
        faults,
        "SELECT state, model_version, (SELECT count(*) FROM training_job_events e"
        " WHERE e.job_id = j.job_id AND e.event->>'type' = 'succeeded') AS successes"
        " FROM training_jobs j WHERE job_id = $1",
        job_id,
    )
    assert (row["state"], row["successes"]) == ("succeeded", 1), dict(row)
    client = MlflowClient(tracking_uri=faults.settings.mlflow_tracking_uri)
    versions = [
        int(v.version)
        for v in client.search_model_versions(f"name = '{MODEL}'")
        if client.get_run(v.run_id).data.tags.get("mlmesh.job_id") == job_id
    ]
    assert versions == [row["model_version"]], versions
    return row["model_version"]


# -- the faults, in order --------------------------------------------------------------------------


def test_sigkill_of_the_worker_mid_job_then_a_worker_returns(
    faults: Faults, tmp_path: Path
) -> None:
    # The mesh's one worker is the only worker: it takes the job.
    job = faults.submit(train_subset=1000)
    running = faults.wait_job(job.job_id, lambda j: bool(j.mlflow_run_id), 120)
    pid = int(running.worker.rsplit(":", 1)[1])
    assert pid == faults.mesh.pids()["worker"]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # No worker now: the job stays running (its lease lapses), neither lost nor finished.
    assert faults.job(job.job_id).state == pb.JOB_STATE_RUNNING

    faults.start_worker(tmp_path / "worker-returned.log")
    returned_at = time.monotonic()
    finished = faults.finished(job.job_id)
    FIGURES["sigkill: worker back after (s)"] = round(returned_at - killed_at, 1)
    FIGURES["sigkill: job done after the worker returned (s)"] = round(
        time.monotonic() - returned_at, 1
    )
    assert finished.attempts == 2 and finished.worker != running.worker
    events = list(
        faults.training.WatchTrainingJob(
            pb.WatchTrainingJobRequest(job_id=job.job_id), metadata=faults.auth(), timeout=30
        )
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("started") == 2 and kinds.count("succeeded") == 1, kinds
    client = MlflowClient(tracking_uri=faults.settings.mlflow_tracking_uri)
    assert client.get_run(running.mlflow_run_id).info.status == "KILLED"
    assert client.get_run(finished.mlflow_run_id).info.status == "FINISHED"
    assert_succeeded_once(faults, job.job_id)
    faults.assert_same_services()


@pytest.fixture(scope="module")
def loaded(faults: Faults) -> int:
    """MODEL's production version, loaded by the Inference service."""
    version = max(
        int(v.version)
        for v in MlflowClient(
            tracking_uri=faults.settings.mlflow_tracking_uri
        ).search_model_versions(f"name = '{MODEL}'")
    )
    faults.registry.TransitionModelVersion(
        registry_pb2.TransitionModelVersionRequest(
            model_name=MODEL, version=version, stage="production"
        ),
        metadata=faults.auth("bob"),
        timeout=30,
    )
    deadline = time.monotonic() + 30
    while faults.predict(_image()).model_version != version:
        assert time.monotonic() < deadline, "production never served the promoted version"
        time.sleep(0.1)
    return version


def test_mlflow_outage(faults: Faults, loaded: int) -> None:
    faults.mlflow.stop()
    down = time.monotonic()
    reported = until_ready_reports(faults, "mlflow", REPORT_WITHIN_S, down)
    FIGURES["mlflow down: /ready reported after (s)"] = reported

    # The loaded model keeps answering, computed afresh (not from the cache).
    answers = [faults.predict(_image(), no_cache=True) for _ in range(5)]
    assert {(a.model_name, a.model_version, a.cached) for a in answers} == {(MODEL, loaded, False)}
    # What needs MLflow says so: UNAVAILABLE, never a 500 or a hang.
    with pytest.raises(grpc.RpcError) as err:
        faults.registry.ListRegisteredModels(registry_pb2.ListRegisteredModelsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()

    # A job submitted meanwhile is accepted, meets the outage, and waits (queued, not failed).
    job = faults.submit()
    waiting = faults.wait_job(
        job.job_id,
        lambda j: j.attempts >= 1 and j.state == pb.JOB_STATE_QUEUED and "retry" in j.error,
        120,
    )
    FIGURES["mlflow down: job waiting, error"] = waiting.error[:100]
    assert [faults.predict(_image(), no_cache=True).model_version for _ in range(3)] == [loaded] * 3

    faults.mlflow.start()
    back = time.monotonic()
    FIGURES["mlflow back: outage lasted (s)"] = round(back - down, 1)
    FIGURES["mlflow back: /ready recovered after (s)"] = until_ready_reports(
        faults, None, RECOVER_WITHIN_S, back
    )
    finished = faults.finished(job.job_id)
    FIGURES["mlflow back: waiting job done after (s), attempts"] = (
        round(time.monotonic() - back, 1),
        finished.attempts,
    )
    assert finished.attempts >= 2
    assert_succeeded_once(faults, job.job_id)
    assert faults.registry.ListRegisteredModels(
        registry_pb2.ListRegisteredModelsRequest(), timeout=30
    ).registered_models
    faults.assert_same_services()


def test_redis_outage(faults: Faults, loaded: int) -> None:
    # A job that is running when Redis goes: it must still finish, once.
    during = faults.submit()
    faults.wait_job(during.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, 120)
    faults.redis.stop()
    down = time.monotonic()
    FIGURES["redis down: /ready reported after (s)"] = until_ready_reports(
        faults, "redis", REPORT_WITHIN_S, down
    )

    # Training submissions are refused while their rate limit cannot be checked.
    with pytest.raises(grpc.RpcError) as err:
        faults.submit()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    # Predictions are served uncached, the same image twice included; the outage lasts past
    # the worker's lease and a few rounds of the reconciler, and the running job keeps its
    # lease in PostgreSQL throughout (else it would be taken over and trained twice).
    image = _image()
    served = 0
    while time.monotonic() - down < faults.settings.worker_lease_s + 3:
        answers = [faults.predict(image), faults.predict(_image())]
        assert {(a.model_version, a.cached) for a in answers} == {(loaded, False)}
        served += len(answers)
        [row] = query(
            faults,
            "SELECT state, lease_until > now() AS leased FROM training_jobs WHERE job_id = $1",
            during.job_id,
        )
        assert row["state"] == "succeeded" or row["leased"], dict(row)
        time.sleep(0.5)
    FIGURES["redis down: predictions served uncached"] = served

    faults.redis.start()  # empty: the queue and the cache are gone with the old one
    back = time.monotonic()
    FIGURES["redis back: outage lasted (s)"] = round(back - down, 1)
    FIGURES["redis back: /ready recovered after (s)"] = until_ready_reports(
        faults, None, RECOVER_WITHIN_S, back
    )
    image = _image()
    deadline = time.monotonic() + 10
    while not faults.predict(image).cached:
        assert time.monotonic() < deadline, "caching did not resume after Redis returned"
        time.sleep(0.2)
    FIGURES["redis back: caching resumed after (s)"] = round(time.monotonic() - back, 1)
    after = faults.submit()  # queueing resumes
    faults.finished(during.job_id)
    faults.finished(after.job_id)
    FIGURES["redis back: both jobs done after (s)"] = round(time.monotonic() - back, 1)
    assert_succeeded_once(faults, during.job_id)
    assert_succeeded_once(faults, after.job_id)
    faults.assert_same_services()


def test_postgres_restart(faults: Faults, loaded: int) -> None:
    # A job in the middle of its training loop, which records every batch in PostgreSQL.
    during = faults.submit(train_subset=3000)
    faults.wait_job(during.job_id, lambda j: j.progress.fraction > 0, 180)
    faults.postgres.stop()
    down = time.monotonic()
    FIGURES["postgres down: /ready reported after (s)"] = until_ready_reports(
        faults, "postgres", REPORT_WITHIN_S, down
    )
    # Serving does not need PostgreSQL; the outage lasts a few of the job's batches.
    while time.monotonic() - down < 4:
        assert faults.predict(_image(), no_cache=True).model_version == loaded
        time.sleep(0.3)

    faults.postgres.start()
    back = time.monotonic()
    FIGURES["postgres back: outage lasted (s)"] = round(back - down, 1)
    FIGURES["postgres back: /ready recovered after (s)"] = until_ready_reports(
        faults, None, RECOVER_WITHIN_S, back
    )
    # Each service works on its reconnected pool: the Registry's audit log, Training's jobs.
    events = faults.registry.ListAuditEvents(
        registry_pb2.ListAuditEventsRequest(model_name=MODEL), metadata=faults.auth(), timeout=10
    ).audit_events
    assert [(e.version, e.to_stage) for e in events][:1] == [(loaded, "Production")], events
    after = faults.submit()
    faults.finished(during.job_id)
    faults.finished(after.job_id)
    FIGURES["postgres back: both jobs done after (s)"] = round(time.monotonic() - back, 1)
    assert_succeeded_once(faults, during.job_id)
    assert_succeeded_once(faults, after.job_id)
    faults.assert_same_services()


def test_nothing_was_lost(faults: Faults) -> None:
    rows = query(faults, "SELECT job_id, state, model_version, attempts FROM training_jobs")
    assert {r["job_id"] for r in rows} == set(faults.jobs)
    assert {r["state"] for r in rows} == {"succeeded"}, [dict(r) for r in rows]
    client = MlflowClient(tracking_uri=faults.settings.mlflow_tracking_uri)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    by_job = sorted(client.get_run(v.run_id).data.tags["mlmesh.job_id"] for v in versions)
    assert by_job == sorted(faults.jobs), "a job registered no version, or more than one"
    assert sorted(int(v.version) for v in versions) == sorted(r["model_version"] for r in rows)
    FIGURES["jobs: submitted, succeeded, versions, attempts"] = (
        len(faults.jobs),
        len(rows),
        len(versions),
        sorted(r["attempts"] for r in rows),
    )
    faults.assert_same_services()


# -- SIGTERM, last: it ends the services ---------------------------------------------------------


async def _drains(
    settings: Settings,
    address: str,
    pid: int,
    start: Callable[[grpc.aio.Channel], Awaitable[object]],
    in_flight: Callable[[], Awaitable[None]],
    release: Callable[[], Awaitable[None]],
) -> dict[str, float]:
    """SIGTERM the service at ``address`` while ``start``'s request is in flight: its health
    turns NOT_SERVING while the request is still open, then the request finishes OK (once
    ``release``d)."""
    async with aio_service_channel(settings, address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        call = asyncio.ensure_future(start(channel))
        await in_flight()
        assert not call.done()
        os.kill(pid, signal.SIGTERM)
        sent = time.monotonic()
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        flipped = time.monotonic() - sent
        assert not call.done(), "the request ended before health turned NOT_SERVING"
        await release()
        await asyncio.wait_for(call, 30)  # raises if the request failed
        answered = time.monotonic() - sent
    return {"health flipped (s)": round(flipped, 3), "in-flight answered (s)": round(answered, 3)}


async def _locked_table_drains(
    faults: Faults, service: str, table: str, query_start: str, start
) -> dict[str, float]:
    """The in-flight request reads ``table``, which the test holds locked until released; it
    is in flight once a query holding ``query_start`` waits for the lock."""
    conn = await asyncpg.connect(faults.settings.database_url)
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

        async def waiting() -> int:
            # Inside the locking transaction, pg_stat_activity is a snapshot taken at its
            # first read: drop it before each look.
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            return await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND position($1 in query) > 0",
                query_start,
            )

        async def in_flight() -> None:
            deadline = time.monotonic() + 10
            while not await waiting():
                assert time.monotonic() < deadline, f"no request waits on {table}"
                await asyncio.sleep(0.05)

        address = getattr(faults.settings, f"{service}_address")
        return await _drains(
            faults.settings, address, faults.service_pids[service], start, in_flight,
            lock.rollback,
        )  # fmt: skip
    finally:
        await conn.close()


def exit_code(pid: int, timeout_s: float = 30.0) -> int:
    """The exit code of a child of this process (the mesh runs in it), once it has exited."""
    deadline = time.monotonic() + timeout_s
    while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        assert time.monotonic() < deadline, f"pid {pid} did not exit"
        time.sleep(0.1)
    return os.waitstatus_to_exitcode(status[1])


def test_sigterm_drains_every_service(faults: Faults, loaded: int) -> None:
    job_id = faults.jobs[0]
    alice = faults.auth()

    async def registry_call(channel: grpc.aio.Channel) -> object:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        reply = await stub.ListAuditEvents(
            registry_pb2.ListAuditEventsRequest(model_name=MODEL), metadata=alice, timeout=30
        )
        assert reply.audit_events
        return reply

    async def training_call(channel: grpc.aio.Channel) -> object:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        reply = await stub.GetTrainingJob(
            pb.GetTrainingJobRequest(job_id=job_id), metadata=alice, timeout=30
        )
        assert reply.job.state == pb.JOB_STATE_SUCCEEDED
        return reply

    FIGURES["sigterm registry"] = asyncio.run(
        _locked_table_drains(
            faults, "registry", "audit_events", "SELECT * FROM audit_events", registry_call
        )
    )
    assert exit_code(faults.service_pids["registry"]) == 0
    FIGURES["sigterm training"] = asyncio.run(
        _locked_table_drains(
            faults,
            "training",
            "training_jobs",
            "SELECT * FROM training_jobs WHERE job_id",
            training_call,
        )
    )
    assert exit_code(faults.service_pids["training"]) == 0

    # Inference: a prediction stream that is open across the SIGTERM keeps being answered.
    first_answered = asyncio.Event()
    more = asyncio.Event()

    async def requests():
        image = inference_pb2.Image(pixels=_image().tolist())
        yield inference_pb2.PredictStreamRequest(request_id="before", image=image, model_name=MODEL)
        await more.wait()
        for n in range(3):
            yield inference_pb2.PredictStreamRequest(
                request_id=f"after-{n}", image=image, model_name=MODEL
            )

    async def inference_call(channel: grpc.aio.Channel) -> object:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        answers = []
        async for answer in stub.PredictStream(requests(), metadata=alice, timeout=30):
            answers.append(answer)
            first_answered.set()
        assert [a.request_id for a in answers] == ["before", "after-0", "after-1", "after-2"]
        assert {a.model_version for a in answers} == {loaded}
        return answers

    async def release() -> None:
        more.set()

    FIGURES["sigterm inference"] = asyncio.run(
        _drains(
            faults.settings,
            faults.settings.inference_address,
            faults.service_pids["inference"],
            inference_call,
            first_answered.wait,
            release,
        )
    )
    assert exit_code(faults.service_pids["inference"]) == 0
