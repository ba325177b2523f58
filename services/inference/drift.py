"""Input drift: how far recent inputs' histogram is from the training inputs', per input.

A version's drift reference (services/common/model_contract.py) holds, per input feature,
bin edges and the training values' share in each bin. The score is the population stability
index (PSI) over those bins, computed on a rolling window of the most recent rows. Under 0.1
is usually read as stable, above 0.25 as a significant shift.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from services.common.model_contract import FeatureReference

_EPSILON = 1e-4  # floor of a bin's share, so an empty bin does not make the score infinite
FOLD_ROWS = 64  # rows observed before they are binned together


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """The population stability index of ``actual`` against ``expected`` (both shares)."""
    e = np.maximum(expected, _EPSILON)
    a = np.maximum(actual, _EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Keeps the histogram of one input over the last ``window_rows`` request rows and its PSI
    to the reference."""

    def __init__(self, reference: FeatureReference, window_rows: int) -> None:
        self.reference = reference.shares / reference.shares.sum()
        self.edges = reference.edges
        self.bins = len(self.reference)
        self.window_rows = window_rows
        width = np.diff(self.edges)
        # Equal bins (mlmesh's own: pixels in [0, 1]) need no search: one multiply per value.
        self._uniform = bool(np.allclose(width, width[0]))
        self._batches: deque[tuple[int, np.ndarray]] = deque()
        self._counts = np.zeros(self.bins, dtype=np.int64)
        self._rows = 0
        self._pending: list[tuple[int, np.ndarray]] = []  # (rows, values) not binned yet
        self._pending_rows = 0
        self._lock = threading.Lock()

    def _bin(self, values: np.ndarray) -> np.ndarray:
        if self._uniform:
            low, high = self.edges[0], self.edges[-1]
            index = ((values - low) * (self.bins / (high - low))).astype(np.int64)
            return np.clip(index, 0, self.bins - 1)
        return np.searchsorted(self.edges[1:-1], values, side="right")

    def observe(self, values: np.ndarray) -> None:
        """Add a batch of rows (the first axis) of this input to the window.

        Batches are binned FOLD_ROWS rows at a time, or when the window is read: one
        vectorised pass over many single-image requests instead of one per request (on the
        serving event loop). The window still forgets whole batches, oldest first."""
        with self._lock:
            rows = len(values) if values.ndim else 1
            self._pending.append((rows, values))
            self._pending_rows += rows
            if self._pending_rows >= FOLD_ROWS:
                self._fold()

    def _fold(self) -> None:
        """Bin the pending batches (the lock held): each batch's counts in one bincount, the
        batch's number offsetting its bins."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return
        sizes = [v.size for _, v in pending]
        index = self._bin(np.concatenate([v.ravel() for _, v in pending]))
        index += np.repeat(np.arange(len(pending), dtype=np.int64) * self.bins, sizes)
        counts = np.bincount(index, minlength=len(pending) * self.bins).reshape(
            len(pending), self.bins
        )
        for (rows, _), batch_counts in zip(pending, counts, strict=True):
            self._batches.append((rows, batch_counts))
            self._counts += batch_counts
            self._rows += rows
            while self._rows - self._batches[0][0] >= self.window_rows:
                n, old = self._batches.popleft()
                self._counts -= old
                self._rows -= n

    @property
    def rows(self) -> int:
        """Rows in the window."""
        with self._lock:
            self._fold()
            return self._rows

    def score(self) -> float:
        """PSI of the window against the reference; NaN before any row was seen."""
        with self._lock:
            self._fold()
            total = self._counts.sum()
            if total == 0:
                return float("nan")
            actual = self._counts / total
        return psi(self.reference, actual)
