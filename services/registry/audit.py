"""The audit log of registry changes, in mlmesh's own PostgreSQL tables.

Actions: ``transition`` (a TransitionModelVersion, recorded in the transaction that moves
MLflow's alias), ``changed_outside_mlmesh`` (the Registry found MLflow's production or
staging alias where no transition put it: someone changed it with direct access to MLflow or
its database), and a rollout's start and end (``rollout_started``, ``rollout_promoted``,
``rollout_rolled_back``, ``rollout_aborted``, ``rollout_superseded``; version is the
candidate, previous_version production, the note the decision).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.common.pagination import Page, decode_token, encode_token
from services.registry.store import Transition

TRANSITION = "transition"
CHANGED_OUTSIDE = "changed_outside_mlmesh"
# Who made a change found in MLflow is not known; this stands in the client column.
OUTSIDE_CLIENT = "unknown (outside mlmesh)"


@dataclass(frozen=True)
class AuditEvent:
    """One recorded change."""

    event_id: int
    time: datetime
    client: str
    action: str
    model_name: str
    version: int
    from_stage: str
    to_stage: str
    previous_version: int
    archived_versions: list[int]
    note: str = ""


def _event(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(**{**dict(row), "archived_versions": list(row["archived_versions"])})


async def record_transition(
    conn: asyncpg.Connection, client: str, name: str, transition: Transition, note: str = ""
) -> AuditEvent:
    """Insert the audit row of a transition on ``conn`` (inside the caller's transaction)."""
    row = await conn.fetchrow(
        """
        INSERT INTO audit_events (client, action, model_name, version, from_stage, to_stage,
                                  previous_version, archived_versions, note)
        VALUES ($1, $9, $2, $3, $4, $5, $6, $7, $8)
        RETURNING *
        """,
        client,
        name,
        int(transition.model_version.version),
        transition.from_stage,
        transition.to_stage,
        transition.previous_version,
        transition.archived_versions,
        note,
        TRANSITION,
    )
    return _event(row)


def rollout_action(state: str) -> str:
    """The audit action of a rollout that started (``running``) or ended in ``state``."""
    return "rollout_started" if state == "running" else f"rollout_{state}"


async def record_rollout(
    conn: asyncpg.Connection,
    client: str,
    action: str,
    name: str,
    candidate: int,
    production: int,
    note: str,
) -> AuditEvent:
    """Insert the audit row of a rollout's start or end on ``conn`` (the caller's transaction)."""
    row = await conn.fetchrow(
        """
        INSERT INTO audit_events (client, action, model_name, version, from_stage, to_stage,
                                  previous_version, archived_versions, note)
        VALUES ($1, $2, $3, $4, '', '', $5, '{}', $6)
        RETURNING *
        """,
        client,
        action,
        name,
        candidate,
        production,
        note,
    )
    return _event(row)


async def outside_change_recorded(
    conn: asyncpg.Connection, name: str, stage: str, version: int
) -> bool:
    """Whether the latest event of ``name``'s ``stage`` already records its alias at
    ``version`` (0: removed) as changed outside mlmesh, so it is recorded once, however
    often and by however many Registry replicas it is found."""
    row = await conn.fetchrow(
        """
        SELECT action, version FROM audit_events
        WHERE model_name = $1 AND to_stage = $2
        ORDER BY event_id DESC
        LIMIT 1
        """,
        name,
        stage,
    )
    return row is not None and row["action"] == CHANGED_OUTSIDE and row["version"] == version


async def record_outside_change(
    conn: asyncpg.Connection,
    name: str,
    alias: str,
    stage: str,
    found: int | None,
    recorded: int | None,
    served: str,
) -> AuditEvent:
    """Insert the audit row of an alias found changed outside mlmesh: ``version`` is where
    MLflow's alias points (0: it was removed), ``previous_version`` where mlmesh recorded it
    (0: nowhere); the note says what happened and what is served."""
    where = f"to v{found}" if found else "(removed)"
    expected = f"v{recorded}" if recorded else "no version"
    note = (
        f"changed outside mlmesh: MLflow's {alias} alias of {name!r} was set {where} without "
        f"TransitionModelVersion; mlmesh recorded {expected} there. {served}"
    )
    row = await conn.fetchrow(
        """
        INSERT INTO audit_events (client, action, model_name, version, from_stage, to_stage,
                                  previous_version, archived_versions, note)
        VALUES ($1, $2, $3, $4, '', $5, $6, '{}', $7)
        RETURNING *
        """,
        OUTSIDE_CLIENT,
        CHANGED_OUTSIDE,
        name,
        found or 0,
        stage,
        recorded or 0,
        note,
    )
    return _event(row)


async def list_events(
    pool: asyncpg.Pool, model_name: str, page_size: int, page_token: str
) -> Page[AuditEvent]:
    """A page of events, newest first, optionally of one model."""
    before = decode_token("audit", page_token)[0] if page_token else None
    rows = await pool.fetch(
        """
        SELECT * FROM audit_events
        WHERE ($1 = '' OR model_name = $1) AND ($2::bigint IS NULL OR event_id < $2)
        ORDER BY event_id DESC
        LIMIT $3
        """,
        model_name,
        before,
        page_size + 1,
    )
    events = [_event(r) for r in rows[:page_size]]
    more = len(rows) > page_size
    return Page(events, encode_token("audit", [events[-1].event_id]) if more else "")
