"""Training jobs, sweeps and their events to mlmesh.training.v1 messages, and requests to
submissions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from mlmesh.training.v1 import sweep_pb2 as sweep_pb
from mlmesh.training.v1 import training_pb2 as pb
from services.common.errors import InvalidArgument
from services.training.eventlog import EventRecord
from services.training.events import Event, JobEvent, SweepEvent
from services.training.jobs import Job
from services.training.ml import search
from services.training.ml.search import Choice, Domain, FloatRange, IntRange, PrunerSpec
from services.training.params import PARAMS, JobParams, Submission
from services.training.sweeps.records import Sweep, Trial
from services.training.sweeps.spec import SweepSubmission

STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "pruned": pb.JOB_STATE_PRUNED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


def ts(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def given_params(req: Message) -> dict[str, Any]:
    """The parameters a request gives, by name: a field with presence that is set, any other
    that is not its zero value ("" or 0); the rest take their defaults."""
    fields = req.DESCRIPTOR.fields_by_name
    given: dict[str, Any] = {}
    for p in PARAMS:
        value = getattr(req, p.name)
        if req.HasField(p.name) if fields[p.name].has_presence else value:
            given[p.name] = value
    return given


def set_params(message: Message, params: JobParams, *nested: Message) -> None:
    """Report ``params`` on a response message: each in the field of its name, in
    ``message`` or else in one of the ``nested`` messages (a message without such a field
    does not report that parameter)."""
    for p in PARAMS:
        for target in (message, *nested):
            if p.name in target.DESCRIPTOR.fields_by_name:
                setattr(target, p.name, getattr(params, p.name))
                break


def submission(req: pb.SubmitTrainingJobRequest) -> Submission:
    return Submission(given_params(req), req.idempotency_key)


def job(j: Job) -> pb.TrainingJob:
    out = pb.TrainingJob(
        job_id=j.job_id,
        state=STATE_TO_PB[j.state],
        model_version=j.model_version,
        mlflow_run_id=j.mlflow_run_id,
        progress=pb.Progress(
            epoch=j.progress_epoch, total_epochs=j.params.epochs, fraction=j.progress_fraction
        ),
        metrics=j.metrics,
        error=j.error,
        submitted_by=j.submitted_by,
        idempotency_key=j.idempotency_key,
        attempts=j.attempts,
        worker=j.worker,
        create_time=ts(j.create_time),
        start_time=ts(j.start_time),
        end_time=ts(j.end_time),
        sweep_id=j.sweep_id,
        trial_number=j.trial_number,
    )
    set_params(out, j.params, out.hyperparameters)
    return out


def _event_into(out: Message, event: Event) -> Message:
    """``out`` (a Watch*Response) with ``event`` in its oneof field ``event.oneof``, whose
    message has the event's fields. The event log keeps enums by their short names
    ("complete") and parameters as plain values."""
    target = getattr(out, event.oneof)
    fields = target.DESCRIPTOR.fields_by_name
    values = event.to_record()
    del values["type"]
    for name, value in values.items():
        field = fields[name]
        if field.enum_type is not None:
            values[name] = _ENUM_VALUES[field.enum_type.full_name][value]
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                values[name] = _params(value)  # map<string, google.protobuf.Value>
    target.SetInParent()
    target.MergeFrom(type(target)(**values))
    return out


def event(e: EventRecord[JobEvent]) -> pb.WatchTrainingJobResponse:
    out = pb.WatchTrainingJobResponse(job_id=e.owner, sequence=e.sequence, time=ts(e.time))
    return _event_into(out, e.event)


# -- sweeps ---------------------------------------------------------------------------------
SWEEP_STATE_TO_PB = {
    "queued": sweep_pb.SWEEP_STATE_QUEUED,
    "running": sweep_pb.SWEEP_STATE_RUNNING,
    "succeeded": sweep_pb.SWEEP_STATE_SUCCEEDED,
    "failed": sweep_pb.SWEEP_STATE_FAILED,
    "cancelled": sweep_pb.SWEEP_STATE_CANCELLED,
}
PB_TO_SWEEP_STATE = {v: k for k, v in SWEEP_STATE_TO_PB.items()}
TRIAL_STATE_TO_PB = {
    "running": sweep_pb.TRIAL_STATE_RUNNING,
    "complete": sweep_pb.TRIAL_STATE_COMPLETE,
    "pruned": sweep_pb.TRIAL_STATE_PRUNED,
    "failed": sweep_pb.TRIAL_STATE_FAILED,
    "cancelled": sweep_pb.TRIAL_STATE_CANCELLED,
}
# Enum fields of events, from the short names the event log stores.
_ENUM_VALUES = {sweep_pb.TrialState.DESCRIPTOR.full_name: TRIAL_STATE_TO_PB}
_STRATEGIES = {
    sweep_pb.SEARCH_STRATEGY_UNSPECIFIED: "",
    sweep_pb.SEARCH_STRATEGY_GRID: search.GRID,
    sweep_pb.SEARCH_STRATEGY_RANDOM: search.RANDOM,
    sweep_pb.SEARCH_STRATEGY_TPE: search.TPE,
}
_DIRECTIONS = {
    sweep_pb.OBJECTIVE_DIRECTION_UNSPECIFIED: "",
    sweep_pb.OBJECTIVE_DIRECTION_MAXIMIZE: search.MAXIMIZE,
    sweep_pb.OBJECTIVE_DIRECTION_MINIMIZE: search.MINIMIZE,
}
_PRUNERS = {
    sweep_pb.PRUNER_UNSPECIFIED: search.MEDIAN,
    sweep_pb.PRUNER_MEDIAN: search.MEDIAN,
    sweep_pb.PRUNER_SUCCESSIVE_HALVING: search.SUCCESSIVE_HALVING,
}


def _enum(value: int, table: dict[int, str], field: str) -> str:
    if value not in table:
        raise InvalidArgument(f"{field} {value} is not a known value")
    return table[value]


def _from_value(v: struct_pb2.Value) -> object:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        return v.number_value
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    return None


def _to_value(x: object) -> struct_pb2.Value:
    if isinstance(x, str):
        return struct_pb2.Value(string_value=x)
    return struct_pb2.Value(number_value=float(x))  # type: ignore[arg-type]


def _domain(name: str, space: sweep_pb.ParameterSpace) -> Domain:
    kind = space.WhichOneof("domain")
    if kind == "choice":
        return Choice(tuple(_from_value(v) for v in space.choice.values))  # type: ignore[arg-type]
    if kind == "range":
        r = space.range
        return FloatRange(r.low, r.high, _enum(r.scale, _SCALES, "scale") == "log")
    if kind == "int_range":
        r = space.int_range
        return IntRange(r.low, r.high, r.step, _enum(r.scale, _SCALES, "scale") == "log")
    raise InvalidArgument(f"search_space.{name}: give a choice, a range or an int_range")


_SCALES = {sweep_pb.SCALE_UNSPECIFIED: "linear", sweep_pb.SCALE_LINEAR: "linear"}
_SCALES[sweep_pb.SCALE_LOG] = "log"


def sweep_submission(req: sweep_pb.SubmitSweepRequest) -> SweepSubmission:
    pruner = None
    if req.HasField("early_stopping"):
        e = req.early_stopping
        pruner = PrunerSpec(
            kind=_enum(e.pruner, _PRUNERS, "early_stopping.pruner"),
            startup_trials=e.startup_trials or 1,
            warmup_epochs=e.warmup_epochs,
            reduction_factor=e.reduction_factor or 3,
        )
    return SweepSubmission(
        space={name: _domain(name, s) for name, s in sorted(req.search_space.items())},
        fixed=Submission(given_params(req), req.idempotency_key),
        objective_metric=req.objective_metric,
        direction=_enum(req.direction, _DIRECTIONS, "direction"),
        max_trials=req.max_trials,
        parallelism=req.parallelism,
        strategy=_enum(req.strategy, _STRATEGIES, "strategy"),
        pruner=pruner,
    )


def _space_pb(domain: Domain) -> sweep_pb.ParameterSpace:
    if isinstance(domain, Choice):
        return sweep_pb.ParameterSpace(
            choice=sweep_pb.Choice(values=[_to_value(v) for v in domain.values])
        )
    scale = sweep_pb.SCALE_LOG if domain.log else sweep_pb.SCALE_LINEAR
    if isinstance(domain, FloatRange):
        return sweep_pb.ParameterSpace(
            range=sweep_pb.FloatRange(low=domain.low, high=domain.high, scale=scale)
        )
    return sweep_pb.ParameterSpace(
        int_range=sweep_pb.IntRange(low=domain.low, high=domain.high, step=domain.step, scale=scale)
    )


def _params(params: dict[str, object]) -> dict[str, struct_pb2.Value]:
    return {k: _to_value(v) for k, v in params.items()}


def trial(t: Trial) -> sweep_pb.Trial:
    return sweep_pb.Trial(
        number=t.number,
        state=TRIAL_STATE_TO_PB[t.state],
        job_id=t.job_id,
        params=_params(t.params),
        value=t.value,
        epochs_completed=t.epochs_completed,
        mlflow_run_id=t.mlflow_run_id,
        metrics=t.metrics,
        error=t.error,
    )


def sweep(s: Sweep) -> sweep_pb.Sweep:
    spec = s.spec
    best = s.trial(s.best_trial)
    out = sweep_pb.Sweep(
        sweep_id=s.sweep_id,
        state=SWEEP_STATE_TO_PB[s.state],
        search_space={name: _space_pb(d) for name, d in spec.space.items()},
        objective_metric=spec.objective_metric,
        direction={v: k for k, v in _DIRECTIONS.items()}[spec.direction],
        strategy={v: k for k, v in _STRATEGIES.items()}[spec.strategy],
        max_trials=spec.max_trials,
        parallelism=spec.parallelism,
        mlflow_run_id=s.mlflow_run_id,
        trials=[trial(t) for t in s.trials],
        model_version=s.model_version,
        error=s.error,
        submitted_by=s.submitted_by,
        idempotency_key=s.idempotency_key,
        cancelled_by=s.cancelled_by,
        study_name=s.study_name,
        create_time=ts(s.create_time),
        end_time=ts(s.end_time),
    )
    set_params(out, spec.base)
    if spec.pruner is not None:
        p = spec.pruner
        out.early_stopping.CopyFrom(
            sweep_pb.EarlyStopping(
                pruner={v: k for k, v in _PRUNERS.items()}[p.kind],
                startup_trials=p.startup_trials,
                warmup_epochs=p.warmup_epochs,
                reduction_factor=p.reduction_factor,
            )
        )
    if best is not None and best.value is not None:
        out.best_trial = best.number
        out.best_value = best.value
        for name, value in _params(best.params).items():
            out.best_params[name].CopyFrom(value)
    return out


def sweep_event(e: EventRecord[SweepEvent]) -> sweep_pb.WatchSweepResponse:
    out = sweep_pb.WatchSweepResponse(sweep_id=e.owner, sequence=e.sequence, time=ts(e.time))
    return _event_into(out, e.event)
