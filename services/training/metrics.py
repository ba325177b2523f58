"""The Training process's Prometheus metrics (served on its ops port's /metrics).

The workers' own (jobs running and finished, epoch times, queue depth) are in
``services/training/worker.py``, on each worker's /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter

JOBS_SUBMITTED = Counter(
    "training_jobs_submitted_total",
    "Training jobs submitted, by the API-key client that submitted them (a repeated "
    "idempotency key is not a new job; sweep trials are counted as sweeps).",
    ("client",),
)
SWEEPS_SUBMITTED = Counter(
    "training_sweeps_submitted_total",
    "Hyperparameter sweeps submitted, by the API-key client that submitted them (a repeated "
    "idempotency key is not a new sweep).",
    ("client",),
)
