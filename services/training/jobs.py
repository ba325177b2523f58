"""Training job records and their event history, in mlmesh's own PostgreSQL tables.

PostgreSQL is the record: every state change and every event is written here first, then
announced on Redis for live watchers. A job's events are numbered by ``event_seq`` on its
row, so concurrent writers (the service cancelling, a worker reporting) never collide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import asyncpg
from redis.asyncio import Redis

from services.common.errors import FailedPrecondition
from services.common.pagination import Page, decode_token, encode_token
from services.training import eventlog

log = logging.getLogger(__name__)

T = TypeVar("T")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PRUNED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "pruned",  # a sweep trial that early stopping ended between epochs
)
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED, PRUNED)
# The event types that end a job's stream, by the state they end it in.
TERMINAL_EVENTS = {
    "succeeded": SUCCEEDED,
    "failed": FAILED,
    "cancelled": CANCELLED,
    "pruned": PRUNED,
}


def events_channel(job_id: str) -> str:
    """Redis channel on which a job's live events are announced."""
    return f"mlmesh:training:job-events:{job_id}"


@dataclass(frozen=True)
class JobParams:
    """What a job trains: validated, defaults resolved."""

    dataset: str
    architecture: str
    epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str
    seed: int
    train_subset: int
    experiment_name: str
    model_name: str


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


@dataclass(frozen=True)
class JobEvent:
    """One event of a job: ``event`` is {"type": ..., **payload}."""

    job_id: str
    sequence: int
    time: datetime
    event: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.event.get("type") in TERMINAL_EVENTS

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "sequence": self.sequence,
                "time": self.time.isoformat(),
                "event": self.event,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> JobEvent:
        data = json.loads(text)
        return cls(
            data["job_id"], data["sequence"], datetime.fromisoformat(data["time"]), data["event"]
        )


_PARAM_COLUMNS = tuple(f.name for f in dataclasses.fields(JobParams))


def _job(row: asyncpg.Record) -> Job:
    return Job(
        job_id=row["job_id"],
        state=row["state"],
        params=JobParams(**{c: row[c] for c in _PARAM_COLUMNS}),
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
        columns = ", ".join(_PARAM_COLUMNS)
        values = ", ".join(f"${i}" for i in range(7, 7 + len(_PARAM_COLUMNS)))
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""
                INSERT INTO training_jobs (job_id, state, submitted_by, idempotency_key,
                                           sweep_id, trial_number, {columns})
                VALUES ($1, $2, $3, $4, $5, $6, {values})
                ON CONFLICT (submitted_by, idempotency_key) DO NOTHING
                RETURNING *
                """,
                job_id,
                QUEUED,
                submitted_by,
                idempotency_key or None,
                sweep_id,
                trial_number,
                *(getattr(params, c) for c in _PARAM_COLUMNS),
            )
            if row is None:
                existing = await conn.fetchrow(
                    "SELECT * FROM training_jobs WHERE submitted_by = $1 AND idempotency_key = $2",
                    submitted_by,
                    idempotency_key,
                )
                return _job(existing), False
            event = await self._append(conn, job_id, {"type": "queued"})
        await self._announce(event)
        return _job(row), True

    async def get(self, job_id: str) -> Job | None:
        row = await self._pool.fetchrow("SELECT * FROM training_jobs WHERE job_id = $1", job_id)
        return _job(row) if row else None

    async def list(self, state: str, page_size: int, page_token: str) -> Page[Job]:
        """Jobs newest first, optionally in one state."""
        after = decode_token("jobs", page_token) if page_token else None
        rows = await self._pool.fetch(
            """
            SELECT * FROM training_jobs
            WHERE ($1 = '' OR state = $1)
              AND ($2::timestamptz IS NULL OR (create_time, job_id) < ($2, $3))
            ORDER BY create_time DESC, job_id DESC
            LIMIT $4
            """,
            state,
            datetime.fromisoformat(after[0]) if after else None,
            after[1] if after else "",
            page_size + 1,
        )
        jobs = [_job(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            token = encode_token("jobs", [jobs[-1].create_time.isoformat(), jobs[-1].job_id])
        return Page(jobs, token)

    async def using_dataset(self, reference: str) -> list[str]:
        """Ids of the queued or running jobs that train on dataset ``reference``
        (``name@version``)."""
        rows = await self._pool.fetch(
            "SELECT job_id FROM training_jobs WHERE state = ANY($1) AND dataset = $2"
            " ORDER BY create_time",
            [QUEUED, RUNNING],
            reference,
        )
        return [r["job_id"] for r in rows]

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
            if row["state"] == QUEUED:
                row = await conn.fetchrow(
                    """
                    UPDATE training_jobs SET state = $2, cancel_requested = true,
                        cancelled_by = $3, end_time = now()
                    WHERE job_id = $1 RETURNING *
                    """,
                    job_id,
                    CANCELLED,
                    client,
                )
                event = await self._append(
                    conn, job_id, {"type": "cancelled", "cancelled_by": client}
                )
            else:
                row = await conn.fetchrow(
                    """
                    UPDATE training_jobs SET cancel_requested = true, cancelled_by = $2
                    WHERE job_id = $1 RETURNING *
                    """,
                    job_id,
                    client,
                )
                event = None
        if event:
            await self._announce(event)
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

    async def record(self, job_id: str, event: dict[str, Any], **changes: Any) -> JobEvent:
        """Append an event and apply column changes to the job in one transaction.

        A terminal event also sets the matching state and the end time.
        """
        return await self._patiently(
            f"recording {event['type']} of job {job_id}",
            partial(self._record, job_id, event, changes),
        )

    async def _record(
        self, job_id: str, event: dict[str, Any], changes: dict[str, Any]
    ) -> JobEvent:
        if event["type"] in TERMINAL_EVENTS:
            changes = {**changes, "state": TERMINAL_EVENTS[event["type"]]}
        async with self._pool.acquire() as conn, conn.transaction():
            if changes:
                names = list(changes)
                sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
                if "state" in changes and changes["state"] in TERMINAL_STATES:
                    sets += ", end_time = now()"
                values = [json.dumps(v) if n == "metrics" else v for n, v in changes.items()]
                await conn.execute(
                    f"UPDATE training_jobs SET {sets} WHERE job_id = $1", job_id, *values
                )
            saved = await self._append(conn, job_id, event)
        await self._announce(saved)
        return saved

    async def events_after(self, job_id: str, sequence: int) -> list[JobEvent]:
        rows = await self._pool.fetch(
            """
            SELECT * FROM training_job_events WHERE job_id = $1 AND sequence > $2
            ORDER BY sequence
            """,
            job_id,
            sequence,
        )
        return [
            JobEvent(r["job_id"], r["sequence"], r["time"], json.loads(r["event"])) for r in rows
        ]

    @staticmethod
    async def _append(conn: asyncpg.Connection, job_id: str, event: dict[str, Any]) -> JobEvent:
        sequence, time = await eventlog.append(
            conn, "training_jobs", "training_job_events", "job_id", job_id, event
        )
        return JobEvent(job_id, sequence, time, event)

    async def _announce(self, event: JobEvent) -> None:
        await eventlog.announce(self._redis, events_channel(event.job_id), event.to_json())
