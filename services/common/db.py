"""PostgreSQL access for mlmesh's own tables: pools, databases and migrations (asyncpg)."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

# Each migration runs once, in order, inside one transaction; never edit a released one.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE audit_events (
            event_id          BIGSERIAL PRIMARY KEY,
            time              TIMESTAMPTZ NOT NULL DEFAULT now(),
            client            TEXT NOT NULL,
            action            TEXT NOT NULL,
            model_name        TEXT NOT NULL,
            version           INTEGER NOT NULL,
            from_stage        TEXT NOT NULL,
            to_stage          TEXT NOT NULL,
            previous_version  INTEGER NOT NULL DEFAULT 0,
            archived_versions INTEGER[] NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_events_model_idx ON audit_events (model_name, event_id DESC);
        """,
    ),
    (
        2,
        """
        CREATE TABLE training_jobs (
            job_id            TEXT PRIMARY KEY,
            state             TEXT NOT NULL,
            dataset           TEXT NOT NULL,
            architecture      TEXT NOT NULL,
            epochs            INTEGER NOT NULL,
            learning_rate     DOUBLE PRECISION NOT NULL,
            batch_size        INTEGER NOT NULL,
            optimizer         TEXT NOT NULL,
            seed              BIGINT NOT NULL,
            train_subset      INTEGER NOT NULL,
            experiment_name   TEXT NOT NULL,
            model_name        TEXT NOT NULL,
            model_version     INTEGER NOT NULL DEFAULT 0,
            mlflow_run_id     TEXT NOT NULL DEFAULT '',
            progress_epoch    INTEGER NOT NULL DEFAULT 0,
            progress_fraction DOUBLE PRECISION NOT NULL DEFAULT 0,
            metrics           JSONB NOT NULL DEFAULT '{}',
            error             TEXT NOT NULL DEFAULT '',
            submitted_by      TEXT NOT NULL,
            idempotency_key   TEXT,
            attempts          INTEGER NOT NULL DEFAULT 0,
            cancel_requested  BOOLEAN NOT NULL DEFAULT false,
            cancelled_by      TEXT NOT NULL DEFAULT '',
            event_seq         BIGINT NOT NULL DEFAULT 0,
            lease_until       TIMESTAMPTZ,
            worker            TEXT NOT NULL DEFAULT '',
            create_time       TIMESTAMPTZ NOT NULL DEFAULT now(),
            start_time        TIMESTAMPTZ,
            end_time          TIMESTAMPTZ,
            UNIQUE (submitted_by, idempotency_key)
        );
        CREATE INDEX training_jobs_list_idx ON training_jobs (create_time DESC, job_id DESC);
        CREATE INDEX training_jobs_state_idx ON training_jobs (state, create_time DESC);
        CREATE TABLE training_job_events (
            job_id   TEXT NOT NULL REFERENCES training_jobs ON DELETE CASCADE,
            sequence BIGINT NOT NULL,
            time     TIMESTAMPTZ NOT NULL DEFAULT now(),
            event    JSONB NOT NULL,
            PRIMARY KEY (job_id, sequence)
        );
        """,
    ),
    (
        3,
        """
        -- Hyperparameter sweeps; each trial is a training job. Optuna keeps its studies in a
        -- schema of their own (services/training/ml/search.py), apart from mlmesh's tables.
        CREATE SCHEMA IF NOT EXISTS optuna;
        ALTER TABLE training_jobs
            ADD COLUMN sweep_id     TEXT NOT NULL DEFAULT '',
            ADD COLUMN trial_number INTEGER NOT NULL DEFAULT 0,
            ADD COLUMN model_uri    TEXT NOT NULL DEFAULT '';
        CREATE TABLE sweeps (
            sweep_id         TEXT PRIMARY KEY,
            state            TEXT NOT NULL,
            spec             JSONB NOT NULL,
            study_name       TEXT NOT NULL,
            mlflow_run_id    TEXT NOT NULL DEFAULT '',
            best_trial       INTEGER,
            model_version    INTEGER NOT NULL DEFAULT 0,
            error            TEXT NOT NULL DEFAULT '',
            submitted_by     TEXT NOT NULL,
            idempotency_key  TEXT,
            cancel_requested BOOLEAN NOT NULL DEFAULT false,
            cancelled_by     TEXT NOT NULL DEFAULT '',
            event_seq        BIGINT NOT NULL DEFAULT 0,
            create_time      TIMESTAMPTZ NOT NULL DEFAULT now(),
            end_time         TIMESTAMPTZ,
            UNIQUE (submitted_by, idempotency_key)
        );
        CREATE INDEX sweeps_list_idx ON sweeps (create_time DESC, sweep_id DESC);
        CREATE TABLE sweep_trials (
            sweep_id         TEXT NOT NULL REFERENCES sweeps ON DELETE CASCADE,
            number           INTEGER NOT NULL,
            optuna_trial_id  BIGINT NOT NULL,
            job_id           TEXT NOT NULL REFERENCES training_jobs,
            state            TEXT NOT NULL,
            params           JSONB NOT NULL,
            value            DOUBLE PRECISION,
            epochs_completed INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (sweep_id, number)
        );
        CREATE TABLE sweep_events (
            sweep_id TEXT NOT NULL REFERENCES sweeps ON DELETE CASCADE,
            sequence BIGINT NOT NULL,
            time     TIMESTAMPTZ NOT NULL DEFAULT now(),
            event    JSONB NOT NULL,
            PRIMARY KEY (sweep_id, sequence)
        );
        """,
    ),
    (
        4,
        """
        -- What a transition's caller was told beyond the move itself (force overriding a
        -- refusal, for one).
        ALTER TABLE audit_events ADD COLUMN note TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        5,
        """
        -- A job's parameters as one JSON object, as services/training/params.py defines
        -- them: a new parameter needs no new column (records without it get its default).
        ALTER TABLE training_jobs ADD COLUMN params JSONB;
        UPDATE training_jobs SET params = jsonb_build_object(
            'dataset', dataset, 'architecture', architecture, 'epochs', epochs,
            'learning_rate', learning_rate, 'batch_size', batch_size, 'optimizer', optimizer,
            'seed', seed, 'train_subset', train_subset, 'experiment_name', experiment_name,
            'model_name', model_name);
        ALTER TABLE training_jobs
            ALTER COLUMN params SET NOT NULL,
            DROP COLUMN dataset, DROP COLUMN architecture, DROP COLUMN epochs,
            DROP COLUMN learning_rate, DROP COLUMN batch_size, DROP COLUMN optimizer,
            DROP COLUMN seed, DROP COLUMN train_subset, DROP COLUMN experiment_name,
            DROP COLUMN model_name;
        """,
    ),
    (
        6,
        """
        -- Uploaded dataset versions (services/datasets); their data lives in MLflow.
        CREATE TABLE datasets (
            name              TEXT NOT NULL,
            version           INTEGER NOT NULL,
            digest            TEXT NOT NULL,
            kind              TEXT NOT NULL,
            format            TEXT NOT NULL,
            samples           BIGINT NOT NULL,
            class_names       JSONB NOT NULL,
            class_counts      JSONB NOT NULL,
            input_shape       INTEGER[] NOT NULL,
            columns           JSONB NOT NULL,
            label_column      TEXT NOT NULL DEFAULT '',
            split_train       BIGINT NOT NULL,
            split_validation  BIGINT NOT NULL,
            split_test        BIGINT NOT NULL,
            split_from_upload BOOLEAN NOT NULL,
            mlflow_run_id     TEXT NOT NULL,
            size_bytes        BIGINT NOT NULL,
            filename          TEXT NOT NULL DEFAULT '',
            created_by        TEXT NOT NULL,
            create_time       TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (name, version),
            UNIQUE (name, digest)
        );
        """,
    ),
    (
        7,
        """
        -- Canary and shadow rollouts (services/registry/rollouts.py); at most one running
        -- per model. Live figures live in Redis while it runs, the final ones here.
        CREATE TABLE rollouts (
            rollout_id         TEXT PRIMARY KEY,
            model_name         TEXT NOT NULL,
            production_version INTEGER NOT NULL,
            candidate_version  INTEGER NOT NULL,
            mode               TEXT NOT NULL,
            weight             INTEGER NOT NULL,
            weight_steps       INTEGER[] NOT NULL DEFAULT '{}',
            step_interval_s    DOUBLE PRECISION NOT NULL DEFAULT 0,
            guards             JSONB NOT NULL,
            state              TEXT NOT NULL,
            decision           JSONB NOT NULL DEFAULT '{}',
            figures            JSONB NOT NULL DEFAULT '{}',
            started_by         TEXT NOT NULL,
            ended_by           TEXT NOT NULL DEFAULT '',
            step_time          TIMESTAMPTZ NOT NULL DEFAULT now(),
            create_time        TIMESTAMPTZ NOT NULL DEFAULT now(),
            end_time           TIMESTAMPTZ
        );
        CREATE UNIQUE INDEX rollouts_one_running ON rollouts (model_name)
            WHERE state = 'running';
        CREATE INDEX rollouts_list_idx ON rollouts (create_time DESC, rollout_id DESC);
        """,
    ),
]

# Any fixed number works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_ID = 0x6D6C6D657368


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def database_name(url: str) -> str:
    """The database a PostgreSQL URL names."""
    return urlsplit(url).path.lstrip("/")


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if it does not exist; True when it was created."""
    name = database_name(url)
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            return False  # created concurrently by another process
        return True
    finally:
        await conn.close()


async def drop_database(url: str) -> None:
    """Drop the database ``url`` names, disconnecting its sessions first."""
    name = database_name(url)
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def migrate(pool: asyncpg.Pool) -> None:
    """Apply pending migrations; safe to run from several processes at once."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %d", version)


async def connect_pool(url: str, *, wait_s: float = 30.0) -> asyncpg.Pool:
    """Open a pool, creating the database and migrating it; waits for PostgreSQL to come up."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            await ensure_database(url)
            pool = await asyncpg.create_pool(url, min_size=1, max_size=10)
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("PostgreSQL not reachable yet (%s); retrying", exc)
            await asyncio.sleep(1.0)
    await migrate(pool)
    return pool
