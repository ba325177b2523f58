"""Training domain logic: submit, read, cancel and watch jobs. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from services.common.errors import InvalidArgument, MeshError, NotFound, check_page_size
from services.common.pagination import Page
from services.datasets.service import Datasets
from services.training.eventlog import EventRecord
from services.training.events import JobEvent
from services.training.jobs import STATES, Job, JobStore
from services.training.metrics import JOBS_SUBMITTED
from services.training.ml.catalog import fits
from services.training.params import BY_NAME, JobParams, Submission

log = logging.getLogger(__name__)

RUN_JOB = "run_training_job"  # the worker's ARQ function


def arq_job_id(job_id: str) -> str:
    """ARQ's id for a job: deterministic, so enqueueing twice queues it once."""
    return f"training:{job_id}"


class Training:
    """What the Training service does, over the job store, the ARQ queue and the datasets
    (the service checks submissions against them; a worker, which only runs jobs, has none)."""

    def __init__(
        self,
        store: JobStore,
        queue: ArqRedis,
        queue_name: str,
        datasets: Datasets | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._queue_name = queue_name
        self._datasets = datasets

    @property
    def store(self) -> JobStore:
        return self._store

    @property
    def queue(self) -> ArqRedis:
        return self._queue

    async def submit(self, submission: Submission, client: str) -> Job:
        """Validate, record and enqueue a job; a repeated idempotency key returns the first."""
        defaults = await self.defaults_for(submission.params)
        params = await self.pin_dataset(submission.validate(defaults))
        job, created = await self._store.create(params, client, submission.idempotency_key)
        if created:
            JOBS_SUBMITTED.labels(client).inc()
            await self.enqueue(job.job_id)
        return job

    async def defaults_for(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults that depend on the dataset ``values`` name: a table's architecture is
        gbm (an image dataset's stays the definition's, cnn). None when the dataset cannot be
        found: ``pin_dataset`` then says why."""
        reference = values.get("dataset")
        if not isinstance(reference, str) or not reference.strip():
            reference = BY_NAME["dataset"].default
        if self._datasets is None:
            return {}
        try:
            found = await self._datasets.resolve(reference.strip().lower())
        except MeshError:
            return {}
        return {"architecture": "gbm"} if found.kind == "table" else {}

    async def pin_dataset(self, params: JobParams, architectures: Iterable[str] = ()) -> JobParams:
        """``params`` checked against the dataset they name, that dataset pinned to its version
        (``digits`` -> ``digits@3``), so a job trains on what it was submitted with whatever is
        uploaded meanwhile. InvalidArgument says why the architecture (or those a sweep may
        try) cannot take the data, or what else does not fit it."""
        if self._datasets is None:
            raise RuntimeError("this Training has no datasets to check submissions against")
        try:
            found = await self._datasets.resolve(params.dataset)
        except MeshError as exc:
            raise InvalidArgument(f"dataset: {exc}") from exc
        for architecture in dict.fromkeys([params.architecture, *architectures]):
            reason = fits(architecture, found.kind, tuple(found.input_shape))
            if reason:
                raise InvalidArgument(f"architecture: {reason}")
        if params.augment and found.kind != "images":
            raise InvalidArgument(
                f"augment: {found.reference} is a table; augmenting is for images"
            )
        if params.train_subset > found.split_sizes[0]:
            raise InvalidArgument(
                f"train_subset must be at most the {found.split_sizes[0]} training samples of "
                f"{found.reference}, got {params.train_subset}"
            )
        pinned = found.name if found.builtin else found.reference
        return dataclasses.replace(params, dataset=pinned)

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
