"""Hyperparameter sweeps: records in PostgreSQL, trials as training jobs, Optuna deciding.

A sweep moves forward only through ``Sweeps.advance``, which is idempotent and runs under a
PostgreSQL advisory lock per sweep, so any process may call it at any time: the Training
service after a submission or a cancel and in its reconcile loop, and the worker that ran a
trial as soon as the trial's job ends. Each call

1. opens the sweep's MLflow parent run if it has none yet;
2. tells the Optuna study how finished trial jobs ended (complete, pruned or failed) and
   announces a new best;
3. on a cancelled sweep, cancels its running trial jobs and ends once none runs;
4. asks the study for new trials until ``parallelism`` run or the budget is spent, each one
   recorded and queued as an ordinary training job (with an idempotency key, so a repeat
   never queues a trial twice);
5. once every trial ended, registers the best trial's model and closes the parent run.

Nothing lives only in memory: a process that dies mid-way leaves the next call to finish the
step. A trial whose worker dies is retried like any job (its lease lapses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, check_page_size
from services.common.pagination import Page, decode_token, encode_token
from services.training import eventlog
from services.training.jobs import (
    CANCELLED,
    FAILED,
    PRUNED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Job,
)
from services.training.metrics import SWEEPS_SUBMITTED
from services.training.ml import search
from services.training.service import Training
from services.training.sweep_spec import SweepSpec, SweepSubmission, validate_sweep
from services.training.validation import Submission

log = logging.getLogger(__name__)

SWEEP_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
SWEEP_TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
TERMINAL_EVENTS = {"succeeded": SUCCEEDED, "failed": FAILED, "cancelled": CANCELLED}
# Trial states, and the one each terminal job state ends a trial in.
TRIAL_RUNNING, TRIAL_COMPLETE = "running", "complete"
TRIAL_END = {SUCCEEDED: "complete", PRUNED: "pruned", FAILED: "failed", CANCELLED: "cancelled"}


def events_channel(sweep_id: str) -> str:
    """Redis channel on which a sweep's live events are announced."""
    return f"mlmesh:training:sweep-events:{sweep_id}"


@dataclass(frozen=True)
class Trial:
    """One trial as recorded, with what its training job knows."""

    number: int
    optuna_trial_id: int
    job_id: str
    state: str
    params: dict[str, Any]
    value: float | None
    epochs_completed: int
    job_state: str
    mlflow_run_id: str
    metrics: dict[str, float]
    error: str
    model_uri: str


@dataclass(frozen=True)
class Sweep:
    """One sweep as recorded."""

    sweep_id: str
    state: str
    spec: SweepSpec
    study_name: str
    mlflow_run_id: str
    best_trial: int | None
    model_version: int
    error: str
    submitted_by: str
    idempotency_key: str
    cancel_requested: bool
    cancelled_by: str
    create_time: datetime
    end_time: datetime | None
    trials: list[Trial] = field(default_factory=list)

    def trial(self, number: int | None) -> Trial | None:
        return next((t for t in self.trials if t.number == number), None)

    @property
    def running(self) -> list[Trial]:
        return [t for t in self.trials if t.state == TRIAL_RUNNING]


@dataclass(frozen=True)
class SweepEvent:
    """One event of a sweep: ``event`` is {"type": ..., **payload}."""

    sweep_id: str
    sequence: int
    time: datetime
    event: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event.get("type") in TERMINAL_EVENTS

    def to_json(self) -> str:
        return json.dumps(
            {
                "sweep_id": self.sweep_id,
                "sequence": self.sequence,
                "time": self.time.isoformat(),
                "event": self.event,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SweepEvent:
        data = json.loads(text)
        return cls(
            data["sweep_id"], data["sequence"], datetime.fromisoformat(data["time"]), data["event"]
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
            event = await self._append(conn, sweep_id, {"type": "queued"})
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
        after = decode_token("sweeps", page_token) if page_token else None
        rows = await self._pool.fetch(
            """
            SELECT * FROM sweeps
            WHERE ($1 = '' OR state = $1)
              AND ($2::timestamptz IS NULL OR (create_time, sweep_id) < ($2, $3))
            ORDER BY create_time DESC, sweep_id DESC
            LIMIT $4
            """,
            state,
            datetime.fromisoformat(after[0]) if after else None,
            after[1] if after else "",
            page_size + 1,
        )
        rows = rows[:page_size] if len(rows) > page_size else rows
        trials: dict[str, list[Trial]] = {r["sweep_id"]: [] for r in rows}
        for r in await self._pool.fetch(_TRIALS, list(trials)):
            trials[r["sweep_id"]].append(_trial(r))
        sweeps = [_sweep(r, trials[r["sweep_id"]]) for r in rows]
        token = ""
        if len(sweeps) == page_size and await self._pool.fetchval(
            """
            SELECT 1 FROM sweeps WHERE ($1 = '' OR state = $1)
              AND (create_time, sweep_id) < ($2, $3) LIMIT 1
            """,
            state,
            sweeps[-1].create_time,
            sweeps[-1].sweep_id,
        ):
            token = encode_token(
                "sweeps", [sweeps[-1].create_time.isoformat(), sweeps[-1].sweep_id]
            )
        return Page(sweeps, token)

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
        self, sweep_id: str, event: dict[str, Any] | None, **changes: Any
    ) -> SweepEvent | None:
        """Apply column changes and append an event in one transaction; a terminal event also
        sets the matching state and the end time."""
        if event is not None and event["type"] in TERMINAL_EVENTS:
            changes = {**changes, "state": TERMINAL_EVENTS[event["type"]]}
        saved = None
        async with self._pool.acquire() as conn, conn.transaction():
            if changes:
                names = list(changes)
                sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
                if changes.get("state") in SWEEP_TERMINAL:
                    sets += ", end_time = now()"
                await conn.execute(
                    f"UPDATE sweeps SET {sets} WHERE sweep_id = $1", sweep_id, *changes.values()
                )
            if event is not None:
                saved = await self._append(conn, sweep_id, event)
        if saved is not None:
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

    async def events_after(self, sweep_id: str, sequence: int) -> list[SweepEvent]:
        rows = await self._pool.fetch(
            """
            SELECT * FROM sweep_events WHERE sweep_id = $1 AND sequence > $2 ORDER BY sequence
            """,
            sweep_id,
            sequence,
        )
        return [
            SweepEvent(r["sweep_id"], r["sequence"], r["time"], json.loads(r["event"]))
            for r in rows
        ]

    @staticmethod
    async def _append(conn: asyncpg.Connection, sweep_id: str, event: dict) -> SweepEvent:
        sequence, time = await eventlog.append(
            conn, "sweeps", "sweep_events", "sweep_id", sweep_id, event
        )
        return SweepEvent(sweep_id, sequence, time, event)

    async def _announce(self, event: SweepEvent) -> None:
        await eventlog.announce(self._redis, events_channel(event.sweep_id), event.to_json())


def _better(value: float, than: float | None, direction: str) -> bool:
    if than is None:
        return True
    return value > than if direction == search.MAXIMIZE else value < than


class Sweeps:
    """What the Training service and the workers do with sweeps. Knows nothing of gRPC."""

    def __init__(
        self, store: SweepStore, training: Training, storage_url: str, tracking_uri: str
    ) -> None:
        self._store = store
        self._training = training
        self._storage_url = storage_url
        self._tracking_uri = tracking_uri
        self._redis = training.queue
        self._background: set[asyncio.Task] = set()

    # -- the service's calls ------------------------------------------------------------
    async def submit(self, submission: SweepSubmission, client: str) -> Sweep:
        """Validate and record a sweep, then start it in the background; answers at once."""
        spec = validate_sweep(submission)
        sweep, created = await self._store.create(spec, client, submission.idempotency_key)
        if created:
            SWEEPS_SUBMITTED.labels(client).inc()
            self.kick(sweep.sweep_id)
        return sweep

    def kick(self, sweep_id: str) -> None:
        """Advance a sweep without waiting for it (the reconciler retries what fails)."""
        task = asyncio.create_task(self.advance_quietly(sweep_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def get(self, sweep_id: str) -> Sweep:
        if not sweep_id.strip():
            raise InvalidArgument("sweep_id is required")
        sweep = await self._store.get(sweep_id)
        if sweep is None:
            raise NotFound(f"sweep {sweep_id!r} does not exist")
        return sweep

    async def list(self, state: str, page_size: int, page_token: str) -> Page[Sweep]:
        if state and state not in SWEEP_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(SWEEP_STATES)}, got {state!r}")
        return await self._store.list(state, check_page_size(page_size), page_token)

    async def cancel(self, sweep_id: str, client: str) -> Sweep:
        """Stop asking for trials and cancel the running ones; the sweep ends cancelled once
        none runs (at once when none was training). FailedPrecondition once it has ended."""
        sweep = await self.get(sweep_id)
        if sweep.state in SWEEP_TERMINAL:
            raise FailedPrecondition(
                f"sweep {sweep_id} has already ended ({sweep.state}); only queued or running "
                "sweeps can be cancelled"
            )
        await self._store.request_cancel(sweep_id, client)
        await self.advance(sweep_id)
        return await self.get(sweep_id)

    async def watch(self, sweep_id: str, poll_s: float = 1.0) -> AsyncIterator[SweepEvent]:
        """The sweep's events from the first, then live ones, until a terminal event."""
        await self.get(sweep_id)

        async def after(sequence: int) -> list[SweepEvent]:
            return await self._store.events_after(sweep_id, sequence)

        async for event in eventlog.follow(
            self._redis, events_channel(sweep_id), after, SweepEvent.from_json, poll_s
        ):
            yield event

    async def reconcile(self) -> None:
        """Advance every unfinished sweep (after a crash, an outage, a lost wake-up)."""
        for sweep_id in await self._store.unfinished():
            await self.advance_quietly(sweep_id)

    async def reconcile_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile()
            except Exception:  # keep reconciling: the next round may succeed
                log.exception("reconciling sweeps failed")

    # -- the worker's calls -------------------------------------------------------------
    async def trial_spec(self, job: Job) -> search.TrialSpec | None:
        """What a trial's training process needs; None when the job is not a live trial."""
        sweep = await self._store.get(job.sweep_id)
        if sweep is None or sweep.trial(job.trial_number) is None:
            return None
        return search.TrialSpec(
            sweep_id=sweep.sweep_id,
            number=job.trial_number,
            storage_url=self._storage_url,
            study_name=sweep.study_name,
            direction=sweep.spec.direction,
            objective_metric=sweep.spec.objective_metric,
            pruner=sweep.spec.pruner,
            parent_run_id=sweep.mlflow_run_id,
        )

    async def on_trial_event(self, job: Job, event: dict[str, Any]) -> None:
        """Turn a trial job's start and epochs into the sweep's trial events."""
        sweep = await self._store.get(job.sweep_id)
        trial = sweep.trial(job.trial_number) if sweep else None
        if sweep is None or trial is None:
            return
        if event["type"] == "started":
            await self._store.record(
                sweep.sweep_id,
                {
                    "type": "trial_started",
                    "trial_number": trial.number,
                    "job_id": job.job_id,
                    "params": trial.params,
                    "attempt": event.get("attempt", job.attempts),
                    "mlflow_run_id": event["mlflow_run_id"],
                },
            )
        elif event["type"] == "epoch":
            value = event["metrics"].get(sweep.spec.objective_metric)
            if value is not None:
                await self._store.record(
                    sweep.sweep_id,
                    {
                        "type": "trial_epoch",
                        "trial_number": trial.number,
                        "epoch": event["epoch"],
                        "total_epochs": event["total_epochs"],
                        "value": value,
                    },
                )

    # -- moving a sweep forward ---------------------------------------------------------
    async def advance_quietly(self, sweep_id: str) -> None:
        try:
            await self.advance(sweep_id)
        except Exception:  # the next call (a trial ending, the reconciler) tries again
            log.warning("advancing sweep %s failed; will retry", sweep_id, exc_info=True)

    async def advance(self, sweep_id: str) -> None:
        """One idempotent step of the sweep's life; see the module docstring."""
        async with self._store.locked(sweep_id):
            sweep = await self._store.get(sweep_id)
            if sweep is None or sweep.state in SWEEP_TERMINAL:
                return
            if not sweep.mlflow_run_id:
                if sweep.cancel_requested:
                    await self._end_cancelled(sweep)
                    return
                run_id = await asyncio.to_thread(self._open_parent_run, sweep)
                await self._store.record(sweep_id, None, mlflow_run_id=run_id, state=RUNNING)
                sweep = await self._reload(sweep_id)
            await self._collect(sweep)
            sweep = await self._reload(sweep_id)
            if sweep.cancel_requested:
                for trial in sweep.running:
                    # A trial whose job ended meanwhile is collected just below.
                    with contextlib.suppress(FailedPrecondition):
                        await self._training.cancel(trial.job_id, sweep.cancelled_by)
                await self._collect(await self._reload(sweep_id))
                sweep = await self._reload(sweep_id)
                if not sweep.running:
                    await self._end_cancelled(sweep)
                return
            sweep = await self._start_trials(sweep)
            asked = len(sweep.trials)
            if asked >= sweep.spec.max_trials and not sweep.running:
                await self._finish(sweep)

    async def _reload(self, sweep_id: str) -> Sweep:
        sweep = await self._store.get(sweep_id)
        assert sweep is not None
        return sweep

    async def _collect(self, sweep: Sweep) -> None:
        """Tell the study how each trial whose job ended did; announce it and any new best."""
        ended = [t for t in sweep.running if t.job_state in TERMINAL_STATES]
        if not ended:
            return
        best = sweep.trial(sweep.best_trial)
        best_value = best.value if best else None
        spec = sweep.spec
        for trial in ended:
            state = TRIAL_END[trial.job_state]
            value = trial.metrics.get(spec.objective_metric)
            if state in ("complete", "pruned") and (value is None or not math.isfinite(value)):
                state, value = "failed", None
            error = trial.error or ("the objective was not a finite number" if not value else "")
            epochs = await asyncio.to_thread(self._tell, sweep, trial.number, state, value)
            await self._store.end_trial(sweep.sweep_id, trial.number, state, value, epochs)
            event: dict[str, Any] = {
                "type": "trial_ended",
                "trial_number": trial.number,
                "state": state,
                "epochs_completed": epochs,
            }
            if value is not None:
                event["value"] = value
            if state == "failed":
                event["error"] = error
            await self._store.record(sweep.sweep_id, event)
            if (
                state == TRIAL_COMPLETE
                and value is not None
                and _better(value, best_value, spec.direction)
            ):
                best_value = value
                await self._store.record(
                    sweep.sweep_id,
                    {
                        "type": "new_best",
                        "trial_number": trial.number,
                        "value": value,
                        "params": trial.params,
                    },
                    best_trial=trial.number,
                )

    def _tell(self, sweep: Sweep, number: int, state: str, value: float | None) -> int:
        """Tell the study a trial's outcome (once); the number of epochs it reported."""
        import optuna

        study = search.load_study(self._storage_url, sweep.study_name, sweep.spec.direction)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        frozen = study._storage.get_trial(trial_id)
        if frozen.state == optuna.trial.TrialState.RUNNING:
            if state == TRIAL_COMPLETE:
                study.tell(number, value)
            elif state == "pruned":
                study.tell(number, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
        return len(frozen.intermediate_values)

    async def _start_trials(self, sweep: Sweep) -> Sweep:
        """Adopt trials the study holds without a record, then ask for new ones."""
        orphans = await asyncio.to_thread(self._orphans, sweep)
        for number, trial_id, params in orphans:
            await self._start_trial(sweep, number, trial_id, params)
        if orphans:
            sweep = await self._reload(sweep.sweep_id)
        asked, running = len(sweep.trials), len(sweep.running)
        started = False
        while asked < sweep.spec.max_trials and running < sweep.spec.parallelism:
            number, trial_id, params = await asyncio.to_thread(self._ask, sweep, asked)
            await self._start_trial(sweep, number, trial_id, params)
            asked, running, started = asked + 1, running + 1, True
        return await self._reload(sweep.sweep_id) if started else sweep

    def _orphans(self, sweep: Sweep) -> list[tuple[int, int, dict[str, Any]]]:
        """Trials asked for whose job was never recorded (a process died in between)."""
        import optuna

        study = search.load_study(self._storage_url, sweep.study_name, sweep.spec.direction)
        known = {t.number for t in sweep.trials}
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [(t.number, t._trial_id, dict(t.params)) for t in running if t.number not in known]

    def _ask(self, sweep: Sweep, asked: int) -> tuple[int, int, dict[str, Any]]:
        spec = sweep.spec
        sampler = search.make_sampler(
            spec.strategy, spec.space, spec.base.seed, asked, spec.max_trials
        )
        study = search.load_study(
            self._storage_url, sweep.study_name, spec.direction, sampler=sampler
        )
        trial = study.ask(search.distributions(spec.space))
        return trial.number, trial._trial_id, dict(trial.params)

    async def _start_trial(
        self, sweep: Sweep, number: int, trial_id: int, params: dict[str, Any]
    ) -> None:
        p = sweep.spec.trial_params(params)
        submission = Submission(
            dataset=p.dataset,
            architecture=p.architecture,
            epochs=p.epochs,
            learning_rate=p.learning_rate,
            batch_size=p.batch_size,
            optimizer=p.optimizer,
            seed=p.seed,
            train_subset=p.train_subset,
            experiment_name=p.experiment_name,
            model_name=p.model_name,
            idempotency_key=f"sweep-{sweep.sweep_id}-trial-{number}",
        )
        # The job is recorded (and its trial row after it) before it is queued: a worker
        # that takes it at once finds its trial.
        job, _ = await self._training.store.create(
            self._training.validate(submission),
            sweep.submitted_by,
            submission.idempotency_key,
            sweep_id=sweep.sweep_id,
            trial_number=number,
        )
        await self._store.add_trial(sweep.sweep_id, number, trial_id, job.job_id, params)
        await self._training.enqueue(job.job_id)

    async def _end_cancelled(self, sweep: Sweep) -> None:
        if sweep.mlflow_run_id:
            await asyncio.to_thread(self._end_parent_run, sweep.mlflow_run_id, "KILLED")
        await self._store.record(
            sweep.sweep_id, {"type": "cancelled", "cancelled_by": sweep.cancelled_by}
        )

    async def _finish(self, sweep: Sweep) -> None:
        best = sweep.trial(sweep.best_trial)
        if best is None or not best.model_uri:
            counts: dict[str, int] = {}
            for t in sweep.trials:
                counts[t.state] = counts.get(t.state, 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            error = f"no trial completed ({summary})"
            await asyncio.to_thread(self._end_parent_run, sweep.mlflow_run_id, "FAILED")
            await self._store.record(
                sweep.sweep_id, {"type": "failed", "error": error}, error=error
            )
            return
        version = await asyncio.to_thread(self._close_parent_run, sweep, best)
        await self._store.record(
            sweep.sweep_id,
            {
                "type": "succeeded",
                "best_trial": best.number,
                "best_value": best.value,
                "best_params": best.params,
                "model_name": sweep.spec.base.model_name,
                "model_version": version,
                "metrics": best.metrics,
            },
            model_version=version,
        )

    # -- MLflow (blocking: called in threads) -------------------------------------------
    def _tracker(self, run_id: str):
        from mlflow import MlflowClient

        from services.training.ml.tracking import RunTracker

        return RunTracker(MlflowClient(tracking_uri=self._tracking_uri), self._tracking_uri, run_id)

    def _open_parent_run(self, sweep: Sweep) -> str:
        from services.training.ml.tracking import RunTracker, sweep_run_name

        spec = sweep.spec
        tracker = RunTracker.open(
            self._tracking_uri,
            spec.base.experiment_name,
            sweep_run_name(spec.base.dataset, spec.strategy, spec.max_trials),
            {"mlmesh.sweep_id": sweep.sweep_id, "mlmesh.client": sweep.submitted_by},
        )
        space = spec.to_json()["space"]
        fixed = {
            f"fixed.{k}": v
            for k, v in spec.to_json()["base"].items()
            if k not in spec.space and k not in ("experiment_name", "model_name", "seed")
        }
        tracker.log_params(
            {
                # The sampler's and every trial's seed; submitting it again repeats the sweep.
                "seed": spec.base.seed,
                "strategy": spec.strategy,
                "objective_metric": spec.objective_metric,
                "direction": spec.direction,
                "max_trials": spec.max_trials,
                "parallelism": spec.parallelism,
                "early_stopping": json.dumps(spec.to_json()["pruner"]),
                "optuna_study": sweep.study_name,
                **{f"space.{name}": json.dumps(d) for name, d in space.items()},
                **fixed,
            }
        )
        with tempfile.TemporaryDirectory(prefix="mlmesh-sweep-") as tmp:
            (Path(tmp) / "search_space.json").write_text(json.dumps(space, indent=2) + "\n")
            tracker.log_artifacts(Path(tmp))
        return tracker.run_id

    def _end_parent_run(self, run_id: str, status: str) -> None:
        if run_id:
            self._tracker(run_id).end_quietly(status)

    def _close_parent_run(self, sweep: Sweep, best: Trial) -> int:
        """Log the best trial and the figures on the parent run, register the best trial's
        model (once, even when retried) and end the run."""
        from services.training.ml import sweep_report

        spec = sweep.spec
        tracker = self._tracker(sweep.mlflow_run_id)
        assert best.value is not None
        tracker.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracker.log_metrics(
            {
                f"best_{spec.objective_metric}": best.value,
                **{f"best_{k}": v for k, v in best.metrics.items() if k.startswith("test_")},
                "trials": len(sweep.trials),
                **{
                    f"trials_{state}": sum(1 for t in sweep.trials if t.state == state)
                    for state in ("complete", "pruned", "failed", "cancelled")
                },
            },
            step=0,
        )
        tracker.client.set_tag(tracker.run_id, "mlmesh.best_trial", str(best.number))
        tracker.client.set_tag(tracker.run_id, "mlmesh.best_run_id", best.mlflow_run_id)
        points = [
            sweep_report.TrialPoint(t.number, t.state, t.value, t.params) for t in sweep.trials
        ]
        log_scale = {
            name: bool(getattr(domain, "log", False)) for name, domain in spec.space.items()
        }
        with tempfile.TemporaryDirectory(prefix="mlmesh-sweep-") as tmp:
            directory = Path(tmp)
            sweep_report.write_objective_by_trial(
                points,
                spec.objective_metric,
                spec.direction == search.MAXIMIZE,
                directory / sweep_report.OBJECTIVE_BY_TRIAL,
            )
            sweep_report.write_objective_by_parameter(
                points,
                spec.objective_metric,
                log_scale,
                directory / sweep_report.OBJECTIVE_BY_PARAMETER,
            )
            rows = [
                {
                    "number": t.number,
                    "state": t.state,
                    "value": t.value,
                    "params": t.params,
                    "epochs_completed": t.epochs_completed,
                    "mlflow_run_id": t.mlflow_run_id,
                    "test_accuracy": t.metrics.get("test_accuracy"),
                }
                for t in sweep.trials
            ]
            (directory / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
            tracker.log_artifacts(directory)
        model_name = spec.base.model_name
        registered = tracker.client.search_model_versions(
            f"name = '{model_name}' and run_id = '{best.mlflow_run_id}'"
        )
        mine = [v for v in registered if v.tags.get("mlmesh.sweep_id") == sweep.sweep_id]
        if mine:
            version = int(mine[0].version)
        else:
            version = tracker.register(
                best.model_uri,
                model_name,
                {
                    "mlmesh.sweep_id": sweep.sweep_id,
                    "mlmesh.job_id": best.job_id,
                    "mlmesh.trial_number": str(best.number),
                },
            )
        tracker.end("FINISHED")
        return version
