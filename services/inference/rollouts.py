"""How an Inference replica follows rollouts, shadows requests and takes feedback.

- ``RolloutFollower`` keeps the running rollout of each model this replica serves (read from
  PostgreSQL on first use, re-read on every model event and periodic alias re-read), loads
  its candidate before routing to it, splits canary requests by weight (sticky for a routing
  key), and adds what it sees to the rollout's figures in Redis (batched, every
  ``FLUSH_S``) for the Registry's controller.
- ``ShadowQueue`` computes shadow requests with the candidate off the answering path: a
  bounded queue, dropped and counted when full.
- ``FeedbackStore`` keeps each answer (version, class, rollout) under its prediction_id in
  Redis for MLMESH_FEEDBACK_RETENTION_S, and scores true labels against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import InvalidArgument, MeshError, Unavailable
from services.common.rollouts import (
    CANARY,
    FIGURES_TTL_S,
    LATENCY_BUCKETS_MS,
    Rollout,
    figures_key,
    running_rollout,
)
from services.inference import metrics
from services.inference.cache import BACKOFF_S, RedisWrites
from services.inference.repository import LoadedModel, ModelRepository

log = logging.getLogger(__name__)

FLUSH_S = 0.25
SHADOW_WORKERS = 32
PREDICTION_KEY_PREFIX = "mlmesh:prediction"
PRODUCTION = "production"
CANDIDATE = "candidate"


def canary_picks_candidate(rollout: Rollout, routing_key: str) -> bool:
    """Whether this request goes to the canary: by the routing key's hash (the same key, the
    same version, for as long as the weight stays) or, without one, at random."""
    if routing_key:
        digest = hashlib.blake2b(f"{rollout.rollout_id}\0{routing_key}".encode(), digest_size=8)
        draw = int.from_bytes(digest.digest(), "big") % 10000
    else:
        draw = random.randrange(10000)
    return draw < rollout.weight * 100


def _bucket(seconds: float) -> int:
    ms = seconds * 1e3
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        if ms <= bound:
            return i
    return len(LATENCY_BUCKETS_MS)  # slower than every bound: counted, never below p99


class Tally:
    """Counts added to Redis hashes in batches: many requests, one pipeline."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._counts: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def add(self, key: str, **fields: int) -> None:
        self._counts[key].update(fields)

    async def flush(self) -> None:
        counts, self._counts = self._counts, defaultdict(Counter)
        if not counts:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, fields in counts.items():
                    for name, n in fields.items():
                        pipe.hincrby(key, name, n)
                    pipe.expire(key, FIGURES_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not add rollout figures to Redis (kept for the next try): %s", exc)
            for key, fields in counts.items():
                self._counts[key].update(fields)

    async def flush_forever(self, interval_s: float = FLUSH_S) -> None:
        """Flush every ``interval_s``, and once more when the process stops (a replica that
        stops loses none of what it counted; one killed, at most ``interval_s`` of it)."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self.flush()
        finally:
            await self.flush()


class RolloutFollower:
    """The running rollout of each model this replica serves."""

    def __init__(self, repository: ModelRepository, db: asyncpg.Pool, tally: Tally) -> None:
        self._repository = repository
        self._db = db
        self._tally = tally
        self._running: dict[str, Rollout | None] = {}
        repository.followers.append(self.refresh)

    async def running(self, name: str) -> Rollout | None:
        """The rollout ``name``'s requests follow now (None: none)."""
        if name not in self._running:
            await self.refresh(name)
        return self._running.get(name)

    async def refresh(self, name: str | None = None) -> None:
        """Re-read the running rollout of ``name`` (or of every model asked for); a new
        candidate is loaded before any request goes to it."""
        for model in [name] if name is not None else list(self._running):
            try:
                found = await running_rollout(self._db, model)
                if found is not None:
                    await self._repository.get(model, found.candidate_version)
            except MeshError as exc:
                log.warning("could not follow the rollout of %s: %s", model, exc)
                self._running.setdefault(model, None)
                continue
            before = self._running.get(model)
            self._running[model] = found
            if found != before:
                what = (
                    f"{found.mode} of v{found.candidate_version}"
                    + (f" at {found.weight}%" if found.mode == CANARY else "")
                    if found
                    else "none"
                )
                log.info("rollout of %s now: %s", model, what)

    def record(self, rollout: Rollout, model: LoadedModel, role: str, seconds: float,
               failed: bool) -> None:  # fmt: skip
        """Add one request answered (or failed) by ``model`` to the rollout's figures."""
        fields = {"requests": 1, f"b{_bucket(seconds)}": 1}
        if failed:
            fields["errors"] = 1
        self._tally.add(figures_key(rollout.rollout_id, f"v{model.version}"), **fields)
        metrics.ROLLOUT_REQUESTS.labels(*model.labels, role).inc()

    def record_shadow(self, rollout: Rollout, **fields: int) -> None:
        self._tally.add(figures_key(rollout.rollout_id, "shadow"), **fields)


def classes_of(outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Each row's class (argmax) from the first numeric (rows, classes) output; None when
    the answer has none (not a classifier)."""
    for array in outputs.values():
        if array.dtype.kind in "fiu" and array.ndim == 2:
            return array.argmax(axis=1)
    return None


def agreeing_rows(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(rows compared, rows on which two answers agree): the same class for classifiers,
    else the same outputs (within float tolerance)."""
    ca, cb = classes_of(a), classes_of(b)
    if ca is not None and cb is not None and ca.shape == cb.shape:
        return len(ca), int((ca == cb).sum())
    same = all(
        name in b and a[name].shape == b[name].shape and (
            np.allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
            if a[name].dtype.kind in "fiu" else bool((a[name] == b[name]).all())
        )
        for name in a
    )  # fmt: skip
    return 1, int(same)


Compute = Callable[[LoadedModel, Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class _Shadow:
    rollout: Rollout
    candidate: LoadedModel
    inputs: Mapping[str, np.ndarray]
    production: Mapping[str, np.ndarray]


class ShadowQueue:
    """Shadow requests for candidates, computed one at a time off the answering path."""

    def __init__(self, follower: RolloutFollower, compute: Compute, size: int) -> None:
        self._follower = follower
        self._compute = compute
        self._queue: asyncio.Queue[_Shadow] = asyncio.Queue(max(1, size))

    def offer(
        self,
        rollout: Rollout,
        candidate: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        production: Mapping[str, np.ndarray],
    ) -> bool:
        """Queue a request for the candidate; False (dropped, counted) when the queue is full."""
        try:
            self._queue.put_nowait(_Shadow(rollout, candidate, inputs, production))
        except asyncio.QueueFull:
            metrics.SHADOW_DROPPED.labels(candidate.name).inc()
            self._follower.record_shadow(rollout, dropped=1)
            return False
        return True

    async def run(self) -> None:
        """Work the queue with SHADOW_WORKERS requests in flight, so that the candidate's
        batcher batches them as it does production's."""
        await asyncio.gather(*(self._work() for _ in range(SHADOW_WORKERS)))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            started = loop.time()
            try:
                answer = await self._compute(item.candidate, item.inputs)
            except MeshError:
                self._follower.record(item.rollout, item.candidate, CANDIDATE,
                                      loop.time() - started, True)  # fmt: skip
                metrics.SHADOW_ANSWERS.labels(*item.candidate.labels, "failed").inc()
                continue
            except Exception:
                log.exception("shadow request for %s v%d failed", *item.candidate.labels)
                continue
            self._follower.record(item.rollout, item.candidate, CANDIDATE,
                                  loop.time() - started, False)  # fmt: skip
            wanted = {n: answer[n] for n in item.production if n in answer}
            compared, agreed = agreeing_rows(item.production, wanted)
            self._follower.record_shadow(item.rollout, compared=compared, agreed=agreed)
            metrics.SHADOW_ANSWERS.labels(*item.candidate.labels, "agreed").inc(agreed)
            metrics.SHADOW_ANSWERS.labels(*item.candidate.labels, "disagreed").inc(
                compared - agreed
            )


@dataclass(frozen=True)
class Labelled:
    """What SubmitFeedback recorded."""

    recorded: int
    correct: int
    unknown_ids: list[str]


class FeedbackStore:
    """Answers kept under their prediction_id for the retention window, and scored once."""

    def __init__(self, redis: Redis, retention_s: int, tally: Tally, writes: RedisWrites) -> None:
        self._redis = redis
        self._retention_s = retention_s
        self._tally = tally
        self._writes = writes
        self._paused_until = 0.0

    @staticmethod
    def new_ids(count: int) -> list[str]:
        return [secrets.token_hex(12) for _ in range(count)]

    def stage(
        self,
        ids: Sequence[str],
        model: LoadedModel,
        classes: np.ndarray | None,
        role: str,
        rollout: Rollout | None,
    ) -> asyncio.Future[None] | None:
        """Queue each answer's version and class under its id (nothing for answers without a
        class), in the pipeline that carries the cache's writes of the same requests: its
        future (await it so that the id is known when the answer goes out), or None. A Redis
        failure only costs their feedback: logged here, never raised to the caller."""
        if classes is None or self._retention_s <= 0 or time.monotonic() < self._paused_until:
            return None
        base = {"m": model.name, "v": model.version, "s": role,
                "r": rollout.rollout_id if rollout else ""}  # fmt: skip
        items = [
            (f"{PREDICTION_KEY_PREFIX}:{pid}", json.dumps({**base, "p": cls}))
            for pid, cls in zip(ids, classes.tolist(), strict=True)
        ]
        return self._writes.add(items, self._retention_s, self._write_failed)

    def _write_failed(self, exc: Exception) -> None:
        # As the prediction cache does: a Redis outage costs one try, not one per request.
        if time.monotonic() >= self._paused_until:
            log.warning("could not keep answers for feedback (not trying for %.0f s): %s",
                        BACKOFF_S, exc)  # fmt: skip
        self._paused_until = time.monotonic() + BACKOFF_S

    async def label(self, feedback: Sequence[tuple[str, int]], max_batch: int) -> Labelled:
        """Score true labels against the answers kept; each id once."""
        if not feedback:
            raise InvalidArgument("feedback is required: give at least one prediction_id and label")
        if len(feedback) > max_batch:
            raise InvalidArgument(f"feedback holds {len(feedback)} labels; at most {max_batch}")
        seen: set[str] = set()
        for i, (pid, label) in enumerate(feedback):
            if not pid.strip():
                raise InvalidArgument(f"feedback[{i}].prediction_id is required")
            if pid in seen:
                raise InvalidArgument(f"feedback[{i}].prediction_id {pid!r} is given twice")
            if label < 0:
                raise InvalidArgument(f"feedback[{i}].label must be 0 or more, got {label}")
            seen.add(pid)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for pid, _ in feedback:
                    pipe.getdel(f"{PREDICTION_KEY_PREFIX}:{pid}")
                found = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"cannot read the answers kept for feedback from Redis: {exc}"
            ) from exc
        recorded = correct = 0
        unknown = []
        for (pid, label), value in zip(feedback, found, strict=True):
            answer = _answer(value)
            if answer is None:
                unknown.append(pid)
                continue
            right = int(answer["p"] == label)
            recorded += 1
            correct += right
            labels = (answer["m"], str(answer["v"]), answer["s"] or "other")
            metrics.FEEDBACK.labels(*labels).inc()
            if right:
                metrics.FEEDBACK_CORRECT.labels(*labels).inc()
            if answer["r"]:
                key = figures_key(answer["r"], f"v{answer['v']}")
                self._tally.add(key, feedback=1, correct=right)
        await self._tally.flush()  # the controller sees labels at once
        return Labelled(recorded, correct, unknown)


def _answer(value: bytes | None) -> dict | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError, TypeError):
        found = json.loads(value)
        if isinstance(found, dict) and {"m", "v", "s", "r", "p"} <= found.keys():
            return found
    return None
