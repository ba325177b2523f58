"""Training jobs and events to mlmesh.training.v1 messages, and requests to submissions."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from mlmesh.training.v1 import training_pb2 as pb
from services.training.jobs import Job, JobEvent
from services.training.validation import Submission

STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


def _ts(when: datetime | None) -> Timestamp | None:
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
        create_time=_ts(j.create_time),
        start_time=_ts(j.start_time),
        end_time=_ts(j.end_time),
    )


def event(e: JobEvent) -> pb.WatchTrainingJobResponse:
    out = pb.WatchTrainingJobResponse(job_id=e.job_id, sequence=e.sequence, time=_ts(e.time))
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
    else:
        raise ValueError(f"unknown training event type {kind!r}")
    return out
