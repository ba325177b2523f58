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
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

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


class PredictionCache:
    """Reads and writes cached probabilities; a TTL of 0 turns it off.

    Concurrent requests share Redis round trips: the reads of every request that asks in one
    turn of the event loop go out as one MGET, and their writes as one pipeline. Under load
    that is one round trip for a whole batch of requests instead of two per request. A write
    is awaited, so a caller's next request finds its answer cached.
    """

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._paused_until = 0.0
        self._reads: list[tuple[list[str], asyncio.Future[list[bytes | None]]]] = []
        self._writes: list[tuple[list[tuple[str, bytes]], asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

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
        if not self._reads:
            self._start(self._flush_reads())
        self._reads.append((keys, future))
        return await future

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store each (key, value) with the TTL; failures are logged, not raised."""
        if not items or not self._usable():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._writes:
            self._start(self._flush_writes())
        self._writes.append((items, future))
        await future

    def _start(self, flush: Coroutine[Any, Any, None]) -> None:
        # The loop keeps only weak references to tasks: hold each flush until it is done.
        task = asyncio.get_running_loop().create_task(flush)
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush_reads(self) -> None:
        reads, self._reads = self._reads, []
        keys = [key for batch, _ in reads for key in batch]
        try:
            values = await self._redis.mget(keys)
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            values = [None] * len(keys)
        start = 0
        for batch, future in reads:
            if not future.done():
                future.set_result(values[start : start + len(batch)])
            start += len(batch)

    async def _flush_writes(self) -> None:
        writes, self._writes = self._writes, []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for batch, _ in writes:
                    for key, value in batch:
                        pipe.set(key, value, ex=self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("write", exc)
        for _, future in writes:
            if not future.done():
                future.set_result(None)
