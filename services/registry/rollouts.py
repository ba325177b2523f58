"""Rollouts: start, follow, promote and end a canary or shadow rollout, and the controller
that judges its guards.

A rollout lives in PostgreSQL (one running per model: a unique index), and every change is
announced on the model-events channel, so every Inference replica follows it at once (and
re-reads it periodically). The replicas add what they see to figures in Redis; the controller
runs in the Registry process, every MLMESH_ROLLOUT_CHECK_INTERVAL_S, and only in the replica
that holds a PostgreSQL advisory lock for the pass, so one acts however many run. It steps
a canary's weight on its schedule and, once the candidate has answered the guards' minimum
number of requests, rolls back on the first guard that breaks or promotes when all hold
(through the Registry's audited transition, the client named ``rollout <id>``). The reason
(the guard, both figures, the limit) is kept with the rollout and in the audit log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    check_page_size,
)
from services.common.pagination import Page, decode_token, encode_token
from services.common.rollouts import (
    ABORTED,
    CANARY,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    SHADOW,
    SUPERSEDED,
    Figures,
    Guards,
    Rollout,
    ShadowFigures,
    VersionFigures,
    read_figures,
    rollout_of,
    running_rollout,
)
from services.registry import audit, metrics

if TYPE_CHECKING:  # it imports this module
    from services.registry.registry import Registry

log = logging.getLogger(__name__)

CONTROLLER = "controller"
# Any fixed number: the controller's pass runs where this lock is held.
_CONTROLLER_LOCK_ID = 0x6D6C726F6C6C


@dataclass(frozen=True)
class Decision:
    """Why a rollout ended (RolloutDecision in the contract)."""

    guard: str
    message: str
    candidate_value: float | None = None
    production_value: float | None = None
    limit: float | None = None

    def as_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RolloutView:
    """A rollout with its figures."""

    rollout: Rollout
    figures: Figures


def check_guards(guards: Guards | None, mode: str) -> Guards:
    """The guards of a new rollout, or InvalidArgument naming what is wrong."""
    if guards is None:
        raise InvalidArgument(
            "guards are required: give min_requests and at least one of max_error_rate, "
            "max_p99_latency_ms, max_p99_latency_ratio, min_agreement (shadow), "
            "max_accuracy_drop"
        )
    if guards.min_requests < 1:
        raise InvalidArgument(f"guards.min_requests must be 1 or more, got {guards.min_requests}")
    if guards.min_feedback < 0:
        raise InvalidArgument(f"guards.min_feedback must be 0 or more, got {guards.min_feedback}")
    ranges = {
        "max_error_rate": (guards.max_error_rate, 0.0, 1.0),
        "min_agreement": (guards.min_agreement, 0.0, 1.0),
        "max_accuracy_drop": (guards.max_accuracy_drop, 0.0, 1.0),
    }
    for name, (value, low, high) in ranges.items():
        if value is not None and not low <= value <= high:
            raise InvalidArgument(f"guards.{name} must be between {low} and {high}, got {value}")
    for name, value in (
        ("max_p99_latency_ms", guards.max_p99_latency_ms),
        ("max_p99_latency_ratio", guards.max_p99_latency_ratio),
    ):
        if value is not None and not value > 0:
            raise InvalidArgument(f"guards.{name} must be above 0, got {value}")
    if guards.min_agreement is not None and mode != SHADOW:
        raise InvalidArgument("guards.min_agreement applies to shadow rollouts only")
    if all(
        v is None
        for v in (
            guards.max_error_rate,
            guards.max_p99_latency_ms,
            guards.max_p99_latency_ratio,
            guards.min_agreement,
            guards.max_accuracy_drop,
        )
    ):
        raise InvalidArgument(
            "guards need at least one of max_error_rate, max_p99_latency_ms, "
            "max_p99_latency_ratio, min_agreement (shadow), max_accuracy_drop"
        )
    return guards


def check_weights(mode: str, weight: int, steps: list[int], interval_s: float) -> None:
    if mode == SHADOW:
        if weight or steps:
            raise InvalidArgument("weight and weight_steps are for canary rollouts, not shadow")
        return
    if not 1 <= weight <= 99:
        raise InvalidArgument(f"weight must be 1 to 99 (percent) for a canary, got {weight}")
    before = weight
    for step in steps:
        if not before < step <= 99:
            raise InvalidArgument(
                f"weight_steps must rise above the weight, each at most 99: {steps} after "
                f"weight {weight}"
            )
        before = step
    if steps and not interval_s > 0:
        raise InvalidArgument("step_interval_seconds must be above 0 with weight_steps")
    if interval_s < 0:
        raise InvalidArgument(f"step_interval_seconds must be 0 or more, got {interval_s}")


def judge(rollout: Rollout, figures: Figures) -> Decision | None:
    """The controller's verdict: None while the candidate has too few requests (or the
    accuracy guard too few labels), a guard's rollback when one breaks, else promotion."""
    g = rollout.guards
    prod, cand = figures.production, figures.candidate
    seen = figures.shadow.compared if rollout.mode == SHADOW else cand.requests
    if seen < g.min_requests:
        return None
    checks: list[tuple[str, float | None, float | None, float | None, bool, str]] = []
    if g.max_error_rate is not None:
        checks.append(("max_error_rate", cand.error_rate, prod.error_rate, g.max_error_rate,
                       cand.error_rate > g.max_error_rate, "error rate"))  # fmt: skip
    if g.max_p99_latency_ms is not None:
        checks.append(("max_p99_latency_ms", cand.p99_latency_ms, prod.p99_latency_ms,
                       g.max_p99_latency_ms, cand.p99_latency_ms > g.max_p99_latency_ms,
                       "p99 latency (ms)"))  # fmt: skip
    if g.max_p99_latency_ratio is not None and prod.p99_latency_ms:
        ratio = cand.p99_latency_ms / prod.p99_latency_ms
        checks.append(("max_p99_latency_ratio", cand.p99_latency_ms, prod.p99_latency_ms,
                       g.max_p99_latency_ratio, ratio > g.max_p99_latency_ratio,
                       "p99 latency (ms)"))  # fmt: skip
    if g.min_agreement is not None:
        agreement = figures.shadow.agreement or 0.0
        checks.append(("min_agreement", agreement, None, g.min_agreement,
                       agreement < g.min_agreement, "agreement with production"))  # fmt: skip
    waiting_for_labels = False
    if g.max_accuracy_drop is not None:
        if min(prod.feedback, cand.feedback) < g.feedback_needed:
            waiting_for_labels = True
        else:
            c, p = cand.accuracy or 0.0, prod.accuracy or 0.0
            checks.append(("max_accuracy_drop", c, p, g.max_accuracy_drop,
                           c < p - g.max_accuracy_drop, "live accuracy"))  # fmt: skip
    for guard, c, p, limit, broken, what in checks:
        if broken:
            against = (
                f" (production v{rollout.production_version}: {p:.4g})" if p is not None else ""
            )
            return Decision(
                guard,
                f"{guard} broke: the candidate v{rollout.candidate_version}'s {what} is "
                f"{c:.4g}{against}; the limit is {limit:.4g}",
                c,
                p,
                limit,
            )
    if waiting_for_labels:
        return None
    held = "; ".join(f"{guard} {c:.4g} (limit {limit:.4g})" for guard, c, _, limit, _, _ in checks)
    return Decision(
        "all_guards",
        f"every guard held over {seen} requests of v{rollout.candidate_version}: {held}",
    )


class Rollouts:
    """Rollouts over PostgreSQL and Redis, promoting through the Registry."""

    def __init__(self, registry: Registry, pool: asyncpg.Pool, redis: Redis) -> None:
        self._registry = registry
        self._pool = pool
        self._redis = redis

    # -- the RPCs ------------------------------------------------------------------------------

    async def start(
        self,
        client: str,
        name: str,
        candidate: int,
        mode: str,
        weight: int,
        weight_steps: list[int],
        step_interval_s: float,
        guards: Guards | None,
    ) -> RolloutView:
        if not name.strip():
            raise InvalidArgument("model_name is required")
        if mode not in (CANARY, SHADOW):
            raise InvalidArgument("mode must be ROLLOUT_MODE_CANARY or ROLLOUT_MODE_SHADOW")
        if candidate <= 0:
            raise InvalidArgument(f"candidate_version must be a positive number, got {candidate}")
        check_weights(mode, weight, weight_steps, step_interval_s)
        guards = check_guards(guards, mode)
        try:
            await self._registry.model_version(name, candidate)
        except NotFound as exc:
            raise InvalidArgument(f"unknown candidate: {exc}") from exc
        await self._registry.require_loadable(client, name, candidate)
        rollout_id = "r-" + secrets.token_hex(6)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._registry.lock_model(conn, name)
            production = await self._registry.serving_production(conn, name)
            if not production:
                raise FailedPrecondition(
                    f"model {name!r} has no production version to roll out against: promote "
                    "one first (mlmesh promote)"
                )
            if production == candidate:
                raise InvalidArgument(
                    f"v{candidate} is {name!r}'s production version already; roll out another"
                )
            running = await running_rollout(conn, name)
            if running is not None:
                raise FailedPrecondition(
                    f"model {name!r} has a running rollout already ({running.rollout_id}, "
                    f"{running.mode} of v{running.candidate_version}): promote or abort it first"
                )
            row = await conn.fetchrow(
                """
                INSERT INTO rollouts (rollout_id, model_name, production_version,
                    candidate_version, mode, weight, weight_steps, step_interval_s, guards,
                    state, started_by)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                RETURNING *
                """,
                rollout_id,
                name,
                production,
                candidate,
                mode,
                weight,
                weight_steps,
                step_interval_s,
                json.dumps(guards.__dict__),
                RUNNING,
                client,
            )
            rollout = rollout_of(row)
            what = f"{mode} of v{candidate}" + (f" at {weight}%" if mode == CANARY else "")
            event = await audit.record_rollout(
                conn, client, audit.rollout_action(RUNNING), name, candidate, production,
                f"rollout {rollout_id} started: {what} against production v{production}",
            )  # fmt: skip
        metrics.AUDIT_EVENTS.labels(event.action).inc()
        metrics.ROLLOUTS.labels(name, RUNNING).inc()
        await self._registry.publish(event)
        log.info("client=%s started rollout %s of %s: %s", client, rollout_id, name, what)
        return await self._view(rollout)

    async def get(self, rollout_id: str) -> RolloutView:
        return await self._view(await self._load(self._pool, rollout_id))

    async def list(self, name: str, page_size: int, page_token: str) -> Page[RolloutView]:
        size = check_page_size(page_size)
        after = decode_token("rollouts", page_token) if page_token else None
        try:
            since = datetime.fromisoformat(after[0]) if after else None
            last_id = str(after[1]) if after else ""
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidArgument(f"page_token {page_token!r} is not one this API issued") from exc
        rows = await self._pool.fetch(
            """
            SELECT * FROM rollouts
            WHERE ($1 = '' OR model_name = $1)
              AND ($2::timestamptz IS NULL OR (create_time, rollout_id) < ($2, $3))
            ORDER BY create_time DESC, rollout_id DESC
            LIMIT $4
            """,
            name,
            since,
            last_id,
            size + 1,
        )
        found = [rollout_of(r) for r in rows[:size]]
        token = ""
        if len(rows) > size:
            last = found[-1]
            token = encode_token("rollouts", [last.create_time.isoformat(), last.rollout_id])
        return Page([await self._view(r) for r in found], token)

    async def watch(self, rollout_id: str, interval_s: float) -> AsyncIterator[RolloutView]:
        """The rollout now, then each time it (weight, figures, state) changes, until it ends."""
        last = None
        while True:
            view = await self.get(rollout_id)
            shown = (view.rollout.weight, view.rollout.state, view.figures)
            if shown != last:
                yield view
                last = shown
            if not view.rollout.running:
                return
            await asyncio.sleep(interval_s)

    async def promote(self, client: str, rollout_id: str) -> RolloutView:
        rollout = await self._load(self._pool, rollout_id)
        _require_running(rollout)
        figures = await read_figures(self._redis, rollout)
        decision = Decision("manual", f"promoted by {client} (PromoteRollout)")
        return await self._promote(rollout, figures, decision, client)

    async def abort(self, client: str, rollout_id: str, reason: str) -> RolloutView:
        rollout = await self._load(self._pool, rollout_id)
        _require_running(rollout)
        figures = await read_figures(self._redis, rollout)
        why = f"aborted by {client}" + (f": {reason}" if reason.strip() else "")
        ended = await self._end(rollout, ABORTED, Decision("manual", why), figures, client)
        if ended is None:
            raise FailedPrecondition(f"rollout {rollout_id} ended meanwhile")
        return ended

    # -- the controller ------------------------------------------------------------------------

    async def control(self) -> int:
        """One pass of the controller over every running rollout, if this replica holds the
        controller's lock; the rollouts it ended."""
        ended = 0
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _CONTROLLER_LOCK_ID):
                return 0  # another replica's controller is at it
            rows = await conn.fetch("SELECT * FROM rollouts WHERE state = $1", RUNNING)
            for row in rows:
                rollout = await self._step(rollout_of(row))
                figures = await read_figures(self._redis, rollout)
                metrics.export_figures(rollout, figures)
                decision = judge(rollout, figures)
                if decision is None:
                    continue
                if decision.guard == "all_guards":
                    await self._promote(rollout, figures, decision, CONTROLLER)
                else:
                    await self._end(rollout, ROLLED_BACK, decision, figures, CONTROLLER)
                ended += 1
        return ended

    async def control_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.control()
            except MeshError as exc:  # MLflow, PostgreSQL or Redis away: next time
                log.warning("rollout controller: %s", exc)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError) as exc:
                log.warning("rollout controller: %s: %s", type(exc).__name__, exc)
            except Exception:  # anything else must not end the controller for good
                log.exception("rollout controller pass failed")
            await asyncio.sleep(interval_s)

    async def _step(self, rollout: Rollout) -> Rollout:
        """Step a canary's weight when its schedule says so."""
        if rollout.mode != CANARY or not rollout.weight_steps:
            return rollout
        later = [w for w in rollout.weight_steps if w > rollout.weight]
        if not later:
            return rollout
        row = await self._pool.fetchrow(
            """
            UPDATE rollouts SET weight = $2, step_time = now()
            WHERE rollout_id = $1 AND state = 'running' AND weight = $3
              AND step_time + make_interval(secs => step_interval_s) <= now()
            RETURNING *
            """,
            rollout.rollout_id,
            later[0],
            rollout.weight,
        )
        if row is None:
            return rollout
        stepped = rollout_of(row)
        log.info("rollout %s of %s: canary weight %d%% -> %d%%", rollout.rollout_id,
                 rollout.model_name, rollout.weight, stepped.weight)  # fmt: skip
        await self._registry.publish_model(rollout.model_name)
        return stepped

    # -- internals -------------------------------------------------------------------------------

    async def _promote(
        self, rollout: Rollout, figures: Figures, decision: Decision, client: str
    ) -> RolloutView:
        """Move production to the candidate through the audited transition, which ends the
        rollout in its own transaction."""
        ending = RolloutEnd(rollout, PROMOTED, decision, figures, client)
        await self._registry.transition(
            f"rollout {rollout.rollout_id}",
            rollout.model_name,
            rollout.candidate_version,
            "Production",
            False,
            force=True,  # the rollout's evidence stands in for the promotion metric
            ending=ending,
        )
        return await self.get(rollout.rollout_id)

    async def _end(
        self, rollout: Rollout, state: str, decision: Decision, figures: Figures, client: str
    ) -> RolloutView | None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._registry.lock_model(conn, rollout.model_name)
            event = await end_rollout(conn, RolloutEnd(rollout, state, decision, figures, client))
        if event is None:
            return None
        metrics.AUDIT_EVENTS.labels(event.action).inc()
        await self._registry.publish(event)
        return await self.get(rollout.rollout_id)

    async def _load(self, db: asyncpg.Pool | asyncpg.Connection, rollout_id: str) -> Rollout:
        if not rollout_id.strip():
            raise InvalidArgument("rollout_id is required")
        row = await db.fetchrow("SELECT * FROM rollouts WHERE rollout_id = $1", rollout_id)
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return rollout_of(row)

    async def _view(self, rollout: Rollout) -> RolloutView:
        try:
            figures = await read_figures(self._redis, rollout)
        except (RedisError, OSError) as exc:
            log.warning("rollout %s: cannot read its figures from Redis: %s",
                        rollout.rollout_id, exc)  # fmt: skip
            figures = Figures.from_json(rollout.figures) if rollout.figures else no_figures(rollout)
        return RolloutView(rollout, figures)


def no_figures(rollout: Rollout) -> Figures:
    """Figures of nothing yet (Redis could not say)."""
    return Figures(
        VersionFigures(rollout.production_version),
        VersionFigures(rollout.candidate_version),
        ShadowFigures(),
    )


def _require_running(rollout: Rollout) -> None:
    if not rollout.running:
        raise FailedPrecondition(
            f"rollout {rollout.rollout_id} has ended ({rollout.state}); nothing to change"
        )


@dataclass(frozen=True)
class RolloutEnd:
    """How a rollout ends: its new state, why, its final figures, and who ended it."""

    rollout: Rollout
    state: str
    decision: Decision
    figures: Figures | None
    client: str


async def end_rollout(conn: asyncpg.Connection, end: RolloutEnd) -> audit.AuditEvent | None:
    """End a running rollout on ``conn`` (under the model's lock) and audit it; None when it
    was no longer running."""
    r = end.rollout
    figures = end.figures or no_figures(r)
    row = await conn.fetchrow(
        """
        UPDATE rollouts SET state = $2, decision = $3, figures = $4, ended_by = $5,
                            end_time = now()
        WHERE rollout_id = $1 AND state = 'running'
        RETURNING *
        """,
        r.rollout_id,
        end.state,
        json.dumps(end.decision.as_json()),
        json.dumps(figures.as_json()),
        end.client,
    )
    if row is None:
        return None
    metrics.ROLLOUTS.labels(r.model_name, end.state).inc()
    metrics.forget_figures(r)
    log.info("rollout %s of %s %s: %s", r.rollout_id, r.model_name, end.state,
             end.decision.message)  # fmt: skip
    return await audit.record_rollout(
        conn,
        end.client,
        audit.rollout_action(end.state),
        r.model_name,
        r.candidate_version,
        r.production_version,
        f"rollout {r.rollout_id} {end.state.replace('_', ' ')}: {end.decision.message}",
    )


def superseding(
    rollout: Rollout, figures: Figures | None, client: str, version: int, stage: str
) -> RolloutEnd:
    """The end of a rollout that a transition made by hand cuts short."""
    return RolloutEnd(
        rollout,
        SUPERSEDED,
        Decision("manual", f"ended by {client}'s transition of v{version} to {stage}"),
        figures,
        client,
    )
