"""A sweep and its trials as recorded: what the store reads and the orchestration decides on."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.training.events import CANCELLED, FAILED, PRUNED, QUEUED, RUNNING, SUCCEEDED
from services.training.sweeps.spec import SweepSpec

SWEEP_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
SWEEP_TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# Trial states, and the one each terminal job state ends a trial in.
TRIAL_RUNNING, TRIAL_COMPLETE, TRIAL_PRUNED, TRIAL_FAILED = (
    "running",
    "complete",
    "pruned",
    "failed",
)
TRIAL_END = {
    SUCCEEDED: TRIAL_COMPLETE,
    PRUNED: TRIAL_PRUNED,
    FAILED: TRIAL_FAILED,
    CANCELLED: CANCELLED,
}
TRIAL_STATES = (TRIAL_RUNNING, *TRIAL_END.values())


@dataclass(frozen=True)
class Trial:
    """One trial as recorded, with what its training job knows."""

    number: int
    optuna_trial_id: int
    job_id: str
    state: str
    params: dict[str, Any]
    value: float | None
    epochs_completed: int
    job_state: str
    mlflow_run_id: str
    metrics: dict[str, float]
    error: str
    model_uri: str


@dataclass(frozen=True)
class Sweep:
    """One sweep as recorded."""

    sweep_id: str
    state: str
    spec: SweepSpec
    study_name: str
    mlflow_run_id: str
    best_trial: int | None
    model_version: int
    error: str
    submitted_by: str
    idempotency_key: str
    cancel_requested: bool
    cancelled_by: str
    create_time: datetime
    end_time: datetime | None
    trials: list[Trial] = field(default_factory=list)

    def trial(self, number: int | None) -> Trial | None:
        return next((t for t in self.trials if t.number == number), None)

    @property
    def running(self) -> list[Trial]:
        return [t for t in self.trials if t.state == TRIAL_RUNNING]
