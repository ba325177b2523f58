"""Per-client rate limits, held in Redis so that every replica of a service draws on one bucket.

Each route class (training submissions, predictions, registry writes) has a token bucket per
API-key client: ``burst`` tokens, refilled at ``rate`` per second; a request takes one. The
refill and the take are one Lua script, atomic in Redis and timed by Redis's clock, so two
replicas (or twenty) enforce one limit between them. Over the limit, a request fails with
``RESOURCE_EXHAUSTED`` (429 over REST) and a ``retry-after`` in whole seconds.

For predictions (the hot path; the other classes are rare and stay exact, a Redis call per
request), a replica does not ask Redis for every request: it takes a *lease* of tokens from
the bucket in one call (``lease_size``: 1/20 of a second's rate, at most 1/20 of the burst,
at least 1) and spends it locally; requests that find the lease empty while a refill is out
share it. A lease unused after ``LEASE_TTL_S`` is dropped, not spent later. So no
request is ever let through without a token taken from the shared bucket, and the tolerance
is one lease per replica and client: a replica may spend a lease up to ``LEASE_TTL_S`` after
the bucket gave it (at most ``lease_size`` requests earlier than an exact bucket would), and a
client may be refused while up to ``lease_size - 1`` of its tokens sit unspent in another
replica's lease. Small limits (a rate under 40/s with a burst under 40) lease one token at a
time: exact, as a Redis call per request.

Limits come from ``MLMESH_RATE_LIMITS``: ``class=RATE/UNIT:BURST`` entries separated by commas,
``UNIT`` one of ``s``, ``m``, ``h``; ``class=off`` lifts a class's limit; ``class@client=...``
sets one client's own limit (a batch client may get more, a trial key less). If Redis cannot
be asked, predictions are let through (logged and counted in ``rate_limit_errors_total``),
because serving must not depend on the limiter; submissions and registry writes are refused
with ``UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

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

# A lease: 1/LEASE_SHARE of a second's rate, at most 1/LEASE_SHARE of the burst, at least 1.
LEASE_SHARE = 20
# Tokens of a lease not spent this long after the bucket gave them are dropped.
LEASE_TTL_S = 1.0

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst, tokens wanted. Takes as many of the
# wanted tokens as the bucket holds (whole ones). Returns {tokens taken, seconds until the
# next token when none was}.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
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
local taken = math.min(wanted, math.floor(tokens))
local wait = 0
if taken >= 1 then
  tokens = tokens - taken
else
  taken = 0
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {taken, tostring(wait)}
"""


# Classes whose tokens are leased; every other class takes one token per call to Redis, so
# that its limit is exact and an outage refuses the very next request.
LEASED = frozenset({PREDICTIONS})


def lease_size(limit: Limit, route_class: str = PREDICTIONS) -> int:
    """Tokens one replica takes from a bucket of ``limit`` per call to Redis."""
    if route_class not in LEASED:
        return 1
    return max(1, min(int(limit.rate / LEASE_SHARE), limit.burst // LEASE_SHARE))


@dataclass
class _Lease:
    """A replica's tokens of one bucket: how many are left, until when, and the refill that
    requests finding it empty wait for."""

    tokens: int = 0
    expires: float = 0.0
    # Its result: the seconds until a token when the bucket had none (0.0: tokens came).
    refill: asyncio.Task[float] | None = None


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


def _retrieve(task: asyncio.Task[float]) -> None:
    if not task.cancelled():
        task.exception()


class RateLimiter:
    """Takes a token from a client's bucket of a route class, or says how long to wait."""

    def __init__(self, redis: Redis, limits: Limits) -> None:
        self._redis = redis
        self._limits = limits
        self._script = redis.register_script(_TOKEN_BUCKET)
        self._leases: dict[str, _Lease] = {}
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
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = _Lease()
        while True:
            if lease.tokens > 0 and time.monotonic() < lease.expires:
                lease.tokens -= 1
                return
            if lease.refill is None:
                # A task of its own: a caller that goes away does not cancel the others' refill.
                lease.refill = asyncio.get_running_loop().create_task(
                    self._refill(lease, key, limit, lease_size(limit, route_class))
                )
                # Read by its waiters; retrieved here too, for when they all went away.
                lease.refill.add_done_callback(_retrieve)
            try:
                wait_s = await asyncio.shield(lease.refill)
            except (RedisError, OSError) as exc:
                self._redis_failed(route_class, exc)
                if route_class in FAIL_OPEN:
                    return
                raise Unavailable(
                    f"the rate limiter cannot reach Redis, so {route_class.replace('_', ' ')} "
                    "are refused for now; retry shortly"
                ) from exc
            if wait_s > 0 and lease.tokens == 0:
                DENIED.labels(route_class).inc()
                raise RateLimited(
                    f"client {client!r} is over its {route_class.replace('_', ' ')} rate limit "
                    f"of {limit}; retry in {wait_s:.2f} s",
                    wait_s,
                )
            # Tokens came (or others spent them first: then ask again).

    async def _refill(self, lease: _Lease, key: str, limit: Limit, size: int) -> float:
        """Take a lease of ``size`` tokens from the bucket (as many as it holds); the seconds
        until a token when it had none."""
        try:
            taken, wait = await self._script(keys=[key], args=[limit.rate, limit.burst, size])
        finally:
            lease.refill = None
        lease.tokens = int(taken)
        lease.expires = time.monotonic() + LEASE_TTL_S
        return float(wait) if not lease.tokens else 0.0

    def _redis_failed(self, route_class: str, exc: Exception) -> None:
        ERRORS.labels(route_class).inc()
        now = time.monotonic()
        if now - self._last_warning > 10.0:  # at most one line per 10 s in an outage
            self._last_warning = now
            log.warning("rate limiter cannot ask Redis (%s): %s %s", exc, route_class,
                        "let through" if route_class in FAIL_OPEN else "refused")  # fmt: skip
