"""The prediction cache in Redis: answers keyed by model version and a digest of the inputs.

The key names the registered model, the version that computed the answer and its MLflow
run, so a promotion (a new version) never serves an older version's answers, nor does a
model deleted and registered again (its version numbers start over). Redis trouble never
fails a prediction: the cache reports a miss, the model computes, and the failure is logged
and counted. After a failure the cache stays out of the way for ``BACKOFF_S`` so a down Redis
costs one error, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.inference import metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "mlmesh:predictions"
BACKOFF_S = 1.0


def _element_bytes(array: np.ndarray) -> bytes:
    """An array's elements as bytes: raw for numbers, length-prefixed for BYTES."""
    if array.dtype.kind != "O":
        return array.tobytes()
    parts = []
    for item in array.ravel().tolist():
        parts.append(struct.pack("<I", len(item)))
        parts.append(item)
    return b"".join(parts)


def cache_keys(
    scope: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], rows: int | None
) -> list[str]:
    """The cache keys of a request's answers by the model version ``scope`` names: one per
    row when the model is batched (``rows``), else one for the whole request.

    A key digests every input's name, datatype, shape and bytes, and the outputs asked for,
    so the same data sent as floats or as raw bytes (the same array) shares one entry.
    """
    head = hashlib.blake2b(digest_size=16)
    for name, array in inputs.items():
        shape = array.shape[1:] if rows is not None else array.shape
        head.update(f"{name}\0{array.dtype.str}\0{shape}\0".encode())
    head.update("\0".join(outputs).encode())
    if rows is None:
        digest = head.copy()
        for array in inputs.values():
            digest.update(_element_bytes(array))
        return [f"{KEY_PREFIX}:{scope}:{digest.hexdigest()}"]
    keys = []
    arrays = list(inputs.values())
    for i in range(rows):
        digest = head.copy()
        for array in arrays:
            digest.update(_element_bytes(array[i : i + 1]))
        keys.append(f"{KEY_PREFIX}:{scope}:{digest.hexdigest()}")
    return keys


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as one cache value: per array its name, numpy type, shape and elements."""
    parts = [struct.pack("<B", len(outputs))]
    for name, array in outputs.items():
        raw = name.encode()
        kind = array.dtype.str.encode()
        data = _element_bytes(array)
        parts.append(struct.pack(f"<B{len(raw)}sB{len(kind)}sB", len(raw), raw, len(kind), kind,
                                 array.ndim))  # fmt: skip
        parts.append(struct.pack(f"<{array.ndim}q", *array.shape))
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_outputs(value: bytes) -> dict[str, np.ndarray] | None:
    """The arrays encode_outputs stored, or None for a value it could not have written."""
    try:
        (count,), at = struct.unpack_from("<B", value), 1
        found = {}
        for _ in range(count):
            (size,) = struct.unpack_from("<B", value, at)
            name = value[at + 1 : at + 1 + size].decode()
            at += 1 + size
            (size,) = struct.unpack_from("<B", value, at)
            dtype = np.dtype(value[at + 1 : at + 1 + size].decode())
            at += 1 + size
            (ndim,) = struct.unpack_from("<B", value, at)
            shape = struct.unpack_from(f"<{ndim}q", value, at + 1)
            at += 1 + 8 * ndim
            (size,) = struct.unpack_from("<I", value, at)
            data = value[at + 4 : at + 4 + size]
            at += 4 + size
            found[name] = _array(data, dtype, shape)
        return found if at == len(value) else None
    except (struct.error, ValueError, TypeError, UnicodeDecodeError):
        return None


def _array(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind != "O":
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    items, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        items.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


class RedisLane:
    """A connection of its own to Redis, for a caller that keeps one round trip out at a time
    (the cache's MGETs; RedisWrites' SETs): no pool checkout per call, no task per send, and
    one deadline (the client's socket timeout) over each round trip. A failure closes the
    connection, so no reply is ever read out of turn; the next call connects again."""

    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        kwargs = dict(pool.connection_kwargs)
        self._timeout_s: float | None = kwargs.get("socket_timeout") or None
        kwargs["socket_timeout"] = None  # the deadline is ours, around each round trip
        self._connection = pool.connection_class(**kwargs)

    async def call(self, commands: Sequence[tuple[str | bytes | int, ...]]) -> list[object]:
        """Send ``commands`` in one write (connecting first if need be); their replies."""
        connection = self._connection
        try:
            async with asyncio.timeout(self._timeout_s):
                await connection.send_packed_command(connection.pack_commands(commands))
                return [await connection.read_response() for _ in commands]
        except TimeoutError as exc:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError(f"Redis did not answer in {self._timeout_s} s") from exc
        except BaseException:
            await connection.disconnect(nowait=True)
            raise

    async def aclose(self) -> None:
        await self._connection.disconnect()


class RedisWrites:
    """SETs with a time to live, on a lane of their own, one pipeline at a time: those asked
    for while a pipeline is out go in the next one. A lone request's write goes at once;
    under load, writes gather while the previous pipeline is out, so a round trip serves
    many requests. The prediction cache's answers and the feedback store's prediction ids
    share it: a request queues both (``add``) and awaits the one pipeline that carries them.

    That await ends when Redis has answered: only then is a read on another connection
    sure to find the writes. Redis does not always run first what reached it first; on
    this machine, a GET sent on another connection as soon as a SET had been written to
    the socket missed it 4 times in 2,000."""

    def __init__(self, redis: Redis) -> None:
        self.lane = RedisLane(redis)
        self._pending: list[tuple[str, bytes | str, int]] = []
        self._done: asyncio.Future[None] | None = None  # the next pipeline's
        self._sender: asyncio.Task[None] | None = None  # held: the loop's refs are weak
        self._on_failure: dict[Callable[[Exception], None], None] = {}  # the next pipeline's

    def add(
        self,
        items: Sequence[tuple[str, bytes | str]],
        ttl_s: int,
        on_failure: Callable[[Exception], None],
    ) -> asyncio.Future[None]:
        """Queue SETs for the next pipeline: the future of that pipeline. If it fails, it
        fails with what was raised, and ``on_failure`` is called with that once per
        pipeline (however many requests it carried for the same owner)."""
        loop = asyncio.get_running_loop()
        if self._done is None:
            self._done = loop.create_future()
        done = self._done
        self._pending.extend((key, value, ttl_s) for key, value in items)
        self._on_failure[on_failure] = None  # an ordered set
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return done

    async def _send(self) -> None:
        try:
            while self._pending:
                pending, self._pending = self._pending, []
                on_failure, self._on_failure = self._on_failure, {}
                done, self._done = self._done, None
                assert done is not None
                try:
                    await self.lane.call([("SET", k, v, "EX", ttl) for k, v, ttl in pending])
                except (RedisError, OSError) as exc:
                    for handler in on_failure:
                        handler(exc)
                    done.set_exception(exc)
                    done.exception()  # retrieved: the owners were told
                else:
                    done.set_result(None)
        finally:
            self._sender = None


class PredictionCache:
    """Reads and writes cached probabilities; a TTL of 0 turns it off.

    Concurrent requests share Redis round trips: one MGET is out at a time, and the reads
    asked for meanwhile go out together in the next; writes likewise, in pipelines
    (RedisWrites, with the feedback store's). A lone request waits for nobody; under load a
    round trip serves many requests instead of two per request. A write is awaited, so a
    caller's next request finds its answer cached.
    """

    def __init__(self, redis: Redis, ttl_s: int, writes: RedisWrites) -> None:
        self.lane = RedisLane(redis)  # the MGETs'
        self._ttl_s = ttl_s
        self._writes = writes
        self._paused_until = 0.0
        self._reads: list[tuple[list[str], asyncio.Future[list[bytes | None]]]] = []
        self._reader: asyncio.Task[None] | None = None  # held: the loop's refs are weak

    @property
    def enabled(self) -> bool:
        return self._ttl_s > 0

    def _usable(self) -> bool:
        return self.enabled and time.monotonic() >= self._paused_until

    def _failed(self, operation: str, exc: Exception) -> None:
        metrics.CACHE_ERRORS.labels(operation).inc()
        if time.monotonic() >= self._paused_until:
            log.warning(
                "prediction cache %s failed, serving uncached for %.0f s: %s: %s",
                operation,
                BACKOFF_S,
                type(exc).__name__,
                exc,
            )
        self._paused_until = time.monotonic() + BACKOFF_S

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The cached value of each key, or None where absent (or Redis failed)."""
        if not self._usable():
            return [None] * len(keys)
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._reads.append((keys, future))
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return await future

    def stage(self, items: list[tuple[str, bytes]]) -> asyncio.Future[None] | None:
        """Queue (key, value) entries to store with the TTL: the future of the pipeline that
        carries them (await it so that the next request finds them), None when there is
        nothing to store. A failure is logged and counted here; awaiting the future raises
        it, for the caller to ignore."""
        if not items or not self._usable():
            return None
        return self._writes.add(items, self._ttl_s, self._write_failed)

    def _write_failed(self, exc: Exception) -> None:
        self._failed("write", exc)

    async def _read(self) -> None:
        try:
            while self._reads:
                reads, self._reads = self._reads, []
                keys = [key for batch, _ in reads for key in batch]
                try:
                    (values,) = await self.lane.call([("MGET", *keys)])
                except (RedisError, OSError) as exc:
                    self._failed("read", exc)
                    values = [None] * len(keys)
                start = 0
                for batch, future in reads:
                    if not future.done():
                        future.set_result(values[start : start + len(batch)])
                    start += len(batch)
        finally:
            self._reader = None
