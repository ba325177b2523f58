"""Sweeps, their trials and their events in mlmesh's PostgreSQL tables (announced on Redis).

A sweep's trials are rows of their own beside the training jobs that run them; reading a
sweep joins each trial with its job (state, MLflow run, metrics, error, logged model).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from redis.asyncio import Redis

from services.common.pagination import Page
from services.training.eventlog import EventLog, EventRecord
from services.training.events import QUEUED, RUNNING, Queued, SweepEvent, parse_sweep_event
from services.training.ml import search
from services.training.sweeps.records import SWEEP_TERMINAL, TRIAL_RUNNING, Sweep, Trial
from services.training.sweeps.spec import SweepSpec

SWEEP_LOG: EventLog[SweepEvent] = EventLog(
    table="sweeps",
    events_table="sweep_events",
    key_column="sweep_id",
    channel_prefix="mlmesh:training:sweep-events:",
    parse=parse_sweep_event,
    terminal_states=SWEEP_TERMINAL,
)


def _trial(row: asyncpg.Record) -> Trial:
    return Trial(
        number=row["number"],
        optuna_trial_id=row["optuna_trial_id"],
        job_id=row["job_id"],
        state=row["state"],
        params=json.loads(row["params"]),
        value=row["value"],
        epochs_completed=row["epochs_completed"],
        job_state=row["job_state"],
        mlflow_run_id=row["mlflow_run_id"],
        metrics=json.loads(row["metrics"]),
        error=row["error"],
        model_uri=row["model_uri"],
    )


def _sweep(row: asyncpg.Record, trials: list[Trial]) -> Sweep:
    return Sweep(
        sweep_id=row["sweep_id"],
        state=row["state"],
        spec=SweepSpec.from_json(json.loads(row["spec"])),
        study_name=row["study_name"],
        mlflow_run_id=row["mlflow_run_id"],
        best_trial=row["best_trial"],
        model_version=row["model_version"],
        error=row["error"],
        submitted_by=row["submitted_by"],
        idempotency_key=row["idempotency_key"] or "",
        cancel_requested=row["cancel_requested"],
        cancelled_by=row["cancelled_by"],
        create_time=row["create_time"],
        end_time=row["end_time"],
        trials=trials,
    )


_TRIALS = """
    SELECT t.*, j.state AS job_state, j.mlflow_run_id, j.metrics, j.error, j.model_uri
    FROM sweep_trials t JOIN training_jobs j USING (job_id)
    WHERE t.sweep_id = ANY($1) ORDER BY t.number
"""


class SweepStore:
    """Reads and writes sweeps, their trials and events; announces events on Redis."""

    def __init__(self, pool: asyncpg.Pool, redis: Redis) -> None:
        self._pool = pool
        self._redis = redis

    async def create(
        self, spec: SweepSpec, submitted_by: str, idempotency_key: str
    ) -> tuple[Sweep, bool]:
        """Record a queued sweep; with a known idempotency key return that one (created=False)."""
        sweep_id = uuid.uuid4().hex
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                INSERT INTO sweeps (sweep_id, state, spec, study_name, submitted_by,
                                    idempotency_key)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (submitted_by, idempotency_key) DO NOTHING
                RETURNING sweep_id
                """,
                sweep_id,
                QUEUED,
                json.dumps(spec.to_json()),
                search.study_name(sweep_id),
                submitted_by,
                idempotency_key or None,
            )
            if row is None:
                existing = await conn.fetchval(
                    "SELECT sweep_id FROM sweeps WHERE submitted_by = $1 AND idempotency_key = $2",
                    submitted_by,
                    idempotency_key,
                )
                sweep = await self.get(existing)
                assert sweep is not None
                return sweep, False
            event = await SWEEP_LOG.write(conn, sweep_id, Queued(), {})
        await self._announce(event)
        sweep = await self.get(sweep_id)
        assert sweep is not None
        return sweep, True

    async def get(self, sweep_id: str) -> Sweep | None:
        row = await self._pool.fetchrow("SELECT * FROM sweeps WHERE sweep_id = $1", sweep_id)
        if row is None:
            return None
        trials = [_trial(r) for r in await self._pool.fetch(_TRIALS, [sweep_id])]
        return _sweep(row, trials)

    async def list(self, state: str, page_size: int, page_token: str) -> Page[Sweep]:
        """Sweeps newest first, optionally in one state, each with its trials."""
        rows = await SWEEP_LOG.page(self._pool, state, page_size, page_token)
        trials: dict[str, list[Trial]] = {r["sweep_id"]: [] for r in rows.items}
        for r in await self._pool.fetch(_TRIALS, list(trials)):
            trials[r["sweep_id"]].append(_trial(r))
        sweeps = [_sweep(r, trials[r["sweep_id"]]) for r in rows.items]
        return Page(sweeps, rows.next_page_token)

    async def unfinished(self) -> list[str]:
        rows = await self._pool.fetch(
            "SELECT sweep_id FROM sweeps WHERE state = ANY($1) ORDER BY create_time",
            [QUEUED, RUNNING],
        )
        return [r["sweep_id"] for r in rows]

    @contextlib.asynccontextmanager
    async def locked(self, sweep_id: str) -> AsyncIterator[None]:
        """Hold the sweep's advisory lock: one process advances a sweep at a time."""
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", sweep_id)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", sweep_id)

    async def record(
        self, sweep_id: str, event: SweepEvent | None, **changes: Any
    ) -> EventRecord[SweepEvent] | None:
        """Apply column changes and append an event in one transaction; a terminal event also
        sets the matching state and the end time."""
        async with self._pool.acquire() as conn, conn.transaction():
            saved = await SWEEP_LOG.write(conn, sweep_id, event, changes)
        await self._announce(saved)
        return saved

    async def add_trial(
        self, sweep_id: str, number: int, optuna_trial_id: int, job_id: str, params: dict
    ) -> None:
        await self._pool.execute(
            """
            INSERT INTO sweep_trials (sweep_id, number, optuna_trial_id, job_id, state, params)
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING
            """,
            sweep_id,
            number,
            optuna_trial_id,
            job_id,
            TRIAL_RUNNING,
            json.dumps(params),
        )

    async def end_trial(
        self, sweep_id: str, number: int, state: str, value: float | None, epochs: int
    ) -> None:
        await self._pool.execute(
            """
            UPDATE sweep_trials SET state = $3, value = $4, epochs_completed = $5
            WHERE sweep_id = $1 AND number = $2
            """,
            sweep_id,
            number,
            state,
            value,
            epochs,
        )

    async def request_cancel(self, sweep_id: str, client: str) -> None:
        await self._pool.execute(
            """
            UPDATE sweeps SET cancel_requested = true, cancelled_by = $2
            WHERE sweep_id = $1 AND NOT cancel_requested AND state = ANY($3)
            """,
            sweep_id,
            client,
            [QUEUED, RUNNING],
        )

    def follow(self, sweep_id: str, poll_s: float = 1.0) -> AsyncIterator[EventRecord[SweepEvent]]:
        """The sweep's events from the first, then live ones, until a terminal event."""
        return SWEEP_LOG.follow(self._redis, self._pool, sweep_id, poll_s)

    async def _announce(self, event: EventRecord[SweepEvent] | None) -> None:
        if event is not None:
            await SWEEP_LOG.announce(self._redis, event)
