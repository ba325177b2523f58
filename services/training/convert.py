"""Training jobs, sweeps and their events to mlmesh.training.v1 messages, and requests to
submissions."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from mlmesh.training.v1 import sweep_pb2 as sweep_pb
from mlmesh.training.v1 import training_pb2 as pb
from services.common.errors import InvalidArgument
from services.training.jobs import Job, JobEvent
from services.training.ml import search
from services.training.ml.search import Choice, Domain, FloatRange, IntRange, PrunerSpec
from services.training.sweep_spec import SweepSubmission
from services.training.sweeps import Sweep, SweepEvent, Trial
from services.training.validation import Submission

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


def submission(req: pb.SubmitTrainingJobRequest) -> Submission:
    return Submission(
        dataset=req.dataset,
        architecture=req.architecture,
        epochs=req.epochs if req.HasField("epochs") else None,
        learning_rate=req.learning_rate if req.HasField("learning_rate") else None,
        batch_size=req.batch_size if req.HasField("batch_size") else None,
        optimizer=req.optimizer,
        seed=req.seed if req.HasField("seed") else None,
        train_subset=req.train_subset,
        experiment_name=req.experiment_name,
        model_name=req.model_name,
        idempotency_key=req.idempotency_key,
    )


def job(j: Job) -> pb.TrainingJob:
    p = j.params
    return pb.TrainingJob(
        job_id=j.job_id,
        state=STATE_TO_PB[j.state],
        dataset=p.dataset,
        architecture=p.architecture,
        hyperparameters=pb.Hyperparameters(
            epochs=p.epochs,
            learning_rate=p.learning_rate,
            batch_size=p.batch_size,
            optimizer=p.optimizer,
            seed=p.seed,
        ),
        experiment_name=p.experiment_name,
        model_name=p.model_name,
        model_version=j.model_version,
        mlflow_run_id=j.mlflow_run_id,
        progress=pb.Progress(
            epoch=j.progress_epoch, total_epochs=p.epochs, fraction=j.progress_fraction
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


def event(e: JobEvent) -> pb.WatchTrainingJobResponse:
    out = pb.WatchTrainingJobResponse(job_id=e.job_id, sequence=e.sequence, time=ts(e.time))
    data = e.event
    kind = data["type"]
    if kind == "queued":
        out.queued.SetInParent()
    elif kind == "started":
        out.started.CopyFrom(
            pb.JobStarted(
                attempt=data["attempt"], mlflow_run_id=data["mlflow_run_id"], device=data["device"]
            )
        )
    elif kind == "epoch":
        out.epoch_completed.CopyFrom(
            pb.EpochCompleted(
                epoch=data["epoch"], total_epochs=data["total_epochs"], metrics=data["metrics"]
            )
        )
    elif kind == "batch":
        out.batch_progress.CopyFrom(
            pb.BatchProgress(
                epoch=data["epoch"],
                batch=data["batch"],
                total_batches=data["total_batches"],
                train_loss=data["train_loss"],
            )
        )
    elif kind == "succeeded":
        out.succeeded.CopyFrom(
            pb.JobSucceeded(
                mlflow_run_id=data["mlflow_run_id"],
                model_name=data["model_name"],
                model_version=data["model_version"],
                metrics=data["metrics"],
            )
        )
    elif kind == "failed":
        out.failed.CopyFrom(pb.JobFailed(error=data["error"]))
    elif kind == "cancelled":
        out.cancelled.CopyFrom(pb.JobCancelled(cancelled_by=data.get("cancelled_by", "")))
    elif kind == "pruned":
        out.pruned.CopyFrom(pb.JobPruned(epoch=data["epoch"], value=data["value"]))
    else:
        raise ValueError(f"unknown training event type {kind!r}")
    return out


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
        dataset=req.dataset,
        architecture=req.architecture,
        epochs=req.epochs if req.HasField("epochs") else None,
        learning_rate=req.learning_rate if req.HasField("learning_rate") else None,
        batch_size=req.batch_size if req.HasField("batch_size") else None,
        optimizer=req.optimizer,
        seed=req.seed if req.HasField("seed") else None,
        train_subset=req.train_subset,
        objective_metric=req.objective_metric,
        direction=_enum(req.direction, _DIRECTIONS, "direction"),
        max_trials=req.max_trials,
        parallelism=req.parallelism,
        strategy=_enum(req.strategy, _STRATEGIES, "strategy"),
        pruner=pruner,
        experiment_name=req.experiment_name,
        model_name=req.model_name,
        idempotency_key=req.idempotency_key,
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
    spec, base = s.spec, s.spec.base
    best = s.trial(s.best_trial)
    out = sweep_pb.Sweep(
        sweep_id=s.sweep_id,
        state=SWEEP_STATE_TO_PB[s.state],
        dataset=base.dataset,
        architecture=base.architecture,
        epochs=base.epochs,
        learning_rate=base.learning_rate,
        batch_size=base.batch_size,
        optimizer=base.optimizer,
        seed=base.seed,
        train_subset=base.train_subset,
        search_space={name: _space_pb(d) for name, d in spec.space.items()},
        objective_metric=spec.objective_metric,
        direction={v: k for k, v in _DIRECTIONS.items()}[spec.direction],
        strategy={v: k for k, v in _STRATEGIES.items()}[spec.strategy],
        max_trials=spec.max_trials,
        parallelism=spec.parallelism,
        experiment_name=base.experiment_name,
        model_name=base.model_name,
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


def sweep_event(e: SweepEvent) -> sweep_pb.WatchSweepResponse:
    out = sweep_pb.WatchSweepResponse(sweep_id=e.sweep_id, sequence=e.sequence, time=ts(e.time))
    d = e.event
    kind = d["type"]
    if kind == "queued":
        out.queued.SetInParent()
    elif kind == "trial_started":
        out.trial_started.CopyFrom(
            sweep_pb.TrialStarted(
                trial_number=d["trial_number"],
                job_id=d["job_id"],
                params=_params(d["params"]),
                attempt=d["attempt"],
                mlflow_run_id=d["mlflow_run_id"],
            )
        )
    elif kind == "trial_epoch":
        out.trial_epoch.CopyFrom(
            sweep_pb.TrialEpoch(
                trial_number=d["trial_number"],
                epoch=d["epoch"],
                total_epochs=d["total_epochs"],
                value=d["value"],
            )
        )
    elif kind == "trial_ended":
        out.trial_ended.CopyFrom(
            sweep_pb.TrialEnded(
                trial_number=d["trial_number"],
                state=TRIAL_STATE_TO_PB[d["state"]],
                value=d.get("value"),
                epochs_completed=d["epochs_completed"],
                error=d.get("error", ""),
            )
        )
    elif kind == "new_best":
        out.new_best.CopyFrom(
            sweep_pb.NewBest(
                trial_number=d["trial_number"], value=d["value"], params=_params(d["params"])
            )
        )
    elif kind == "succeeded":
        out.succeeded.CopyFrom(
            sweep_pb.SweepSucceeded(
                best_trial=d["best_trial"],
                best_value=d["best_value"],
                best_params=_params(d["best_params"]),
                model_name=d["model_name"],
                model_version=d["model_version"],
                metrics=d["metrics"],
            )
        )
    elif kind == "failed":
        out.failed.CopyFrom(sweep_pb.SweepFailed(error=d["error"]))
    elif kind == "cancelled":
        out.cancelled.CopyFrom(sweep_pb.SweepCancelled(cancelled_by=d.get("cancelled_by", "")))
    else:
        raise ValueError(f"unknown sweep event type {kind!r}")
    return out
