"""Moving sweeps forward: trials as training jobs, Optuna deciding, the store recording.

A sweep moves forward only through ``Sweeps.advance``, which is idempotent and runs under a
PostgreSQL advisory lock per sweep, so any process may call it at any time: the Training
service after a submission or a cancel and in its reconcile loop, and the worker that ran a
trial as soon as the trial's job ends. Each call

1. opens the sweep's MLflow parent run if it has none yet;
2. tells the Optuna study how finished trial jobs ended (complete, pruned or failed) and
   announces a new best;
3. on a cancelled sweep, cancels its running trial jobs and ends once none runs;
4. asks the study for new trials until ``parallelism`` run or the budget is spent, each one
   recorded and queued as an ordinary training job (with an idempotency key, so a repeat
   never queues a trial twice);
5. once every trial ended, registers the best trial's model and closes the parent run.

Nothing lives only in memory: a process that dies mid-way leaves the next call to finish the
step. A trial whose worker dies is retried like any job (its lease lapses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, check_page_size
from services.common.pagination import Page
from services.training.eventlog import EventRecord
from services.training.events import (
    RUNNING,
    Cancelled,
    EpochCompleted,
    Failed,
    JobStarted,
    NewBest,
    SweepEvent,
    SweepSucceeded,
    TrialEnded,
    TrialEpoch,
    TrialStarted,
)
from services.training.jobs import TERMINAL_STATES, Job
from services.training.metrics import SWEEPS_SUBMITTED
from services.training.ml import search
from services.training.service import Training
from services.training.sweeps.parent_run import ParentRuns
from services.training.sweeps.records import (
    SWEEP_STATES,
    SWEEP_TERMINAL,
    TRIAL_COMPLETE,
    TRIAL_END,
    TRIAL_FAILED,
    TRIAL_PRUNED,
    Sweep,
)
from services.training.sweeps.spec import SweepSubmission, validate_sweep
from services.training.sweeps.store import SweepStore

log = logging.getLogger(__name__)


def _better(value: float, than: float | None, direction: str) -> bool:
    if than is None:
        return True
    return value > than if direction == search.MAXIMIZE else value < than


class Sweeps:
    """What the Training service and the workers do with sweeps. Knows nothing of gRPC."""

    def __init__(
        self, store: SweepStore, training: Training, storage_url: str, tracking_uri: str
    ) -> None:
        self._store = store
        self._training = training
        self._storage_url = storage_url
        self._parent_runs = ParentRuns(tracking_uri)
        self._background: set[asyncio.Task] = set()

    # -- the service's calls ------------------------------------------------------------
    async def submit(self, submission: SweepSubmission, client: str) -> Sweep:
        """Validate and record a sweep, then start it in the background; answers at once."""
        spec = validate_sweep(submission)
        sweep, created = await self._store.create(spec, client, submission.fixed.idempotency_key)
        if created:
            SWEEPS_SUBMITTED.labels(client).inc()
            self.kick(sweep.sweep_id)
        return sweep

    def kick(self, sweep_id: str) -> None:
        """Advance a sweep without waiting for it (the reconciler retries what fails)."""
        task = asyncio.create_task(self.advance_quietly(sweep_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def get(self, sweep_id: str) -> Sweep:
        if not sweep_id.strip():
            raise InvalidArgument("sweep_id is required")
        sweep = await self._store.get(sweep_id)
        if sweep is None:
            raise NotFound(f"sweep {sweep_id!r} does not exist")
        return sweep

    async def list(self, state: str, page_size: int, page_token: str) -> Page[Sweep]:
        if state and state not in SWEEP_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(SWEEP_STATES)}, got {state!r}")
        return await self._store.list(state, check_page_size(page_size), page_token)

    async def cancel(self, sweep_id: str, client: str) -> Sweep:
        """Stop asking for trials and cancel the running ones; the sweep ends cancelled once
        none runs (at once when none was training). FailedPrecondition once it has ended."""
        sweep = await self.get(sweep_id)
        if sweep.state in SWEEP_TERMINAL:
            raise FailedPrecondition(
                f"sweep {sweep_id} has already ended ({sweep.state}); only queued or running "
                "sweeps can be cancelled"
            )
        await self._store.request_cancel(sweep_id, client)
        await self.advance(sweep_id)
        return await self.get(sweep_id)

    async def watch(
        self, sweep_id: str, poll_s: float = 1.0
    ) -> AsyncIterator[EventRecord[SweepEvent]]:
        """The sweep's events from the first, then live ones, until a terminal event."""
        await self.get(sweep_id)
        async for record in self._store.follow(sweep_id, poll_s):
            yield record

    async def reconcile(self) -> None:
        """Advance every unfinished sweep (after a crash, an outage, a lost wake-up)."""
        for sweep_id in await self._store.unfinished():
            await self.advance_quietly(sweep_id)

    async def reconcile_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile()
            except Exception:  # keep reconciling: the next round may succeed
                log.exception("reconciling sweeps failed")

    # -- the worker's calls -------------------------------------------------------------
    async def trial_spec(self, job: Job) -> search.TrialSpec | None:
        """What a trial's training process needs; None when the job is not a live trial."""
        sweep = await self._store.get(job.sweep_id)
        if sweep is None or sweep.trial(job.trial_number) is None:
            return None
        return search.TrialSpec(
            sweep_id=sweep.sweep_id,
            number=job.trial_number,
            storage_url=self._storage_url,
            study_name=sweep.study_name,
            direction=sweep.spec.direction,
            objective_metric=sweep.spec.objective_metric,
            pruner=sweep.spec.pruner,
            parent_run_id=sweep.mlflow_run_id,
        )

    async def on_trial_event(self, job: Job, event: JobStarted | EpochCompleted) -> None:
        """Turn a trial job's start and epochs into the sweep's trial events."""
        sweep = await self._store.get(job.sweep_id)
        trial = sweep.trial(job.trial_number) if sweep else None
        if sweep is None or trial is None:
            return
        if isinstance(event, JobStarted):
            await self._store.record(
                sweep.sweep_id,
                TrialStarted(
                    trial_number=trial.number,
                    job_id=job.job_id,
                    params=trial.params,
                    attempt=event.attempt,
                    mlflow_run_id=event.mlflow_run_id,
                ),
            )
            return
        value = event.metrics.get(sweep.spec.objective_metric)
        if value is not None:
            await self._store.record(
                sweep.sweep_id,
                TrialEpoch(trial.number, event.epoch, event.total_epochs, value),
            )

    # -- moving a sweep forward ---------------------------------------------------------
    async def advance_quietly(self, sweep_id: str) -> None:
        try:
            await self.advance(sweep_id)
        except Exception:  # the next call (a trial ending, the reconciler) tries again
            log.warning("advancing sweep %s failed; will retry", sweep_id, exc_info=True)

    async def advance(self, sweep_id: str) -> None:
        """One idempotent step of the sweep's life; see the module docstring."""
        async with self._store.locked(sweep_id):
            sweep = await self._store.get(sweep_id)
            if sweep is None or sweep.state in SWEEP_TERMINAL:
                return
            if not sweep.mlflow_run_id:
                if sweep.cancel_requested:
                    await self._end_cancelled(sweep)
                    return
                run_id = await asyncio.to_thread(self._parent_runs.open, sweep)
                await self._store.record(sweep_id, None, mlflow_run_id=run_id, state=RUNNING)
                sweep = await self._reload(sweep_id)
            await self._collect(sweep)
            sweep = await self._reload(sweep_id)
            if sweep.cancel_requested:
                for trial in sweep.running:
                    # A trial whose job ended meanwhile is collected just below.
                    with contextlib.suppress(FailedPrecondition):
                        await self._training.cancel(trial.job_id, sweep.cancelled_by)
                await self._collect(await self._reload(sweep_id))
                sweep = await self._reload(sweep_id)
                if not sweep.running:
                    await self._end_cancelled(sweep)
                return
            sweep = await self._start_trials(sweep)
            asked = len(sweep.trials)
            if asked >= sweep.spec.max_trials and not sweep.running:
                await self._finish(sweep)

    async def _reload(self, sweep_id: str) -> Sweep:
        sweep = await self._store.get(sweep_id)
        assert sweep is not None
        return sweep

    async def _collect(self, sweep: Sweep) -> None:
        """Tell the study how each trial whose job ended did; announce it and any new best."""
        ended = [t for t in sweep.running if t.job_state in TERMINAL_STATES]
        if not ended:
            return
        best = sweep.trial(sweep.best_trial)
        best_value = best.value if best else None
        spec = sweep.spec
        for trial in ended:
            state = TRIAL_END[trial.job_state]
            value = trial.metrics.get(spec.objective_metric)
            if state in (TRIAL_COMPLETE, TRIAL_PRUNED) and (
                value is None or not math.isfinite(value)
            ):
                state, value = TRIAL_FAILED, None
            error = trial.error or ("the objective was not a finite number" if not value else "")
            epochs = await asyncio.to_thread(self._tell, sweep, trial.number, state, value)
            await self._store.end_trial(sweep.sweep_id, trial.number, state, value, epochs)
            await self._store.record(
                sweep.sweep_id,
                TrialEnded(
                    trial_number=trial.number,
                    state=state,
                    epochs_completed=epochs,
                    value=value,
                    error=error if state == TRIAL_FAILED else "",
                ),
            )
            if (
                state == TRIAL_COMPLETE
                and value is not None
                and _better(value, best_value, spec.direction)
            ):
                best_value = value
                await self._store.record(
                    sweep.sweep_id,
                    NewBest(trial.number, value, trial.params),
                    best_trial=trial.number,
                )

    def _tell(self, sweep: Sweep, number: int, state: str, value: float | None) -> int:
        """Tell the study a trial's outcome (once); the number of epochs it reported."""
        import optuna

        study = search.load_study(self._storage_url, sweep.study_name, sweep.spec.direction)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        frozen = study._storage.get_trial(trial_id)
        if frozen.state == optuna.trial.TrialState.RUNNING:
            if state == TRIAL_COMPLETE:
                study.tell(number, value)
            elif state == TRIAL_PRUNED:
                study.tell(number, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
        return len(frozen.intermediate_values)

    async def _start_trials(self, sweep: Sweep) -> Sweep:
        """Adopt trials the study holds without a record, then ask for new ones."""
        orphans = await asyncio.to_thread(self._orphans, sweep)
        for number, trial_id, params in orphans:
            await self._start_trial(sweep, number, trial_id, params)
        if orphans:
            sweep = await self._reload(sweep.sweep_id)
        asked, running = len(sweep.trials), len(sweep.running)
        started = False
        while asked < sweep.spec.max_trials and running < sweep.spec.parallelism:
            number, trial_id, params = await asyncio.to_thread(self._ask, sweep, asked)
            await self._start_trial(sweep, number, trial_id, params)
            asked, running, started = asked + 1, running + 1, True
        return await self._reload(sweep.sweep_id) if started else sweep

    def _orphans(self, sweep: Sweep) -> list[tuple[int, int, dict[str, Any]]]:
        """Trials asked for whose job was never recorded (a process died in between)."""
        import optuna

        study = search.load_study(self._storage_url, sweep.study_name, sweep.spec.direction)
        known = {t.number for t in sweep.trials}
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [(t.number, t._trial_id, dict(t.params)) for t in running if t.number not in known]

    def _ask(self, sweep: Sweep, asked: int) -> tuple[int, int, dict[str, Any]]:
        spec = sweep.spec
        sampler = search.make_sampler(
            spec.strategy, spec.space, spec.base.seed, asked, spec.max_trials
        )
        study = search.load_study(
            self._storage_url, sweep.study_name, spec.direction, sampler=sampler
        )
        trial = study.ask(search.distributions(spec.space))
        return trial.number, trial._trial_id, dict(trial.params)

    async def _start_trial(
        self, sweep: Sweep, number: int, trial_id: int, params: dict[str, Any]
    ) -> None:
        # The job is recorded (and its trial row after it) before it is queued: a worker
        # that takes it at once finds its trial.
        job, _ = await self._training.store.create(
            sweep.spec.trial_params(params),
            sweep.submitted_by,
            f"sweep-{sweep.sweep_id}-trial-{number}",
            sweep_id=sweep.sweep_id,
            trial_number=number,
        )
        await self._store.add_trial(sweep.sweep_id, number, trial_id, job.job_id, params)
        await self._training.enqueue(job.job_id)

    async def _end_cancelled(self, sweep: Sweep) -> None:
        if sweep.mlflow_run_id:
            await asyncio.to_thread(self._parent_runs.end, sweep.mlflow_run_id, "KILLED")
        await self._store.record(sweep.sweep_id, Cancelled(sweep.cancelled_by))

    async def _finish(self, sweep: Sweep) -> None:
        best = sweep.trial(sweep.best_trial)
        if best is None or not best.model_uri:
            counts: dict[str, int] = {}
            for t in sweep.trials:
                counts[t.state] = counts.get(t.state, 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            error = f"no trial completed ({summary})"
            await asyncio.to_thread(self._parent_runs.end, sweep.mlflow_run_id, "FAILED")
            await self._store.record(sweep.sweep_id, Failed(error), error=error)
            return
        version = await asyncio.to_thread(self._parent_runs.close, sweep, best)
        assert best.value is not None  # a complete trial's, checked finite when collected
        await self._store.record(
            sweep.sweep_id,
            SweepSucceeded(
                best_trial=best.number,
                best_value=best.value,
                best_params=best.params,
                model_name=sweep.spec.base.model_name,
                model_version=version,
                metrics=best.metrics,
            ),
            model_version=version,
        )
