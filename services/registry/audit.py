"""The audit log of registry changes, in mlmesh's own PostgreSQL tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.common.pagination import Page, decode_token, encode_token
from services.registry.store import Transition


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
        VALUES ($1, 'transition', $2, $3, $4, $5, $6, $7, $8)
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
