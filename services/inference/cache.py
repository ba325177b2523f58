"""The prediction cache in Redis: answers keyed by model version and a digest of the input.

The key names the registered model, the version that computed the answer and its MLflow
run, so a promotion (a new version) never serves an older version's answers, nor does a
model deleted and registered again (its version numbers start over). Redis trouble never
fails a prediction: the cache reports a miss, the model computes, and the failure is logged
and counted. After a failure the cache stays out of the way for ``BACKOFF_S`` so a down Redis
costs one error, not one per request.
"""

from __future__ import annotations

import hashlib
import logging
import time

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
    """Reads and writes cached probabilities; a TTL of 0 turns it off."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._paused_until = 0.0

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
        try:
            values = await self._redis.mget(keys)
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return [None] * len(keys)
        return [
            np.frombuffer(v, dtype=np.float32)
            if v is not None and len(v) == _ANSWER_BYTES
            else None
            for v in values
        ]

    async def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store each (key, probabilities) with the TTL; failures are logged, not raised."""
        if not items or not self._usable():
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, probabilities in items:
                    pipe.set(key, probabilities.astype(np.float32).tobytes(), ex=self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("write", exc)
