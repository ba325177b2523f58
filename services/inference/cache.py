"""The prediction cache in Redis: answers keyed by model version and a digest of the input.

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
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.inference import metrics
from services.training.ml.catalog import NUM_CLASSES

log = logging.getLogger(__name__)

KEY_PREFIX = "mlmesh:predictions"
BACKOFF_S = 1.0
_ANSWER_BYTES = NUM_CLASSES * 4  # ten float32 probabilities


def cache_key(scope: str, image: np.ndarray) -> str:
    """The key of ``image``'s answer by the model version ``scope`` names.

    The digest is over the canonical input, the float32 pixels the model sees, so the same
    image sent as floats or as raw bytes shares one entry.
    """
    digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
    return f"{KEY_PREFIX}:{scope}:{digest}"


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

    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        """The cached probabilities of each key, or None where absent (or Redis failed)."""
        if not self._usable():
            return [None] * len(keys)
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        if not self._reads:
            self._start(self._flush_reads())
        self._reads.append((keys, future))
        return [
            np.frombuffer(v, dtype=np.float32)
            if v is not None and len(v) == _ANSWER_BYTES
            else None
            for v in await future
        ]

    async def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store each (key, probabilities) with the TTL; failures are logged, not raised."""
        if not items or not self._usable():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._writes:
            self._start(self._flush_writes())
        self._writes.append(([(k, p.astype(np.float32).tobytes()) for k, p in items], future))
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
