"""The Inference service's Redis data path (its lanes: a connection each for the cache's
reads and for the writes) against a real redis-server of the test's own: an awaited write is
found by a read on any other connection at once; a failure (Redis down, a refused write, no
answer in time) fails the write and reaches its owner, and a read is a miss; a lane that
failed connects again."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.inference import metrics
from services.inference.cache import PredictionCache, RedisWrites
from tests.integration.replicas import PrivateRedisServer


@pytest.fixture
def server() -> Iterator[PrivateRedisServer]:
    redis = PrivateRedisServer()
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@contextlib.asynccontextmanager
async def client(url: str, timeout_s: float = 5.0) -> AsyncIterator[Redis]:
    redis = Redis.from_url(url, socket_timeout=timeout_s)
    try:
        yield redis
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def data_path(
    url: str, timeout_s: float = 5.0
) -> AsyncIterator[tuple[PredictionCache, RedisWrites]]:
    """The Inference service's cache and writes on a client of ``url``, as its build()
    makes them (a TTL of 60 s here); their lanes closed at the end."""
    async with client(url, timeout_s) as redis:
        writes = RedisWrites(redis)
        cache = PredictionCache(redis, 60, writes)
        try:
            yield cache, writes
        finally:
            await cache.lane.aclose()
            await writes.lane.aclose()


class Failures:
    def __init__(self) -> None:
        self.seen: list[Exception] = []

    def __call__(self, exc: Exception) -> None:
        self.seen.append(exc)


async def test_an_awaited_write_is_read_at_once_on_another_connection(
    server: PrivateRedisServer,
) -> None:
    async with data_path(server.url) as (_, writes), client(server.url) as other:
        failures = Failures()
        for i in range(300):
            await writes.add([(f"k{i}", f"v{i}")], 60, failures)
            assert await other.get(f"k{i}") == f"v{i}".encode()
        # many requests' writes in flight at once share pipelines, and all land
        sent = [writes.add([(f"many{i}", str(i))], 60, failures) for i in range(500)]
        await asyncio.gather(*sent)
        assert await other.mget([f"many{i}" for i in range(500)]) == [
            str(i).encode() for i in range(500)
        ]
        assert 0 < await other.ttl("many0") <= 60
        assert failures.seen == []


async def test_the_cache_reads_what_was_written_and_shares_reads(
    server: PrivateRedisServer,
) -> None:
    async with data_path(server.url) as (cache, _):
        written = cache.stage([("a", b"1"), ("b", b"2")])
        assert written is not None
        await written
        found = await asyncio.gather(*(cache.get_many(["a", "x", "b"]) for _ in range(50)))
        assert found == [[b"1", None, b"2"]] * 50


async def test_redis_down_fails_the_write_and_misses_the_read_then_both_recover(
    server: PrivateRedisServer,
) -> None:
    errors = metrics.CACHE_ERRORS.labels("read")
    async with data_path(server.url, timeout_s=1.0) as (cache, writes):
        await writes.add([("before", "1")], 60, Failures())
        assert await cache.get_many(["before"]) == [b"1"]

        server.stop()
        failures = Failures()
        # The open connection may still take the bytes (the kernel does not know yet that
        # its peer is gone); reading the reply fails then. The second connects: refused.
        for attempt in range(2):
            with pytest.raises(RedisConnectionError):
                await writes.add([("during", str(attempt))], 60, failures)
        assert len(failures.seen) == 2
        assert all(isinstance(exc, RedisConnectionError) for exc in failures.seen)
        before = errors._value.get()
        assert await cache.get_many(["before"]) == [None]  # a miss, never an error
        assert errors._value.get() == before + 1

        server.start()  # empty again: the server keeps nothing
        await writes.add([("after", "2")], 60, failures)
        await asyncio.sleep(1.1)  # the cache's back-off after a failure
        assert await cache.get_many(["after"]) == [b"2"]
        assert len(failures.seen) == 2


async def test_a_write_redis_refuses_fails_and_reaches_its_owner(
    server: PrivateRedisServer,
) -> None:
    async with data_path(server.url) as (_, writes), client(server.url) as admin:
        failures = Failures()
        await admin.config_set("maxmemory", "1")  # every write is refused: OOM
        with pytest.raises(ResponseError, match="maxmemory"):
            await writes.add([("refused", "1")], 60, failures)
        assert len(failures.seen) == 1 and isinstance(failures.seen[0], ResponseError)
        await admin.config_set("maxmemory", "0")
        await writes.add([("accepted", "1")], 60, failures)  # the lane connected again
        assert await admin.get("accepted") == b"1"
        assert len(failures.seen) == 1


async def test_a_redis_that_never_answers_times_out_and_the_read_is_a_miss() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        async with data_path(url, timeout_s=0.3) as (cache, writes):
            failures = Failures()
            # Connecting asks the server who it is: no answer in time, so the write fails.
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(writes.add([("k", "v")], 60, failures), 2)
            assert len(failures.seen) == 1 and isinstance(failures.seen[0], RedisTimeoutError)
            assert await asyncio.wait_for(cache.get_many(["k"]), 2) == [None]
    finally:
        silent.close()


def test_redis_errors_are_what_callers_catch() -> None:
    # Inference.answer and the cache catch RedisError and OSError; the lane raises only those.
    assert issubclass(RedisTimeoutError, RedisError)
    assert issubclass(RedisConnectionError, RedisError)
