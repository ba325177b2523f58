"""Numbered event histories in PostgreSQL, followed live through Redis announcements.

Training jobs and sweeps both keep their events this way: each event is appended in the
transaction that changes its owner's row (numbered by the row's ``event_seq``, so concurrent
writers never collide), then announced on a Redis channel. A follower reads the history
from PostgreSQL and takes announcements only as a shortcut, so one that joins late,
reconnects or loses Redis misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.pagination import Page, decode_token, encode_token
from services.training.events import Event

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class EventRecord(Generic[E]):
    """One event in the history of its owner, a job or a sweep."""

    owner: str  # the job's or the sweep's id
    sequence: int  # from 1, without gaps
    time: datetime
    event: E

    @property
    def terminal(self) -> bool:
        return self.event.ends_in is not None


@dataclass(frozen=True)
class EventLog(Generic[E]):
    """Where one kind of owner keeps its rows and their events, and how events read back."""

    table: str  # the owners' table, with its event_seq and state columns
    events_table: str
    key_column: str
    channel_prefix: str  # + the owner's id: the Redis channel of its live events
    parse: Callable[[Mapping[str, Any]], E]
    terminal_states: tuple[str, ...]

    def channel(self, owner: str) -> str:
        return self.channel_prefix + owner

    async def page(
        self, pool: asyncpg.Pool, state: str, page_size: int, page_token: str
    ) -> Page[asyncpg.Record]:
        """Owners' rows newest first, optionally only those in ``state``: one page, and the
        token of the next."""
        key = self.key_column
        after = decode_token(self.table, page_token) if page_token else None
        rows = await pool.fetch(
            f"""
            SELECT * FROM {self.table}
            WHERE ($1 = '' OR state = $1)
              AND ($2::timestamptz IS NULL OR (create_time, {key}) < ($2, $3))
            ORDER BY create_time DESC, {key} DESC
            LIMIT $4
            """,
            state,
            datetime.fromisoformat(after[0]) if after else None,
            after[1] if after else "",
            page_size + 1,
        )
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = encode_token(self.table, [last["create_time"].isoformat(), last[key]])
        return Page(rows[:page_size], token)

    async def write(
        self,
        conn: asyncpg.Connection,
        owner: str,
        event: E | None,
        changes: Mapping[str, Any],
    ) -> EventRecord[E] | None:
        """Apply column ``changes`` to the owner's row and append ``event``, in the caller's
        transaction. A terminal event also sets the state it ends in; a terminal state sets
        the end time. Dicts are stored as JSON."""
        if event is not None and event.ends_in is not None:
            changes = {**changes, "state": event.ends_in}
        if changes:
            sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(changes, start=2))
            if changes.get("state") in self.terminal_states:
                sets += ", end_time = now()"
            values = [json.dumps(v) if isinstance(v, dict) else v for v in changes.values()]
            await conn.execute(
                f"UPDATE {self.table} SET {sets} WHERE {self.key_column} = $1", owner, *values
            )
        if event is None:
            return None
        row = await conn.fetchrow(
            f"""
            WITH seq AS (
                UPDATE {self.table} SET event_seq = event_seq + 1 WHERE {self.key_column} = $1
                RETURNING event_seq
            )
            INSERT INTO {self.events_table} ({self.key_column}, sequence, event)
            SELECT $1, event_seq, $2 FROM seq
            RETURNING sequence, time
            """,
            owner,
            json.dumps(event.to_record()),
        )
        return EventRecord(owner, row["sequence"], row["time"], event)

    async def after(self, pool: asyncpg.Pool, owner: str, sequence: int) -> list[EventRecord[E]]:
        """The owner's events numbered above ``sequence``, in order."""
        rows = await pool.fetch(
            f"""
            SELECT * FROM {self.events_table} WHERE {self.key_column} = $1 AND sequence > $2
            ORDER BY sequence
            """,
            owner,
            sequence,
        )
        return [
            EventRecord(owner, r["sequence"], r["time"], self.parse(json.loads(r["event"])))
            for r in rows
        ]

    async def announce(self, redis: Redis, record: EventRecord[E]) -> None:
        """Publish an appended event; best effort, since followers also poll PostgreSQL."""
        payload = json.dumps(
            {
                "owner": record.owner,
                "sequence": record.sequence,
                "time": record.time.isoformat(),
                "event": record.event.to_record(),
            }
        )
        try:
            await redis.publish(self.channel(record.owner), payload)
        except RedisError as exc:
            log.warning("could not announce an event of %s: %s", record.owner, exc)

    def _announced(self, text: str | bytes) -> EventRecord[E]:
        data = json.loads(text)
        time = datetime.fromisoformat(data["time"])
        return EventRecord(data["owner"], data["sequence"], time, self.parse(data["event"]))

    async def follow(
        self, redis: Redis, pool: asyncpg.Pool, owner: str, poll_s: float = 1.0
    ) -> AsyncIterator[EventRecord[E]]:
        """Every event of ``owner`` from the first, then live ones, until a terminal event."""
        pubsub: Any = redis.pubsub()
        try:
            await pubsub.subscribe(self.channel(owner))
        except RedisError as exc:
            log.warning("following %s without Redis: %s", owner, exc)
            pubsub = None
        last = 0
        try:
            while True:
                for record in await self.after(pool, owner, last):
                    yield record
                    last = record.sequence
                    if record.terminal:
                        return
                announced = await self._next_announcement(pubsub, poll_s)
                if announced is not None and announced.sequence == last + 1:
                    yield announced
                    last = announced.sequence
                    if announced.terminal:
                        return
        finally:
            if pubsub is not None:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()

    async def _next_announcement(self, pubsub: Any, timeout_s: float) -> EventRecord[E] | None:
        if pubsub is None:
            await asyncio.sleep(timeout_s)
            return None
        try:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        except RedisError:
            await asyncio.sleep(timeout_s)
            return None
        return self._announced(message["data"]) if message else None
