"""Input drift: how far recent inputs' pixel-intensity histogram is from the training inputs'.

The score is the population stability index (PSI) over the reference's bins, computed on a
rolling window of the most recent images. Under 0.1 is usually read as stable, above 0.25 as
a significant shift.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

_EPSILON = 1e-4  # floor of a bin's share, so an empty bin does not make the score infinite


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """The population stability index of ``actual`` against ``expected`` (both shares)."""
    e = np.maximum(expected, _EPSILON)
    a = np.maximum(actual, _EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Keeps the histogram of the last ``window_images`` images and their PSI to a reference."""

    def __init__(self, reference: np.ndarray, window_images: int) -> None:
        reference = np.asarray(reference, dtype=np.float64)
        if reference.ndim != 1 or len(reference) < 2 or reference.sum() <= 0:
            raise ValueError("a drift reference is a histogram of at least two bins")
        self.reference = reference / reference.sum()
        self.bins = len(reference)
        self.window_images = window_images
        self._batches: deque[tuple[int, np.ndarray]] = deque()
        self._counts = np.zeros(self.bins, dtype=np.int64)
        self._images = 0
        self._lock = threading.Lock()

    def observe(self, images: np.ndarray) -> None:
        """Add a batch of images (N, 784) in [0, 1] to the window."""
        index = np.minimum((images * self.bins).astype(np.int64), self.bins - 1)
        counts = np.bincount(index.ravel(), minlength=self.bins)
        with self._lock:
            self._batches.append((len(images), counts))
            self._counts += counts
            self._images += len(images)
            while self._images - self._batches[0][0] >= self.window_images:
                n, old = self._batches.popleft()
                self._counts -= old
                self._images -= n

    @property
    def images(self) -> int:
        """Images in the window."""
        return self._images

    def score(self) -> float:
        """PSI of the window against the reference; NaN before any image was seen."""
        with self._lock:
            total = self._counts.sum()
            if total == 0:
                return float("nan")
            actual = self._counts / total
        return psi(self.reference, actual)
