"""One training job, end to end: data, model, the epoch loop, evaluation, MLflow, registration.

``train`` is what the worker's training process runs (``services/training/child.py``). It
reports through ``emit`` (the job's typed events, picklable) and polls ``should_stop`` every
batch. The
loop itself lives in ``loop`` and knows nothing of MLflow, so the benchmark times exactly the
code jobs run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.training.events import BatchProgress, EpochCompleted, JobStarted
from services.training.ml import report
from services.training.ml.catalog import CLASS_NAMES
from services.training.ml.data import Dataset, Split, load_dataset
from services.training.ml.loop import (
    LR_DECAY_PER_EPOCH,
    SGD_MOMENTUM,
    Cancelled,
    Setup,
    ShouldStop,
    Throttle,
    check_stop,
    evaluate,
    pick_device,
    set_up,
    train_epoch,
)
from services.training.ml.models import Probabilities
from services.training.ml.search import TrialReporter, TrialSpec
from services.training.ml.tracking import RunTracker, is_transient, run_name
from services.training.params import JobParams

__all__ = ["Cancelled", "Pruned", "TrainResult", "TrainSpec", "TransientError", "train"]

# At most this many "batch" events per second; never one per batch.
BATCH_EVENTS_PER_S = 2.0
INPUT_EXAMPLE_ROWS = 5

Emit = Callable[[JobStarted | BatchProgress | EpochCompleted], None]


class TransientError(Exception):
    """MLflow could not be reached (or answered 5xx); retrying the job later may succeed."""


class Pruned(Exception):
    """A sweep's pruner stopped this trial after ``epoch`` (its run is FINISHED, tagged pruned)."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch} (objective {value:.6g})")
        self.epoch = epoch
        self.value = value


@dataclass(frozen=True)
class TrainSpec:
    """Everything one attempt of one training job needs: the job's parameters and what the
    worker adds for this attempt. Constructing a bad one raises ValueError naming the field;
    ``train`` checks again (unpickling skips __post_init__)."""

    job_id: str
    params: JobParams  # what to train (checked by params.py, the service's own validator)
    tracking_uri: str  # MLflow server
    data_dir: str | None  # an IDX directory that overrides the offline sources, or None
    client: str  # API-key client that submitted the job (a tag)
    attempt: int  # 1 on the first try
    # A sweep's trial: a child run of the sweep's, the objective reported every epoch (and
    # pruning obeyed), the model logged but not registered (the sweep registers its best).
    trial: TrialSpec | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for field in ("job_id", "tracking_uri"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{field} must be a non-empty string, got {value!r}")
        if not isinstance(self.client, str):
            raise ValueError(f"client must be a string, got {self.client!r}")
        if not isinstance(self.params, JobParams):
            raise ValueError(f"params must be JobParams, got {self.params!r}")
        self.params.check()  # InvalidParameter, a ValueError naming the parameter
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise ValueError(f"attempt must be an integer, at least 1, got {self.attempt!r}")
        if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir):
            raise ValueError(f"data_dir must be None or a directory path, got {self.data_dir!r}")


@dataclass(frozen=True)
class TrainResult:
    """What a finished job produced."""

    mlflow_run_id: str
    model_version: int  # 0 for a sweep trial
    metrics: dict[str, float]  # final: test_accuracy, test_loss, and the last epoch's metrics
    model_uri: str = ""  # the logged model (what a sweep registers if this trial is its best)


def train(spec: TrainSpec, emit: Emit, should_stop: ShouldStop) -> TrainResult:
    """Train ``spec``, log everything to MLflow, register the model; see the module docstring.

    Raises ValueError (bad spec), Cancelled (should_stop; run KILLED), Pruned (a sweep trial
    its pruner stopped; run FINISHED), TransientError (MLflow unreachable; chained), or
    whatever else failed (run FAILED).
    """
    spec.validate()
    try:
        return _train(spec, emit, should_stop)
    except (Cancelled, Pruned, TransientError):
        raise
    except Exception as exc:
        if is_transient(exc):
            raise TransientError(f"MLflow at {spec.tracking_uri} is unavailable: {exc}") from exc
        raise


@dataclass(frozen=True)
class _Prepared:
    """What a job trains with, ready before its MLflow run exists."""

    dataset: Dataset
    train: Split
    device: torch.device
    setup: Setup


def _prepare(spec: TrainSpec) -> _Prepared:
    p = spec.params
    dataset = load_dataset(p.dataset, spec.data_dir)
    if p.train_subset > len(dataset.train):
        raise ValueError(
            f"train_subset must be at most the {len(dataset.train)} training images of "
            f"{p.dataset}, got {p.train_subset}"
        )
    train_split = dataset.train.head(p.train_subset) if p.train_subset else dataset.train
    device = pick_device()
    setup = set_up(p.architecture, p.optimizer, p.learning_rate, p.seed, train_split, device)
    return _Prepared(dataset, train_split, device, setup)


def _train(spec: TrainSpec, emit: Emit, should_stop: ShouldStop) -> TrainResult:
    job, p = _prepare(spec), spec.params
    tags = {
        "mlmesh.job_id": spec.job_id,
        "mlmesh.client": spec.client,
        "mlmesh.attempt": str(spec.attempt),
    }
    name = run_name(
        p.architecture,
        p.dataset,
        p.optimizer,
        p.learning_rate,
        p.batch_size,
        p.epochs,
        trial=spec.trial.number if spec.trial is not None else None,
    )
    reporter = None
    if spec.trial is not None:
        reporter = TrialReporter(spec.trial)
        tags |= {
            "mlflow.parentRunId": spec.trial.parent_run_id,
            "mlmesh.sweep_id": spec.trial.sweep_id,
            "mlmesh.trial_number": str(spec.trial.number),
        }
    tracker = RunTracker.open(spec.tracking_uri, p.experiment_name, name, tags)
    emit(JobStarted(spec.attempt, tracker.run_id, str(job.device)))
    try:
        result = _run(spec, job, tracker, emit, should_stop, reporter)
    except Cancelled:
        tracker.end_quietly("KILLED")
        raise
    except Pruned:
        tracker.client.set_tag(tracker.run_id, "mlmesh.trial_state", "pruned")
        tracker.end("FINISHED")
        raise
    except BaseException:
        tracker.end_quietly("FAILED")
        raise
    tracker.end("FINISHED")
    return result


def _run(
    spec: TrainSpec,
    job: _Prepared,
    tracker: RunTracker,
    emit: Emit,
    should_stop: ShouldStop,
    reporter: TrialReporter | None,
) -> TrainResult:
    dataset, model, p = job.dataset, job.setup.model, spec.params
    tracker.log_params(
        {
            **p.hyperparameters(),
            "train_size": len(job.train),
            "val_size": len(dataset.val),
            "test_size": len(dataset.test),
            "device": str(job.device),
            "dataset_digest": dataset.digest,
            "dataset_source": dataset.source,
            "pixel_mean": round(job.setup.pixel_mean, 6),
            "pixel_std": round(job.setup.pixel_std, 6),
            "lr_decay_per_epoch": LR_DECAY_PER_EPOCH,
            **({"momentum": SGD_MOMENTUM} if p.optimizer == "sgd" else {}),
        }
    )
    sizes = {"train": len(job.train), "val": len(dataset.val), "test": len(dataset.test)}
    tracker.log_dataset(dataset.name, dataset.digest, dataset.source, profile=json.dumps(sizes))

    train_on = job.train.to(job.device)
    val_on = dataset.val.to(job.device)
    generator = torch.Generator().manual_seed(p.seed)
    throttle = Throttle(1.0 / BATCH_EVENTS_PER_S)
    history: list[dict[str, float]] = []
    for epoch in range(1, p.epochs + 1):

        def progress(batch: int, total: int, loss: float, epoch: int = epoch) -> None:
            emit(BatchProgress(epoch, batch, total, loss))

        started = time.perf_counter()
        train_loss = train_epoch(
            model,
            job.setup.optimizer,
            train_on,
            batch_size=p.batch_size,
            generator=generator,
            should_stop=should_stop,
            on_progress=progress,
            throttle=throttle,
        )
        trained = time.perf_counter()
        job.setup.scheduler.step()
        val_loss, val_accuracy, _ = evaluate(model, val_on)
        metrics = {
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            # epoch_seconds includes validation; train_seconds is the training pass alone,
            # the number to hold against a plain PyTorch loop's epoch.
            "train_seconds": trained - started,
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        tracker.log_metrics(metrics, step=epoch)
        emit(EpochCompleted(epoch, p.epochs, metrics))
        if reporter is not None and reporter.report(epoch, metrics, last=epoch == p.epochs):
            raise Pruned(epoch, metrics[reporter.spec.objective_metric])

    check_stop(should_stop)
    test_loss, test_accuracy, predictions = evaluate(model, dataset.test.to(job.device))
    final = {"test_accuracy": test_accuracy, "test_loss": test_loss}
    tracker.log_metrics(final, step=p.epochs)

    with tempfile.TemporaryDirectory(prefix="mlmesh-train-") as tmp:
        directory = Path(tmp)
        _write_artifacts(directory, dataset, job.train, history, predictions.cpu().numpy())
        tracker.log_artifacts(directory)

    check_stop(should_stop)
    served = Probabilities(model).cpu().eval()
    example = job.train.images[:INPUT_EXAMPLE_ROWS].cpu().numpy()
    model_info = tracker.log_model(served, example)
    check_stop(should_stop)
    version = 0
    if spec.trial is None:
        version = tracker.register(
            model_info.model_uri, p.model_name, {"mlmesh.job_id": spec.job_id}
        )
    return TrainResult(
        mlflow_run_id=tracker.run_id,
        model_version=version,
        metrics={**final, **history[-1]},
        model_uri=model_info.model_uri,
    )


def _write_artifacts(
    directory: Path,
    dataset: Dataset,
    train_split: Split,
    history: list[dict[str, float]],
    predictions: np.ndarray,
) -> None:
    labels = dataset.test.labels.numpy()
    names = CLASS_NAMES[dataset.name]
    report.write_training_curves(history, directory / report.TRAINING_CURVES)
    report.write_confusion_matrix(labels, predictions, names, directory / report.CONFUSION_MATRIX)
    report.write_classification_report(labels, predictions, names, directory)
    reference = report.input_reference(train_split.images, train_split.labels)
    reference = {"dataset": dataset.name, "dataset_digest": dataset.digest, **reference}
    report.write_input_reference(reference, directory / report.INPUT_REFERENCE)
