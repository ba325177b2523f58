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
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class Numbered(Protocol):
    """An event with its place in its owner's history."""

    @property
    def sequence(self) -> int: ...

    @property
    def terminal(self) -> bool: ...


E = TypeVar("E", bound=Numbered)


async def append(
    conn: asyncpg.Connection,
    table: str,
    events_table: str,
    key_column: str,
    key: str,
    event: dict[str, Any],
) -> tuple[int, datetime]:
    """Append ``event`` to the history of row ``key`` of ``table``; its (sequence, time)."""
    row = await conn.fetchrow(
        f"""
        WITH seq AS (
            UPDATE {table} SET event_seq = event_seq + 1 WHERE {key_column} = $1
            RETURNING event_seq
        )
        INSERT INTO {events_table} ({key_column}, sequence, event)
        SELECT $1, event_seq, $2 FROM seq
        RETURNING sequence, time
        """,
        key,
        json.dumps(event),
    )
    return row["sequence"], row["time"]


async def announce(redis: Redis, channel: str, payload: str) -> None:
    """Publish an appended event; best effort, since followers also poll PostgreSQL."""
    try:
        await redis.publish(channel, payload)
    except RedisError as exc:
        log.warning("could not announce an event on %s: %s", channel, exc)


async def follow(
    redis: Redis,
    channel: str,
    events_after: Callable[[int], Awaitable[list[E]]],
    parse: Callable[[str | bytes], E],
    poll_s: float = 1.0,
) -> AsyncIterator[E]:
    """Every event from the first, then live ones, until a terminal event."""
    pubsub: Any = redis.pubsub()
    try:
        await pubsub.subscribe(channel)
    except RedisError as exc:
        log.warning("following %s without Redis: %s", channel, exc)
        pubsub = None
    last = 0
    try:
        while True:
            for event in await events_after(last):
                yield event
                last = event.sequence
                if event.terminal:
                    return
            announced = await _next_announcement(pubsub, parse, poll_s)
            if announced is not None and announced.sequence == last + 1:
                yield announced
                last = announced.sequence
                if announced.terminal:
                    return
    finally:
        if pubsub is not None:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()


async def _next_announcement(
    pubsub: Any, parse: Callable[[str | bytes], E], timeout_s: float
) -> E | None:
    if pubsub is None:
        await asyncio.sleep(timeout_s)
        return None
    try:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
    except RedisError:
        await asyncio.sleep(timeout_s)
        return None
    return parse(message["data"]) if message else None
