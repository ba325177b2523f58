"""The typed events of training jobs and sweeps, shared by those who say and those who hear.

The training process says ``JobStarted``, ``BatchProgress`` and ``EpochCompleted``; the worker
records them and how the job ended; the sweep orchestration says what its trials do. The
event log (``eventlog.py``) keeps each as ``{"type": kind, **fields}``, and ``convert.py``
turns each into the ``Watch*Response`` oneof field named ``oneof``, whose message has the
event's fields (``tests/unit/test_training_params.py`` checks that they agree).

A terminal event has ``ends_in``: the state its job or sweep ends in. ``Queued``, ``Failed``
and ``Cancelled`` are the same for jobs and sweeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

# The states of jobs and sweeps; a terminal event names the one it ends its owner in.
QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
PRUNED = "pruned"  # a sweep trial that early stopping ended between epochs (jobs only)


@dataclass(frozen=True)
class Event:
    """What every event has: its kind (its tag in the event log) and its contract field."""

    kind: ClassVar[str]
    oneof: ClassVar[str]  # its field in WatchTrainingJobResponse's or WatchSweepResponse's oneof
    ends_in: ClassVar[str | None] = None

    def to_record(self) -> dict[str, Any]:
        """The JSON object the event log stores."""
        return {"type": self.kind, **dataclasses.asdict(self)}


# -- both ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Queued(Event):
    """Recorded, waiting to start."""

    kind = oneof = "queued"


@dataclass(frozen=True)
class Failed(Event):
    """It ended without a result."""

    kind = oneof = "failed"
    ends_in = FAILED
    error: str


@dataclass(frozen=True)
class Cancelled(Event):
    """It was cancelled (by ``cancelled_by``, the API-key client)."""

    kind = oneof = "cancelled"
    ends_in = CANCELLED
    cancelled_by: str = ""


# -- jobs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStarted(Event):
    """An attempt began training; its MLflow run exists."""

    kind = oneof = "started"
    attempt: int
    mlflow_run_id: str
    device: str


@dataclass(frozen=True)
class BatchProgress(Event):
    """How far the epoch has come (at most a few a second, never one per batch)."""

    kind, oneof = "batch", "batch_progress"
    epoch: int
    batch: int
    total_batches: int
    train_loss: float


@dataclass(frozen=True)
class EpochCompleted(Event):
    """An epoch ended; ``metrics`` are its train/val figures and timings."""

    kind, oneof = "epoch", "epoch_completed"
    epoch: int
    total_epochs: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class JobSucceeded(Event):
    """The job trained, logged and registered its model."""

    kind = oneof = "succeeded"
    ends_in = SUCCEEDED
    mlflow_run_id: str
    model_name: str
    model_version: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class JobPruned(Event):
    """A sweep's pruner stopped the trial after ``epoch`` (objective ``value``)."""

    kind = oneof = "pruned"
    ends_in = PRUNED
    epoch: int
    value: float


# -- sweeps -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialStarted(Event):
    """A trial's job began an attempt, with the trial's sampled ``params``."""

    kind = oneof = "trial_started"
    trial_number: int
    job_id: str
    params: dict[str, Any]
    attempt: int
    mlflow_run_id: str


@dataclass(frozen=True)
class TrialEpoch(Event):
    """A trial reported its objective after an epoch."""

    kind = oneof = "trial_epoch"
    trial_number: int
    epoch: int
    total_epochs: int
    value: float


@dataclass(frozen=True)
class TrialEnded(Event):
    """A trial ended: complete, pruned, failed or cancelled."""

    kind = oneof = "trial_ended"
    trial_number: int
    state: str
    epochs_completed: int
    value: float | None = None  # none for a failed trial
    error: str = ""


@dataclass(frozen=True)
class NewBest(Event):
    """A complete trial beat every one before it."""

    kind = oneof = "new_best"
    trial_number: int
    value: float
    params: dict[str, Any]


@dataclass(frozen=True)
class SweepSucceeded(Event):
    """Every trial ended; the best one's model is registered as ``model_version``."""

    kind = oneof = "succeeded"
    ends_in = SUCCEEDED
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    model_name: str
    model_version: int
    metrics: dict[str, float]


JobEvent = (
    Queued
    | JobStarted
    | BatchProgress
    | EpochCompleted
    | JobSucceeded
    | Failed
    | Cancelled
    | JobPruned
)
SweepEvent = (
    Queued | TrialStarted | TrialEpoch | TrialEnded | NewBest | SweepSucceeded | Failed | Cancelled
)

JOB_EVENTS: tuple[type[Event], ...] = (
    Queued, JobStarted, BatchProgress, EpochCompleted, JobSucceeded, Failed, Cancelled, JobPruned,
)  # fmt: skip
SWEEP_EVENTS: tuple[type[Event], ...] = (
    Queued, TrialStarted, TrialEpoch, TrialEnded, NewBest, SweepSucceeded, Failed, Cancelled,
)  # fmt: skip


def parser(kinds: tuple[type[Event], ...]) -> Callable[[Mapping[str, Any]], Any]:
    """A function from a stored ``{"type": kind, ...}`` object to its event, for one owner."""
    by_kind = {k.kind: k for k in kinds}
    names = {k: {f.name for f in dataclasses.fields(k)} for k in kinds}

    def parse(record: Mapping[str, Any]) -> Any:
        kind = by_kind.get(record.get("type", ""))
        if kind is None:
            raise ValueError(f"unknown event type {record.get('type')!r}")
        # Keys an older or newer writer added are not this event's business.
        return kind(**{k: v for k, v in record.items() if k in names[kind]})

    return parse


parse_job_event = parser(JOB_EVENTS)
parse_sweep_event = parser(SWEEP_EVENTS)
