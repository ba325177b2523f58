"""Registry domain logic: MLflow reads and audited transitions. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import asyncpg
from mlflow.entities import Experiment, FileInfo, Metric, Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.aliases import STAGE_OF_ALIAS, audited_models, recorded_alias
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    check_page_size,
)
from services.common.events import MODEL_EVENTS_CHANNEL
from services.common.pagination import Page
from services.common.rollouts import Figures, Rollout, read_figures, running_rollout
from services.registry import audit, metrics
from services.registry.rollouts import RolloutEnd, end_rollout, superseding
from services.registry.serving import ServingCheck
from services.registry.store import STAGE_ALIASES, RegistryStore, Transition, parse_stage

log = logging.getLogger(__name__)


def _require(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument(f"{field} is required")
    return value


PRODUCTION = "Production"


@dataclass(frozen=True)
class Comparison:
    """A production candidate's promotion metric beside the production version's."""

    metric_key: str
    higher_is_better: bool
    candidate_value: float | None
    production_version: int
    production_value: float | None

    @property
    def worse(self) -> bool:
        if self.candidate_value is None or self.production_value is None:
            return False
        if self.higher_is_better:
            return self.candidate_value < self.production_value
        return self.candidate_value > self.production_value

    def describe(self, version: int) -> str:
        return (
            f"v{version}'s {self.metric_key} {self.candidate_value:.4g} is worse than "
            f"production v{self.production_version}'s {self.production_value:.4g}"
            f" ({'higher' if self.higher_is_better else 'lower'} is better)"
        )


@dataclass(frozen=True)
class TransitionOutcome:
    """What a transition changed, its audit record, and what was compared."""

    change: Transition
    event: audit.AuditEvent
    comparison: Comparison | None
    forced: bool


class Registry:
    """What the Registry service does, over an MLflow store, PostgreSQL and Redis."""

    def __init__(
        self,
        store: RegistryStore,
        pool: asyncpg.Pool,
        redis: Redis,
        serving: ServingCheck,
        promotion_metric: str,
        inference_follows_mlflow: bool = False,
    ) -> None:
        self._store = store
        self._pool = pool
        self._redis = redis
        self._serving = serving
        self._promotion_metric = promotion_metric
        self._inference_follows_mlflow = inference_follows_mlflow

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
        self,
        client: str,
        name: str,
        version: int,
        stage: str,
        archive_existing: bool,
        force: bool = False,
        ending: RolloutEnd | None = None,
    ) -> TransitionOutcome:
        """Move a version to a stage and audit it; changes to one model are serialised.

        Refused (FailedPrecondition, before anything moves or is audited): a version the
        Inference service cannot load, to Production or Staging; without ``force``, a move
        of the production version elsewhere (the model would have none), and a production
        candidate worse than production on the promotion metric.

        A running rollout of the model ends with it, in the same transaction: ``ending``
        (a rollout promoting its candidate) says how; any other transition supersedes it,
        and both audit records say so.
        """
        _require(name, "model_name")
        if version <= 0:
            raise InvalidArgument(f"version must be a positive number, got {version}")
        stage = parse_stage(stage)
        await asyncio.to_thread(self._store.get_model_version, name, version)  # NotFound
        if STAGE_ALIASES[stage]:
            try:
                await self._serving.require_loadable(client, name, version)
            except FailedPrecondition:
                metrics.TRANSITIONS_REFUSED.labels("cannot_serve").inc()
                raise
        notes: list[str] = []
        ended: audit.AuditEvent | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            await self.lock_model(conn, name)
            production = await self._serving_production(conn, name)
            if stage != PRODUCTION and production == version:
                why = (
                    f"v{version} is the production version of {name!r}: moving it to {stage} "
                    f"would leave {name!r} without a production version"
                )
                if not force:
                    metrics.TRANSITIONS_REFUSED.labels("production_left_empty").inc()
                    raise FailedPrecondition(
                        f"{why}. Promote another version to production first, or send "
                        "force=true (mlmesh promote --force) to do it anyway"
                    )
                notes.append(f"forced: {why}")
            comparison = None
            if stage == PRODUCTION and production != version:
                comparison = await self._compare(name, version, production)
                if comparison is not None and comparison.worse:
                    if not force:
                        metrics.TRANSITIONS_REFUSED.labels("worse_metric").inc()
                        raise FailedPrecondition(
                            f"{comparison.describe(version)}; send force=true (mlmesh promote "
                            "--force) to promote it anyway"
                        )
                    notes.append(f"forced: {comparison.describe(version)}")
            running = await running_rollout(conn, name)
            # A transition of production, or of either version of a running rollout, ends it.
            touches = running is not None and (
                stage == PRODUCTION
                or version in (running.candidate_version, running.production_version)
            )
            if ending is None and running is not None and touches:
                ending = superseding(running, await self._figures(running), client, version, stage)
            if ending is not None:
                ended = await end_rollout(conn, ending)
                if ended is not None:
                    notes.append(ended.note)
            change = await asyncio.to_thread(
                self._store.transition, name, version, stage, archive_existing
            )
            event = await audit.record_transition(conn, client, name, change, "; ".join(notes))
        metrics.TRANSITIONS.labels(name, stage).inc()
        metrics.AUDIT_EVENTS.labels(event.action).inc()
        if ended is not None:
            metrics.AUDIT_EVENTS.labels(ended.action).inc()
        await self.publish(event)
        log.info("client=%s moved %s v%d %s -> %s%s", client, name, version, change.from_stage,
                 stage, f" ({event.note})" if event.note else "")  # fmt: skip
        return TransitionOutcome(change, event, comparison, bool(notes))

    @staticmethod
    async def lock_model(conn: asyncpg.Connection, name: str) -> None:
        """Serialise changes to one model (transitions, rollouts) across every replica, for
        the rest of ``conn``'s transaction."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)

    async def model_version(self, name: str, version: int) -> ModelVersion:
        return await asyncio.to_thread(self._store.get_model_version, name, version)

    async def require_loadable(self, client: str, name: str, version: int) -> None:
        """FailedPrecondition when the Inference service cannot load the version."""
        await self._serving.require_loadable(client, name, version)

    async def serving_production(self, conn: asyncpg.Connection, name: str) -> int:
        return await self._serving_production(conn, name)

    async def _figures(self, rollout: Rollout) -> Figures | None:
        try:
            return await read_figures(self._redis, rollout)
        except (RedisError, OSError) as exc:
            log.warning("cannot read rollout %s's figures: %s", rollout.rollout_id, exc)
            return None

    async def _serving_production(self, conn: asyncpg.Connection, name: str) -> int:
        """The production version the Inference service serves (0: none): as mlmesh recorded
        it, which a change made in MLflow around mlmesh does not move; MLflow's own alias
        where the Inference service follows MLflow's aliases."""
        alias = STAGE_ALIASES[PRODUCTION] or ""
        if self._inference_follows_mlflow:
            return (await asyncio.to_thread(self._store.aliases, name)).get(alias, 0)
        return await recorded_alias(conn, name, alias) or 0

    async def _compare(self, name: str, version: int, production: int) -> Comparison | None:
        """The promotion metric of ``version`` and of the ``production`` version (0: none)."""
        key = self._promotion_metric.strip()
        if not key:
            return None
        higher_is_better = not key.startswith("-")
        key = key.lstrip("-")

        def value(v: int) -> float | None:
            run_id = self._store.get_model_version(name, v).run_id or ""
            return self._store.run_metric(run_id, key)

        candidate = await asyncio.to_thread(value, version)
        current = await asyncio.to_thread(value, production) if production else None
        return Comparison(key, higher_is_better, candidate, production, current)

    async def list_audit_events(
        self, model_name: str, page_size: int, page_token: str
    ) -> Page[audit.AuditEvent]:
        size = check_page_size(page_size)
        return await audit.list_events(self._pool, model_name, size, page_token)

    # -- changes made around mlmesh ------------------------------------------------------------

    async def check_aliases(self) -> list[audit.AuditEvent]:
        """Compare MLflow's production and staging aliases of every model with those mlmesh
        recorded; record each new difference in the audit log as changed_outside_mlmesh (once,
        across replicas), count it, and keep ``registry_alias_mismatch`` at 1 while it lasts.
        The events recorded now."""
        found = await asyncio.to_thread(self._store.all_aliases)
        names = sorted(set(found) | set(await audited_models(self._pool)))
        events = []
        for name in names:
            for alias in STAGE_OF_ALIAS:
                recorded = await recorded_alias(self._pool, name, alias)
                if found.get(name, {}).get(alias) == recorded:
                    self._mismatch(name, alias, False)
                    continue
                # Look again under the model's lock: a transition moves MLflow's alias and
                # records it in one transaction, which must not look like a change outside.
                event = await self._record_if_outside(name, alias)
                if event is not None:
                    events.append(event)
        return events

    async def _record_if_outside(self, name: str, alias: str) -> audit.AuditEvent | None:
        stage = STAGE_OF_ALIAS[alias]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
            recorded = await recorded_alias(conn, name, alias)
            actual = (await asyncio.to_thread(self._store.aliases_if_registered, name)).get(alias)
            self._mismatch(name, alias, actual != recorded)
            if actual == recorded or await audit.outside_change_recorded(
                conn, name, stage, actual or 0
            ):
                return None
            served = (
                "The Inference service follows MLflow's aliases "
                "(MLMESH_INFERENCE_FOLLOW_MLFLOW_ALIASES), so it serves this change."
                if self._inference_follows_mlflow
                else "The Inference service goes on serving what mlmesh recorded; promote "
                "through TransitionModelVersion to serve another version."
            )
            event = await audit.record_outside_change(
                conn, name, alias, stage, actual, recorded, served
            )
        metrics.OUTSIDE_CHANGES.labels(name, alias).inc()
        metrics.AUDIT_EVENTS.labels(event.action).inc()
        log.warning("%s", event.note)
        return event

    @staticmethod
    def _mismatch(name: str, alias: str, differs: bool) -> None:
        if differs:
            metrics.ALIAS_MISMATCH.labels(name, alias).set(1)
        else:
            try:
                metrics.ALIAS_MISMATCH.remove(name, alias)
            except KeyError:  # never differed
                pass

    async def watch_aliases(self, interval_s: float) -> None:
        """check_aliases every ``interval_s``, for as long as the process runs."""
        while True:
            try:
                await self.check_aliases()
            except MeshError as exc:  # MLflow or PostgreSQL away: look again next time
                log.warning("could not compare MLflow's aliases with the audit log: %s", exc)
            except Exception:  # anything else must not end the watch for good either
                log.exception("comparing MLflow's aliases with the audit log failed")
            await asyncio.sleep(interval_s)

    async def publish(self, event: audit.AuditEvent) -> None:
        """Announce a change of a model (a transition, a rollout) on the model-events channel."""
        await self._announce(
            {
                "model_name": event.model_name,
                "version": event.version,
                "stage": event.to_stage,
                "event_id": event.event_id,
                "action": event.action,
            }
        )

    async def publish_model(self, name: str) -> None:
        """Announce that something of ``name`` changed that is not audited (a canary step)."""
        await self._announce({"model_name": name, "action": "rollout_changed"})

    async def _announce(self, event: dict) -> None:
        # Best effort: inference replicas also poll the registry, so a lost event only delays.
        message = json.dumps(event)
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
