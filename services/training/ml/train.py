"""One training job, end to end: data, model, the epoch loop, evaluation, MLflow, registration.

``train`` is what the worker's training process runs (``services/training/child.py``). It
reports through ``emit`` (plain, picklable dicts) and polls ``should_stop`` every batch. The
loop itself lives in ``loop`` and knows nothing of MLflow, so the benchmark times exactly the
code jobs run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from services.training.ml import report
from services.training.ml.catalog import ARCHITECTURES, CLASS_NAMES, DATASETS, OPTIMIZERS
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

__all__ = ["Cancelled", "Pruned", "TrainResult", "TrainSpec", "TransientError", "train"]

# At most this many "batch" events per second; never one per batch.
BATCH_EVENTS_PER_S = 2.0
INPUT_EXAMPLE_ROWS = 5
# The same bounds the service validates submissions against (services/training/validation.py).
MAX_EPOCHS = 100
MAX_LEARNING_RATE = 10.0
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**32 - 1
MAX_TRAIN_SUBSET = 10_000_000

Emit = Callable[[dict], None]


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
    """Everything one attempt of one training job needs. Constructing a bad one raises
    ValueError naming the field; ``train`` checks again (unpickling skips __post_init__)."""

    job_id: str
    dataset: str
    architecture: str
    epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str
    seed: int
    train_subset: int  # 0 = the whole training split; else the first N training images
    experiment_name: str
    model_name: str  # registered model to add a version to
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
        for field in ("job_id", "experiment_name", "model_name", "tracking_uri"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{field} must be a non-empty string, got {value!r}")
        if not isinstance(self.client, str):
            raise ValueError(f"client must be a string, got {self.client!r}")
        for field, allowed in (
            ("dataset", DATASETS),
            ("architecture", ARCHITECTURES),
            ("optimizer", OPTIMIZERS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"{field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}"
                )
        for field, low, high in (
            ("epochs", 1, MAX_EPOCHS),
            ("batch_size", 1, MAX_BATCH_SIZE),
            ("seed", 0, MAX_SEED),
            ("train_subset", 0, MAX_TRAIN_SUBSET),
            ("attempt", 1, None),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"{field} must be {bound}, got {value}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
            raise ValueError(f"learning_rate must be a finite number, got {lr!r}")
        if not 0 < lr <= MAX_LEARNING_RATE:
            raise ValueError(
                f"learning_rate must be above 0 and at most {MAX_LEARNING_RATE:g}, got {lr!r}"
            )
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
    dataset = load_dataset(spec.dataset, spec.data_dir)
    if spec.train_subset > len(dataset.train):
        raise ValueError(
            f"train_subset must be at most the {len(dataset.train)} training images of "
            f"{spec.dataset}, got {spec.train_subset}"
        )
    train_split = dataset.train.head(spec.train_subset) if spec.train_subset else dataset.train
    device = pick_device()
    setup = set_up(
        spec.architecture, spec.optimizer, spec.learning_rate, spec.seed, train_split, device
    )
    return _Prepared(dataset, train_split, device, setup)


def _train(spec: TrainSpec, emit: Emit, should_stop: ShouldStop) -> TrainResult:
    job = _prepare(spec)
    tags = {
        "mlmesh.job_id": spec.job_id,
        "mlmesh.client": spec.client,
        "mlmesh.attempt": str(spec.attempt),
    }
    name = run_name(
        spec.architecture,
        spec.dataset,
        spec.optimizer,
        spec.learning_rate,
        spec.batch_size,
        spec.epochs,
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
    tracker = RunTracker.open(spec.tracking_uri, spec.experiment_name, name, tags)
    emit({"type": "started", "mlflow_run_id": tracker.run_id, "device": str(job.device)})
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
    dataset, model = job.dataset, job.setup.model
    tracker.log_params(
        {
            **{k: v for k, v in asdict(spec).items() if k in _HYPERPARAMETERS},
            "train_size": len(job.train),
            "val_size": len(dataset.val),
            "test_size": len(dataset.test),
            "device": str(job.device),
            "dataset_digest": dataset.digest,
            "dataset_source": dataset.source,
            "pixel_mean": round(job.setup.pixel_mean, 6),
            "pixel_std": round(job.setup.pixel_std, 6),
            "lr_decay_per_epoch": LR_DECAY_PER_EPOCH,
            **({"momentum": SGD_MOMENTUM} if spec.optimizer == "sgd" else {}),
        }
    )
    sizes = {"train": len(job.train), "val": len(dataset.val), "test": len(dataset.test)}
    tracker.log_dataset(dataset.name, dataset.digest, dataset.source, profile=json.dumps(sizes))

    train_on = job.train.to(job.device)
    val_on = dataset.val.to(job.device)
    generator = torch.Generator().manual_seed(spec.seed)
    throttle = Throttle(1.0 / BATCH_EVENTS_PER_S)
    history: list[dict[str, float]] = []
    for epoch in range(1, spec.epochs + 1):

        def progress(batch: int, total: int, loss: float, epoch: int = epoch) -> None:
            emit(
                {
                    "type": "batch",
                    "epoch": epoch,
                    "batch": batch,
                    "total_batches": total,
                    "train_loss": loss,
                }
            )

        started = time.perf_counter()
        train_loss = train_epoch(
            model,
            job.setup.optimizer,
            train_on,
            batch_size=spec.batch_size,
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
        emit({"type": "epoch", "epoch": epoch, "total_epochs": spec.epochs, "metrics": metrics})
        if reporter is not None and reporter.report(epoch, metrics, last=epoch == spec.epochs):
            raise Pruned(epoch, metrics[reporter.spec.objective_metric])

    check_stop(should_stop)
    test_loss, test_accuracy, predictions = evaluate(model, dataset.test.to(job.device))
    final = {"test_accuracy": test_accuracy, "test_loss": test_loss}
    tracker.log_metrics(final, step=spec.epochs)

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
            model_info.model_uri, spec.model_name, {"mlmesh.job_id": spec.job_id}
        )
    return TrainResult(
        mlflow_run_id=tracker.run_id,
        model_version=version,
        metrics={**final, **history[-1]},
        model_uri=model_info.model_uri,
    )


_HYPERPARAMETERS = (
    "dataset",
    "architecture",
    "epochs",
    "learning_rate",
    "batch_size",
    "optimizer",
    "seed",
    "train_subset",
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
