"""When and how long the SDK waits before trying a call again.

Only idempotent calls are retried (reads, predictions, and submissions that carry an
idempotency key), and only on UNAVAILABLE: the gateway or a service restarting, a connection
dropped. Between tries the wait grows exponentially, with full jitter so that many clients
do not come back at once, and no try starts past the call's deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all (1: never retry); the n-th wait is uniform in [0,
    min(max_backoff_s, initial_backoff_s * multiplier**n)]."""

    attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry number ``retry`` (0 for the first retry)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return random.uniform(0.0, cap)


NO_RETRY = RetryPolicy(attempts=1)


class Tries:
    """The tries of one call: the time left of its deadline for each, and whether (and after
    how long) to try again after a failure."""

    def __init__(self, policy: RetryPolicy, idempotent: bool, timeout_s: float | None) -> None:
        self._policy = policy if idempotent else NO_RETRY
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._retries = 0

    def timeout_s(self) -> float | None:
        """The time left for the next try; None when the call has no deadline."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def wait_s(self, code: grpc.StatusCode) -> float | None:
        """How long to wait before trying again after ``code``; None: do not."""
        if code not in self._policy.codes or self._retries + 1 >= self._policy.attempts:
            return None
        wait = self._policy.backoff_s(self._retries)
        if self._deadline is not None and time.monotonic() + wait >= self._deadline:
            return None
        self._retries += 1
        return wait
