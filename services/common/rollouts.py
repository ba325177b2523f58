"""Rollouts as every process sees them: the running rollout of a model (PostgreSQL) and the
live figures of its versions (Redis hashes that every Inference replica adds to).

The Registry starts and ends rollouts (services/registry/rollouts.py); the Inference replicas
read the running one of each model they serve and follow it (services/inference/rollouts.py),
adding what they see to the figures; the Registry's controller judges the guards on the sum.
A change is announced on the model-events channel, like a transition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from redis.asyncio import Redis

from services.common.aliases import DB_ERRORS
from services.common.errors import Unavailable

CANARY = "canary"
SHADOW = "shadow"
RUNNING = "running"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
SUPERSEDED = "superseded"

# Upper bounds (ms) of the latency histogram the replicas keep per version; p99 is read as
# the bound of the bucket it falls in.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# Figures outlive their rollout by this much (a finished rollout keeps its final figures
# in PostgreSQL).
FIGURES_TTL_S = 7 * 24 * 3600


def figures_key(rollout_id: str, part: str) -> str:
    """The Redis hash of one version's figures (``part`` "v3") or the shadow comparison."""
    return f"mlmesh:rollouts:{rollout_id}:{part}"


@dataclass(frozen=True)
class Guards:
    """What decides a rollout (RolloutGuards in the contract)."""

    min_requests: int
    max_error_rate: float | None = None
    max_p99_latency_ms: float | None = None
    max_p99_latency_ratio: float | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    min_feedback: int = 0

    @property
    def feedback_needed(self) -> int:
        return self.min_feedback or self.min_requests


@dataclass(frozen=True)
class Rollout:
    """One rollout as PostgreSQL holds it."""

    rollout_id: str
    model_name: str
    production_version: int
    candidate_version: int
    mode: str
    weight: int
    weight_steps: list[int]
    step_interval_s: float
    guards: Guards
    state: str
    decision: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # the final figures, once ended
    started_by: str = ""
    ended_by: str = ""
    step_time: datetime | None = None
    create_time: datetime | None = None
    end_time: datetime | None = None

    @property
    def running(self) -> bool:
        return self.state == RUNNING


def rollout_of(row: Mapping) -> Rollout:
    values = dict(row)
    values["guards"] = Guards(**_json(values["guards"]))
    values["decision"] = _json(values["decision"])
    values["figures"] = _json(values["figures"])
    values["weight_steps"] = list(values["weight_steps"])
    return Rollout(**values)


def _json(value: object) -> dict:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


async def running_rollout(db: asyncpg.Pool | asyncpg.Connection, name: str) -> Rollout | None:
    """The running rollout of ``name``, if any; Unavailable when PostgreSQL cannot say."""
    try:
        row = await db.fetchrow(
            "SELECT * FROM rollouts WHERE model_name = $1 AND state = $2", name, RUNNING
        )
    except DB_ERRORS as exc:
        raise Unavailable(f"cannot read the rollouts of {name!r} from PostgreSQL: {exc}") from exc
    return rollout_of(row) if row else None


@dataclass(frozen=True)
class VersionFigures:
    """One version's figures over every replica."""

    version: int
    requests: int = 0
    errors: int = 0
    p99_latency_ms: float = 0.0
    feedback: int = 0
    correct: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None


@dataclass(frozen=True)
class ShadowFigures:
    compared: int = 0
    agreed: int = 0
    dropped: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None


@dataclass(frozen=True)
class Figures:
    production: VersionFigures
    candidate: VersionFigures
    shadow: ShadowFigures

    def as_json(self) -> dict:
        return {
            "production": self.production.__dict__,
            "candidate": self.candidate.__dict__,
            "shadow": self.shadow.__dict__,
        }

    @staticmethod
    def from_json(found: dict) -> Figures:
        return Figures(
            VersionFigures(**found["production"]),
            VersionFigures(**found["candidate"]),
            ShadowFigures(**found["shadow"]),
        )


def p99_ms(buckets: Mapping[int, int], requests: int) -> float:
    """The p99 latency from per-bucket counts (bucket index -> count): the upper bound of
    the bucket the 99th percentile falls in; the last bound for anything slower."""
    if not requests:
        return 0.0
    wanted = 0.99 * requests
    seen = 0
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        seen += buckets.get(i, 0)
        if seen >= wanted:
            return float(bound)
    return float(LATENCY_BUCKETS_MS[-1])


def _version(version: int, found: Mapping[bytes, bytes]) -> VersionFigures:
    values = {k.decode(): int(v) for k, v in found.items()}
    buckets = {int(k[1:]): v for k, v in values.items() if k.startswith("b")}
    requests = values.get("requests", 0)
    return VersionFigures(
        version,
        requests,
        values.get("errors", 0),
        p99_ms(buckets, requests),
        values.get("feedback", 0),
        values.get("correct", 0),
    )


async def read_figures(redis: Redis, rollout: Rollout) -> Figures:
    """The figures of a rollout as the replicas left them in Redis."""
    if not rollout.running and rollout.figures:
        return Figures.from_json(rollout.figures)
    rid = rollout.rollout_id
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(figures_key(rid, f"v{rollout.production_version}"))
        pipe.hgetall(figures_key(rid, f"v{rollout.candidate_version}"))
        pipe.hgetall(figures_key(rid, "shadow"))
        production, candidate, shadow = await pipe.execute()
    counts = {k.decode(): int(v) for k, v in shadow.items()}
    return Figures(
        _version(rollout.production_version, production),
        _version(rollout.candidate_version, candidate),
        ShadowFigures(counts.get("compared", 0), counts.get("agreed", 0), counts.get("dropped", 0)),
    )
