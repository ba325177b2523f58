"""Training job records and their event history, in mlmesh's own PostgreSQL tables.

PostgreSQL is the record: every state change and every event is written here first, then
announced on Redis for live watchers. A job's events are numbered by ``event_seq`` on its
row, so concurrent writers (the service cancelling, a worker reporting) never collide.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import asyncpg
from redis.asyncio import Redis

from services.common.errors import FailedPrecondition
from services.common.pagination import Page
from services.training.eventlog import EventLog, EventRecord
from services.training.events import (
    CANCELLED,
    FAILED,
    PRUNED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Cancelled,
    JobEvent,
    Queued,
    parse_job_event,
)
from services.training.params import JobParams

log = logging.getLogger(__name__)

T = TypeVar("T")

STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PRUNED)
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED, PRUNED)
JOB_LOG: EventLog[JobEvent] = EventLog(
    table="training_jobs",
    events_table="training_job_events",
    key_column="job_id",
    channel_prefix="mlmesh:training:job-events:",
    parse=parse_job_event,
    terminal_states=TERMINAL_STATES,
)


@dataclass(frozen=True)
class Job:
    """One training job as recorded."""

    job_id: str
    state: str
    params: JobParams
    model_version: int
    mlflow_run_id: str
    progress_epoch: int
    progress_fraction: float
    metrics: dict[str, float]
    error: str
    submitted_by: str
    idempotency_key: str
    attempts: int
    worker: str
    cancel_requested: bool
    cancelled_by: str
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    sweep_id: str = ""  # the sweep this job is a trial of, if any
    trial_number: int = 0
    model_uri: str = ""  # a sweep trial's logged (not yet registered) model


def _job(row: asyncpg.Record) -> Job:
    return Job(
        job_id=row["job_id"],
        state=row["state"],
        params=JobParams.from_record(json.loads(row["params"])),
        model_version=row["model_version"],
        mlflow_run_id=row["mlflow_run_id"],
        progress_epoch=row["progress_epoch"],
        progress_fraction=row["progress_fraction"],
        metrics=json.loads(row["metrics"]),
        error=row["error"],
        submitted_by=row["submitted_by"],
        idempotency_key=row["idempotency_key"] or "",
        attempts=row["attempts"],
        worker=row["worker"],
        cancel_requested=row["cancel_requested"],
        cancelled_by=row["cancelled_by"],
        create_time=row["create_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        sweep_id=row["sweep_id"],
        trial_number=row["trial_number"],
        model_uri=row["model_uri"],
    )


# PostgreSQL restarting, or out of reach for a moment.
POSTGRES_DOWN = (
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    OSError,
)


class JobStore:
    """Reads and writes jobs and their events; announces events on Redis (best effort).

    ``patience_s``: how long ``record`` and ``requeue`` wait for PostgreSQL to come back
    (a restart) before they fail. A worker waits, so that a job training across a restart
    is not lost; the service, answering RPCs, does not (0).
    """

    def __init__(self, pool: asyncpg.Pool, redis: Redis, patience_s: float = 0.0) -> None:
        self._pool = pool
        self._redis = redis
        self._patience_s = patience_s

    async def _patiently(self, what: str, write: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self._patience_s
        delay = 0.25
        while True:
            try:
                return await write()
            except POSTGRES_DOWN as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("PostgreSQL unavailable while %s (%s: %s); retrying in %.2g s",
                            what, type(exc).__name__, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def create(
        self,
        params: JobParams,
        submitted_by: str,
        idempotency_key: str,
        *,
        sweep_id: str = "",
        trial_number: int = 0,
    ) -> tuple[Job, bool]:
        """Record a queued job; with a known idempotency key return that job (created=False)."""
        job_id = uuid.uuid4().hex
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                INSERT INTO training_jobs (job_id, state, submitted_by, idempotency_key,
                                           sweep_id, trial_number, params)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (submitted_by, idempotency_key) DO NOTHING
                RETURNING *
                """,
                job_id,
                QUEUED,
                submitted_by,
                idempotency_key or None,
                sweep_id,
                trial_number,
                json.dumps(params.to_record()),
            )
            if row is None:
                existing = await conn.fetchrow(
                    "SELECT * FROM training_jobs WHERE submitted_by = $1 AND idempotency_key = $2",
                    submitted_by,
                    idempotency_key,
                )
                return _job(existing), False
            event = await JOB_LOG.write(conn, job_id, Queued(), {})
        await self._announce(event)
        return _job(row), True

    async def get(self, job_id: str) -> Job | None:
        row = await self._pool.fetchrow("SELECT * FROM training_jobs WHERE job_id = $1", job_id)
        return _job(row) if row else None

    async def list(self, state: str, page_size: int, page_token: str) -> Page[Job]:
        """Jobs newest first, optionally in one state."""
        rows = await JOB_LOG.page(self._pool, state, page_size, page_token)
        return Page([_job(r) for r in rows.items], rows.next_page_token)

    async def queued_or_running(self) -> list[str]:
        """Ids of every job that is not finished, oldest first."""
        rows = await self._pool.fetch(
            "SELECT job_id FROM training_jobs WHERE state = ANY($1) ORDER BY create_time",
            [QUEUED, RUNNING],
        )
        return [r["job_id"] for r in rows]

    async def request_cancel(self, job_id: str, client: str) -> Job | None:
        """Cancel a queued job at once; ask a running one to stop. None when there is no such
        job; FailedPrecondition when it has ended (and it stays as it ended)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM training_jobs WHERE job_id = $1 FOR UPDATE", job_id
            )
            if row is None:
                return None
            if row["state"] in TERMINAL_STATES:
                raise FailedPrecondition(
                    f"training job {job_id} has already ended ({row['state']}); only queued or "
                    "running jobs can be cancelled"
                )
            # A queued job ends at once (its terminal event sets the state); a running one
            # is asked to stop, and its worker records how it ended.
            event = Cancelled(client) if row["state"] == QUEUED else None
            changes = {"cancel_requested": True, "cancelled_by": client}
            saved = await JOB_LOG.write(conn, job_id, event, changes)
            row = await conn.fetchrow("SELECT * FROM training_jobs WHERE job_id = $1", job_id)
        await self._announce(saved)
        return _job(row)

    async def start_attempt(self, job_id: str, lease_s: float, worker: str) -> Job | None:
        """Take a job for a new attempt and lease it; None when there is nothing to do.

        Nothing to do: the job is finished, or another worker holds a live lease on it (a
        job re-queued after Redis lost its queue while that worker kept training).
        """
        row = await self._pool.fetchrow(
            """
            UPDATE training_jobs SET state = $2, attempts = attempts + 1,
                start_time = coalesce(start_time, now()), error = '',
                lease_until = now() + make_interval(secs => $3), worker = $5
            WHERE job_id = $1
              AND (state = $4 OR (state = $2 AND (lease_until IS NULL OR lease_until < now())))
            RETURNING *
            """,
            job_id,
            RUNNING,
            lease_s,
            QUEUED,
            worker,
        )
        return _job(row) if row else None

    async def renew_lease(self, job_id: str, lease_s: float) -> bool:
        """Extend a running job's lease; returns whether the job wants to be cancelled."""
        return bool(
            await self._pool.fetchval(
                """
                UPDATE training_jobs SET lease_until = now() + make_interval(secs => $2)
                WHERE job_id = $1 RETURNING cancel_requested
                """,
                job_id,
                lease_s,
            )
        )

    async def requeue(self, job_id: str, reason: str) -> None:
        """Put a running job back to queued (it will be retried), saying why."""
        await self._patiently(f"requeueing job {job_id}", partial(self._requeue, job_id, reason))

    async def _requeue(self, job_id: str, reason: str) -> None:
        await self._pool.execute(
            "UPDATE training_jobs SET state = $2, error = $3, lease_until = NULL"
            " WHERE job_id = $1 AND state = $4",
            job_id,
            QUEUED,
            reason,
            RUNNING,
        )

    async def record(self, job_id: str, event: JobEvent, **changes: Any) -> EventRecord:
        """Append an event and apply column changes to the job in one transaction.

        A terminal event also sets the matching state and the end time.
        """
        return await self._patiently(
            f"recording {event.kind} of job {job_id}",
            partial(self._record, job_id, event, changes),
        )

    async def _record(self, job_id: str, event: JobEvent, changes: dict[str, Any]) -> EventRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            saved = await JOB_LOG.write(conn, job_id, event, changes)
        await self._announce(saved)
        return saved

    def follow(self, job_id: str, poll_s: float = 1.0) -> AsyncIterator[EventRecord[JobEvent]]:
        """The job's events from the first, then live ones, until a terminal event."""
        return JOB_LOG.follow(self._redis, self._pool, job_id, poll_s)

    async def _announce(self, event: EventRecord | None) -> None:
        if event is not None:
            await JOB_LOG.announce(self._redis, event)
