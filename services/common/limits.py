"""The grammar of ``MLMESH_RATE_LIMITS`` (services/common/ratelimit.py enforces the limits).

A leaf of the kit: the settings check the variable with it when they are read, so it imports
nothing that needs Redis or a gRPC server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREDICTIONS = "predictions"
TRAINING_SUBMISSIONS = "training_submissions"
REGISTRY_WRITES = "registry_writes"
CLASSES = (PREDICTIONS, TRAINING_SUBMISSIONS, REGISTRY_WRITES)

_ENTRY = re.compile(
    r"^(?P<cls>[a-z_]+)(?:@(?P<client>[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}))?="
    r"(?:(?P<off>off)|(?P<rate>[0-9]*\.?[0-9]+)/(?P<unit>[smh]):(?P<burst>[0-9]+))$"
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Limit:
    """``burst`` requests at once, then ``rate`` per second."""

    rate: float
    burst: int

    def __str__(self) -> str:
        return f"{self.rate:g}/s (burst {self.burst})"


# (class, client or "" for everyone) -> Limit, or None for "off"
Limits = dict[tuple[str, str], Limit | None]


def parse_limits(text: str) -> Limits:
    """Parse MLMESH_RATE_LIMITS; a ValueError names the entry that is wrong."""
    limits: Limits = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        found = _ENTRY.match(entry)
        if not found or found["cls"] not in CLASSES:
            raise ValueError(
                f"rate limit {entry!r} is not CLASS[@CLIENT]=RATE/UNIT:BURST or CLASS=off "
                f"(CLASS one of {', '.join(CLASSES)}; UNIT s, m or h), e.g. predictions=100/s:200"
            )
        limit = None
        if not found["off"]:
            rate = float(found["rate"]) / _UNITS[found["unit"]]
            burst = int(found["burst"])
            if rate <= 0 or burst < 1:
                raise ValueError(f"rate limit {entry!r}: the rate and the burst must be above 0")
            limit = Limit(rate, burst)
        limits[(found["cls"], found["client"] or "")] = limit
    return limits
