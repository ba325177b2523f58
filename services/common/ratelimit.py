"""Per-client rate limits, held in Redis so that every replica of a service draws on one bucket.

Each route class (training submissions, predictions, registry writes) has a token bucket per
API-key client: ``burst`` tokens, refilled at ``rate`` per second; a request takes one. The
refill and the take are one Lua script, atomic in Redis and timed by Redis's clock, so two
replicas (or twenty) enforce one limit between them. Over the limit, a request fails with
``RESOURCE_EXHAUSTED`` (429 over REST) and a ``retry-after`` in whole seconds.

Limits come from ``MLMESH_RATE_LIMITS``: ``class=RATE/UNIT:BURST`` entries separated by commas,
``UNIT`` one of ``s``, ``m``, ``h``; ``class=off`` lifts a class's limit; ``class@client=...``
sets one client's own limit (a batch client may get more, a trial key less). If Redis cannot
be asked, predictions are let through (logged and counted in ``rate_limit_errors_total``),
because serving must not depend on the limiter; submissions and registry writes are refused
with ``UNAVAILABLE``.
"""

from __future__ import annotations

import logging
import math
import time

import grpc
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import MeshError, Unavailable
from services.common.limits import (  # the grammar of MLMESH_RATE_LIMITS, a leaf of the kit
    PREDICTIONS,
    REGISTRY_WRITES,
    TRAINING_SUBMISSIONS,
    Limit,
    Limits,
)

log = logging.getLogger(__name__)

# Classes that keep serving when Redis cannot be asked.
FAIL_OPEN = frozenset({PREDICTIONS})

# The route class of each limited RPC. Every other RPC is not limited.
RPC_CLASSES: dict[str, str] = {
    "/mlmesh.training.v1.TrainingService/SubmitTrainingJob": TRAINING_SUBMISSIONS,
    "/mlmesh.training.v1.TrainingService/SubmitSweep": TRAINING_SUBMISSIONS,
    "/mlmesh.registry.v1.RegistryService/TransitionModelVersion": REGISTRY_WRITES,
    "/mlmesh.registry.v1.RegistryService/StartRollout": REGISTRY_WRITES,
    "/mlmesh.registry.v1.RegistryService/PromoteRollout": REGISTRY_WRITES,
    "/mlmesh.registry.v1.RegistryService/AbortRollout": REGISTRY_WRITES,
    "/mlmesh.inference.v1.InferenceService/Predict": PREDICTIONS,
    "/mlmesh.inference.v1.InferenceService/PredictBatch": PREDICTIONS,
    "/mlmesh.inference.v1.InferenceService/PredictStream": PREDICTIONS,
    "/mlmesh.inference.v1.InferenceService/SubmitFeedback": PREDICTIONS,
    "/inference.GRPCInferenceService/ModelInfer": PREDICTIONS,
}

KEY_PREFIX = "mlmesh:ratelimit"

DENIED = Counter(
    "rate_limit_denied_total", "Requests refused for going over a rate limit.", ("route_class",)
)
ERRORS = Counter(
    "rate_limit_errors_total",
    "Rate-limit checks that could not ask Redis (predictions were let through).",
    ("route_class",),
)

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst. Returns {allowed (0/1), seconds to wait}.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, tostring(wait)}
"""


class RateLimited(MeshError):
    """Over a rate limit; ``retry_after_s`` says when a token is back."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """The Retry-After value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiter:
    """Takes a token from a client's bucket of a route class, or says how long to wait."""

    def __init__(self, redis: Redis, limits: Limits) -> None:
        self._redis = redis
        self._limits = limits
        self._script = redis.register_script(_TOKEN_BUCKET)
        self._last_warning = 0.0

    def limit(self, route_class: str, client: str) -> Limit | None:
        """The limit of ``client`` in ``route_class``: its own, else everyone's, else none."""
        own = self._limits.get((route_class, client), False)
        return self._limits.get((route_class, "")) if own is False else own

    async def acquire(self, route_class: str, client: str) -> None:
        """Take one request's token; RateLimited when there is none."""
        limit = self.limit(route_class, client)
        if limit is None:
            return
        key = f"{KEY_PREFIX}:{route_class}:{client}"
        try:
            allowed, wait = await self._script(keys=[key], args=[limit.rate, limit.burst])
        except (RedisError, OSError) as exc:
            ERRORS.labels(route_class).inc()
            now = time.monotonic()
            if now - self._last_warning > 10.0:  # at most one line per 10 s in an outage
                self._last_warning = now
                log.warning("rate limiter cannot ask Redis (%s): %s %s", exc, route_class,
                            "let through" if route_class in FAIL_OPEN else "refused")  # fmt: skip
            if route_class in FAIL_OPEN:
                return
            raise Unavailable(
                f"the rate limiter cannot reach Redis, so {route_class.replace('_', ' ')} are "
                "refused for now; retry shortly"
            ) from exc
        if not int(allowed):
            DENIED.labels(route_class).inc()
            wait_s = float(wait)
            raise RateLimited(
                f"client {client!r} is over its {route_class.replace('_', ' ')} rate limit of "
                f"{limit}; retry in {wait_s:.2f} s",
                wait_s,
            )
