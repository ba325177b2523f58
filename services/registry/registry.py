"""Registry domain logic: MLflow reads and audited transitions. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg
from mlflow.entities import Experiment, FileInfo, Metric, Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import InvalidArgument, check_page_size
from services.common.events import MODEL_EVENTS_CHANNEL
from services.common.pagination import Page
from services.registry import audit
from services.registry.store import MlflowStore, Transition, parse_stage

log = logging.getLogger(__name__)


def _require(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument(f"{field} is required")
    return value


class Registry:
    """What the Registry service does, over an MLflow store, PostgreSQL and Redis."""

    def __init__(self, store: MlflowStore, pool: asyncpg.Pool, redis: Redis) -> None:
        self._store = store
        self._pool = pool
        self._redis = redis

    async def list_experiments(
        self, page_size: int, page_token: str, filter_string: str, order_by: list[str]
    ) -> Page[Experiment]:
        size = check_page_size(page_size)
        return await asyncio.to_thread(
            self._store.list_experiments, size, _mlflow_token(page_token), filter_string, order_by
        )

    async def get_experiment(self, experiment_id: str) -> Experiment:
        _require(experiment_id, "experiment_id")
        return await asyncio.to_thread(self._store.get_experiment, experiment_id)

    async def list_runs(
        self,
        experiment_ids: list[str],
        filter_string: str,
        order_by: list[str],
        page_size: int,
        page_token: str,
    ) -> Page[Run]:
        if not experiment_ids:
            raise InvalidArgument("experiment_ids is required: give at least one experiment id")
        size = check_page_size(page_size)
        return await asyncio.to_thread(
            self._store.list_runs,
            experiment_ids,
            filter_string,
            order_by,
            size,
            _mlflow_token(page_token),
        )

    async def get_run(self, run_id: str) -> Run:
        _require(run_id, "run_id")
        return await asyncio.to_thread(self._store.get_run, run_id)

    async def get_metric_history(self, run_id: str, metric_key: str) -> list[Metric]:
        _require(run_id, "run_id")
        _require(metric_key, "metric_key")
        return await asyncio.to_thread(self._store.get_metric_history, run_id, metric_key)

    async def list_artifacts(self, run_id: str, path: str) -> tuple[str, list[FileInfo]]:
        _require(run_id, "run_id")
        if path.startswith("/") or ".." in path.split("/"):
            raise InvalidArgument(f"path must be relative to the run's artifact root, got {path!r}")
        return await asyncio.to_thread(self._store.list_artifacts, run_id, path)

    async def list_registered_models(
        self, page_size: int, page_token: str, filter_string: str
    ) -> Page[RegisteredModel]:
        size = check_page_size(page_size)
        return await asyncio.to_thread(
            self._store.list_registered_models, size, _mlflow_token(page_token), filter_string
        )

    async def get_registered_model(self, name: str) -> RegisteredModel:
        _require(name, "name")
        return await asyncio.to_thread(self._store.get_registered_model, name)

    async def list_model_versions(
        self, name: str, page_size: int, page_token: str
    ) -> Page[ModelVersion]:
        _require(name, "name")
        size = check_page_size(page_size)
        return await asyncio.to_thread(
            self._store.list_model_versions, name, size, _mlflow_token(page_token)
        )

    async def get_model_version(self, name: str, version: int, alias: str) -> ModelVersion:
        _require(name, "name")
        if version < 0:
            raise InvalidArgument(f"version must be a positive number, got {version}")
        if version:
            return await asyncio.to_thread(self._store.get_model_version, name, version)
        _require(alias, "version or alias")
        return await asyncio.to_thread(self._store.get_model_version_by_alias, name, alias)

    async def transition(
        self, client: str, name: str, version: int, stage: str, archive_existing: bool
    ) -> tuple[Transition, audit.AuditEvent]:
        """Move a version to a stage and audit it; changes to one model are serialised."""
        _require(name, "model_name")
        if version <= 0:
            raise InvalidArgument(f"version must be a positive number, got {version}")
        stage = parse_stage(stage)
        async with self._pool.acquire() as conn, conn.transaction():
            # One transition per model at a time, across every replica of this service.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
            change = await asyncio.to_thread(
                self._store.transition, name, version, stage, archive_existing
            )
            event = await audit.record_transition(conn, client, name, change)
        await self._publish(event)
        log.info("client=%s moved %s v%d %s -> %s", client, name, version, change.from_stage, stage)
        return change, event

    async def list_audit_events(
        self, model_name: str, page_size: int, page_token: str
    ) -> Page[audit.AuditEvent]:
        size = check_page_size(page_size)
        if "\x00" in model_name:  # PostgreSQL text cannot hold it, so no event names it
            return Page([], "")
        return await audit.list_events(self._pool, model_name, size, page_token)

    async def _publish(self, event: audit.AuditEvent) -> None:
        # Best effort: inference replicas also poll the registry, so a lost event only delays.
        message = json.dumps(
            {
                "model_name": event.model_name,
                "version": event.version,
                "stage": event.to_stage,
                "event_id": event.event_id,
            }
        )
        try:
            await self._redis.publish(MODEL_EVENTS_CHANNEL, message)
        except RedisError as exc:
            log.warning("could not publish model event to Redis: %s", exc)


def _mlflow_token(page_token: str) -> str:
    """A page token checked to be one MLflow could have issued (base64, so ASCII): MLflow's
    server answers 500 to any other."""
    if not page_token.isascii():
        raise InvalidArgument("page_token is not one this service issued")
    return page_token
