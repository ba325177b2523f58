"""The training worker: an ARQ worker that runs each job attempt in a process of its own.

    python -m services.training.worker

``WorkerSettings`` is the worker's config; ``main`` fills in what comes from mlmesh's
Settings (Redis, queue name, concurrency). Scale by starting more workers: they all consume
one queue. A job is leased while it runs; if its worker dies, the lease (and ARQ's
in-progress key, shortened to the lease) lapses and another worker takes the job over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import mlflow
from arq import Retry, func
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, get_kwargs
from mlflow.exceptions import MlflowException
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from services.common import db
from services.common.ops import OpsServer, mlflow_check, postgres_check, redis_check
from services.common.server import configure_logging, configure_mlflow_client
from services.common.settings import Settings
from services.training import child
from services.training.events import (
    BatchProgress,
    Cancelled,
    EpochCompleted,
    Failed,
    JobPruned,
    JobStarted,
    JobSucceeded,
)
from services.training.jobs import TERMINAL_STATES, Job, JobStore
from services.training.ml.search import storage_url
from services.training.ml.train import TrainResult, TrainSpec
from services.training.service import RUN_JOB, Training
from services.training.sweeps.orchestrator import Sweeps
from services.training.sweeps.store import SweepStore

log = logging.getLogger(__name__)

JOBS_ACTIVE = Gauge("training_jobs_active", "Training jobs running on this worker.")
JOBS_FINISHED = Counter("training_jobs_total", "Training jobs finished, by final state.", ["state"])
for _state in ("succeeded", "failed", "cancelled", "pruned"):  # exported at 0 from the start, so
    JOBS_FINISHED.labels(_state)  # increase() sees a job's first failure
EPOCH_SECONDS = Histogram(
    "training_epoch_duration_seconds",
    "Wall time of one training epoch.",
    buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600),
)
QUEUE_DEPTH = Gauge("training_queue_depth", "Jobs waiting in the training queue.")


WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
# How long a job's writes wait for PostgreSQL to come back (a restart, a fail-over).
WAIT_FOR_POSTGRES_S = 120.0


class _Outcome(Exception):
    """The attempt ended without a result: cancelled, pruned, transient failure or error."""

    def __init__(self, ended: child.Ended) -> None:
        super().__init__(ended.message)
        self.ended = ended


async def run_training_job(ctx: dict[str, Any], job_id: str) -> str:
    """ARQ job: one attempt at training job ``job_id``; a sweep's trial that ended moves its
    sweep on (its outcome told, the next trials queued, or the sweep finished)."""
    said = await _attempt(ctx, job_id)
    job = await ctx["store"].get(job_id)
    if job is not None and job.sweep_id and job.state in TERMINAL_STATES:
        await ctx["sweeps"].advance_quietly(job.sweep_id)
    return said


async def _attempt(ctx: dict[str, Any], job_id: str) -> str:
    settings: Settings = ctx["settings"]
    store: JobStore = ctx["store"]
    if ctx["job_try"] > settings.job_max_tries:
        error = f"gave up after {settings.job_max_tries} attempts"
        await store.record(job_id, Failed(error), error=error)
        return "gave up"
    job = await store.start_attempt(job_id, settings.worker_lease_s, WORKER_ID)
    if job is None:
        return "nothing to do: finished, cancelled, or leased by another worker"
    stop = multiprocessing.get_context("spawn").Event()
    lease = asyncio.create_task(_hold_lease(ctx, job_id, stop))
    JOBS_ACTIVE.inc()
    ctx["running"] += 1
    try:
        if job.cancel_requested:
            raise _Outcome(child.Ended(child.CANCELLED, "cancelled before it started"))
        if job.mlflow_run_id:  # a previous attempt died mid-run: close its MLflow run
            await asyncio.to_thread(_close_abandoned_run, settings, job.mlflow_run_id)
        trial = None
        relay = None
        if job.sweep_id:
            sweeps: Sweeps = ctx["sweeps"]
            trial = await sweeps.trial_spec(job)
            if trial is None:
                missing = f"sweep {job.sweep_id} has no trial {job.trial_number}"
                raise _Outcome(child.Ended(child.FAILED, missing))

            async def relay(event: JobStarted | EpochCompleted, job: Job = job) -> None:
                await sweeps.on_trial_event(job, event)

        spec = TrainSpec(
            job_id=job_id,
            params=job.params,
            tracking_uri=settings.mlflow_tracking_uri,
            data_dir=str(settings.data_dir) if settings.data_dir else None,
            client=job.submitted_by,
            attempt=job.attempts,
            trial=trial,
        )
        result = await _train_in_process(settings, store, spec, stop, ctx["running"], relay)
        await store.record(
            job_id,
            JobSucceeded(
                mlflow_run_id=result.mlflow_run_id,
                model_name=job.params.model_name,
                model_version=result.model_version,
                metrics=result.metrics,
            ),
            mlflow_run_id=result.mlflow_run_id,
            model_version=result.model_version,
            metrics=result.metrics,
            progress_fraction=1.0,
            model_uri=result.model_uri,
        )
        JOBS_FINISHED.labels("succeeded").inc()
        return f"succeeded: version {result.model_version}"
    except _Outcome as outcome:
        ended = outcome.ended
        if ended.outcome == child.TRANSIENT and ctx["job_try"] < settings.job_max_tries:
            delay = min(60, 5 * ctx["job_try"])
            await store.requeue(job_id, f"waiting to retry in {delay}s: {outcome}")
            log.warning(
                "job %s hit a transient failure, retrying in %ds: %s", job_id, delay, outcome
            )
            raise Retry(defer=delay) from outcome
        if ended.outcome == child.PRUNED:
            await store.record(
                job_id, JobPruned(ended.epoch, ended.value), progress_epoch=ended.epoch
            )
            JOBS_FINISHED.labels("pruned").inc()
            return f"pruned after epoch {ended.epoch}"
        if ended.outcome == child.CANCELLED:
            current = await store.get(job_id)
            await store.record(job_id, Cancelled(current.cancelled_by if current else ""))
            JOBS_FINISHED.labels("cancelled").inc()
            return "cancelled"
        await store.record(job_id, Failed(str(outcome)), error=str(outcome))
        JOBS_FINISHED.labels("failed").inc()
        return f"failed: {outcome}"
    except Retry:
        raise
    except Exception as exc:  # a bug or an unexpected failure: fail the job, keep the worker
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
        await store.record(job_id, Failed(message), error=message)
        JOBS_FINISHED.labels("failed").inc()
        return f"failed: {message}"
    except asyncio.CancelledError:
        # The worker is shutting down: ARQ re-queues the job; say so in its record.
        await asyncio.shield(store.requeue(job_id, "worker stopped; the job will resume"))
        raise
    finally:
        JOBS_ACTIVE.dec()
        ctx["running"] -= 1
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lease


async def _hold_lease(ctx: dict[str, Any], job_id: str, stop: Any) -> None:
    """Renew the job's lease and ARQ's in-progress key; turn a cancel request into ``stop``."""
    settings: Settings = ctx["settings"]
    store: JobStore = ctx["store"]
    key = in_progress_key_prefix + ctx["job_id"]
    lease_ms = int(settings.worker_lease_s * 1000)
    while True:
        # Each on its own: a Redis outage must not let the lease in PostgreSQL lapse (the job
        # would be taken over while it still trains here), nor the reverse.
        try:
            if await store.renew_lease(job_id, settings.worker_lease_s):
                stop.set()
        except Exception as exc:  # a blip must not end the job; the next round retries
            log.warning("renewing the lease of job %s failed: %s", job_id, exc)
        try:
            await ctx["redis"].pexpire(key, lease_ms)
        except Exception as exc:
            log.warning("renewing ARQ's in-progress key of job %s failed: %s", job_id, exc)
        await asyncio.sleep(min(1.0, settings.worker_lease_s / 5))


async def _train_in_process(
    settings: Settings,
    store: JobStore,
    spec: TrainSpec,
    stop: Any,
    running: int,
    relay: Callable[[JobStarted | EpochCompleted], Awaitable[None]] | None = None,
) -> TrainResult:
    """Run one attempt in a spawned process, relaying its events into the job's record (and,
    for a sweep's trial, its start and epochs to ``relay``)."""
    mp = multiprocessing.get_context("spawn")
    messages = mp.Queue()
    # A job alone gets every core; one that starts beside others shares them.
    threads = settings.worker_torch_threads or max(1, (os.cpu_count() or 1) // running)
    proc = mp.Process(
        target=child.run, args=(spec, messages, stop, threads, os.getpid()), daemon=True
    )
    proc.start()
    job_id, total = spec.job_id, spec.params.epochs
    try:
        while True:
            try:
                message = await asyncio.to_thread(messages.get, True, 0.5)
            except queue.Empty:
                if not proc.is_alive():
                    exited = f"the training process exited with code {proc.exitcode}"
                    raise _Outcome(child.Ended(child.FAILED, exited)) from None
                continue
            if isinstance(message, JobStarted):
                await store.record(job_id, message, mlflow_run_id=message.mlflow_run_id)
            elif isinstance(message, BatchProgress):
                done = (message.epoch - 1 + message.batch / message.total_batches) / total
                await store.record(
                    job_id, message, progress_epoch=message.epoch, progress_fraction=done
                )
            elif isinstance(message, EpochCompleted):
                EPOCH_SECONDS.observe(message.metrics.get("epoch_seconds", 0.0))
                await store.record(
                    job_id,
                    message,
                    progress_epoch=message.epoch,
                    progress_fraction=message.epoch / total,
                    metrics=message.metrics,
                )
            elif isinstance(message, TrainResult):
                return message
            elif isinstance(message, child.Ended):
                raise _Outcome(message)
            if relay is not None and isinstance(message, JobStarted | EpochCompleted):
                await relay(message)
    finally:
        if proc.is_alive():
            stop.set()
            await asyncio.to_thread(proc.join, 10)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)
        messages.close()


def _close_abandoned_run(settings: Settings, run_id: str) -> None:
    try:
        client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
    except MlflowException as exc:
        log.warning("could not close abandoned MLflow run %s: %s", run_id, exc)


async def _watch_queue_depth(ctx: dict[str, Any]) -> None:
    while True:
        with contextlib.suppress(Exception):
            QUEUE_DEPTH.set(await ctx["redis"].zcard(ctx["settings"].training_queue))
        await asyncio.sleep(5)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["pool"] = await db.connect_pool(settings.database_url)
    # A job training across a PostgreSQL restart waits to record its progress and its end.
    ctx["store"] = JobStore(ctx["pool"], ctx["redis"], patience_s=WAIT_FOR_POSTGRES_S)
    training = Training(ctx["store"], ctx["redis"], settings.training_queue)
    ctx["sweeps"] = Sweeps(
        SweepStore(ctx["pool"], ctx["redis"]),
        training,
        storage_url(settings.database_url),
        settings.mlflow_tracking_uri,
    )
    ctx["running"] = 0  # jobs this worker runs now
    ctx["http"] = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.readiness_timeout_s)
    )
    ctx["ops"] = None
    if settings.worker_ops_port:
        ctx["ops"] = OpsServer(
            settings.worker_ops_host,
            settings.worker_ops_port,
            {
                "mlflow": mlflow_check(settings.mlflow_tracking_uri, ctx["http"]),
                "redis": redis_check(ctx["redis"]),
                "postgres": postgres_check(ctx["pool"]),
            },
            settings.readiness_timeout_s,
        )
        await ctx["ops"].start()
    ctx["depth"] = asyncio.create_task(_watch_queue_depth(ctx))
    log.info("training worker ready on queue %s", settings.training_queue)


async def shutdown(ctx: dict[str, Any]) -> None:
    ctx["depth"].cancel()
    if ctx["ops"] is not None:
        await ctx["ops"].stop()
    await ctx["http"].close()
    await ctx["pool"].close()


class _Worker(Worker):
    """ARQ's worker, made to outlive a Redis outage.

    ARQ's poll loop lets a Redis error end the worker (and a worker that dies while Redis is
    away never comes back to the queue); this one waits for Redis instead, while its running
    jobs go on training and reporting to PostgreSQL.
    """

    _redis_down = False

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            if not self._redis_down:
                log.warning("Redis is unreachable (%s); waiting for it", exc)
                self._redis_down = True
            await asyncio.sleep(1.0)
            return
        if self._redis_down:
            log.info("Redis is back; taking jobs again")
            self._redis_down = False


class WorkerSettings:
    """ARQ's configuration of the training worker (main() adds what comes from Settings)."""

    # Jobs are leased (worker_lease_s) rather than bounded by ARQ's timeout: a long
    # training run is fine, a dead worker's job is retried once its lease lapses.
    functions = [func(run_training_job, name=RUN_JOB, timeout=7 * 24 * 3600, max_tries=10**6)]
    on_startup = startup
    on_shutdown = shutdown
    retry_jobs = True
    keep_result = 3600
    poll_delay = 0.2


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    configure_mlflow_client(settings)
    worker = _Worker(
        **get_kwargs(WorkerSettings),
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=settings.training_queue,
        max_jobs=settings.worker_max_jobs,
        ctx={"settings": settings},
    )
    worker.run()


if __name__ == "__main__":
    main()
