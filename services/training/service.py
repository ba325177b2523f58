"""Training domain logic: submit, read, cancel and watch jobs. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from services.common.errors import InvalidArgument, NotFound, check_page_size
from services.common.pagination import Page
from services.training.eventlog import EventRecord
from services.training.events import JobEvent
from services.training.jobs import STATES, Job, JobStore
from services.training.metrics import JOBS_SUBMITTED
from services.training.params import Submission

log = logging.getLogger(__name__)

RUN_JOB = "run_training_job"  # the worker's ARQ function


def arq_job_id(job_id: str) -> str:
    """ARQ's id for a job: deterministic, so enqueueing twice queues it once."""
    return f"training:{job_id}"


class Training:
    """What the Training service does, over the job store and the ARQ queue."""

    def __init__(self, store: JobStore, queue: ArqRedis, queue_name: str) -> None:
        self._store = store
        self._queue = queue
        self._queue_name = queue_name

    @property
    def store(self) -> JobStore:
        return self._store

    @property
    def queue(self) -> ArqRedis:
        return self._queue

    async def submit(self, submission: Submission, client: str) -> Job:
        """Validate, record and enqueue a job; a repeated idempotency key returns the first."""
        params = submission.validate()
        job, created = await self._store.create(params, client, submission.idempotency_key)
        if created:
            JOBS_SUBMITTED.labels(client).inc()
            await self.enqueue(job.job_id)
        return job

    async def enqueue(self, job_id: str) -> bool:
        """Put a job on the queue (a no-op when ARQ has it); False when Redis is unreachable.

        The job is recorded in PostgreSQL either way, and the reconciler queues it later.
        """
        try:
            await self._queue.enqueue_job(
                RUN_JOB, job_id, _job_id=arq_job_id(job_id), _queue_name=self._queue_name
            )
            return True
        except (RedisError, OSError) as exc:
            log.warning("could not queue job %s (will retry): %s", job_id, exc)
            return False

    async def get(self, job_id: str) -> Job:
        if not job_id.strip():
            raise InvalidArgument("job_id is required")
        job = await self._store.get(job_id)
        if job is None:
            raise NotFound(f"training job {job_id!r} does not exist")
        return job

    async def list(self, state: str, page_size: int, page_token: str) -> Page[Job]:
        if state and state not in STATES:
            raise InvalidArgument(f"state must be one of {', '.join(STATES)}, got {state!r}")
        return await self._store.list(state, check_page_size(page_size), page_token)

    async def cancel(self, job_id: str, client: str) -> Job:
        """Cancel a queued job, or ask a running one to stop; FailedPrecondition once ended."""
        await self.get(job_id)
        job = await self._store.request_cancel(job_id, client)
        assert job is not None  # it existed a moment ago and jobs are never deleted
        return job

    async def watch(self, job_id: str, poll_s: float = 1.0) -> AsyncIterator[EventRecord[JobEvent]]:
        """The job's events from the first, then live ones, until a terminal event."""
        await self.get(job_id)
        async for record in self._store.follow(job_id, poll_s):
            yield record

    async def reconcile_forever(self, interval_s: float) -> None:
        """Re-queue unfinished jobs, so jobs Redis lost (restart, outage) still run."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                for job_id in await self._store.queued_or_running():
                    await self.enqueue(job_id)
            except Exception:  # keep reconciling: the next round may succeed
                log.exception("reconciling training jobs failed")
