"""One training job, end to end: data, model, the epoch loop, evaluation, MLflow, registration.

``train`` is what the worker's training process runs (``services/training/child.py``). It
reports through ``emit`` (the job's typed events, picklable) and polls ``should_stop`` every
batch. The
loop itself lives in ``loop`` and knows nothing of MLflow, so the benchmark times exactly the
code jobs run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.models.model import ModelInfo

from services.common.model_contract import drift_reference
from services.training.events import BatchProgress, EpochCompleted, JobStarted
from services.training.ml import report
from services.training.ml.data import Dataset, DataSource, Split, load_dataset
from services.training.ml.loop import (
    LR_DECAY_PER_EPOCH,
    SGD_MOMENTUM,
    Cancelled,
    Setup,
    ShouldStop,
    Throttle,
    augmenter,
    check_stop,
    evaluate,
    pick_device,
    seed_everything,
    set_up,
    train_epoch,
)
from services.training.ml.models import Probabilities
from services.training.ml.search import TrialReporter, TrialSpec
from services.training.ml.tracking import (
    RunTracker,
    is_transient,
    model_metadata,
    run_name,
    signature,
)
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
    # Where an uploaded dataset version is stored (a built-in one needs no more than its name)
    # and where downloaded versions are kept on this machine.
    data: DataSource | None = None
    cache_dir: str = ""

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
    """What a job trains with, ready before its MLflow run exists (``setup`` is None for
    gbm, which is not a network)."""

    dataset: Dataset
    train: Split
    device: torch.device
    setup: Setup | None


def _prepare(spec: TrainSpec) -> _Prepared:
    p = spec.params
    dataset = load_dataset(
        p.dataset,
        spec.data_dir,
        source=spec.data,
        cache_dir=spec.cache_dir or None,
        tracking_uri=spec.tracking_uri,
    )
    if p.train_subset > len(dataset.train):
        raise ValueError(
            f"train_subset must be at most the {len(dataset.train)} training samples of "
            f"{p.dataset}, got {p.train_subset}"
        )
    train_split = dataset.train.head(p.train_subset) if p.train_subset else dataset.train
    if p.architecture == GBM:
        seed_everything(p.seed)
        return _Prepared(dataset, train_split, torch.device("cpu"), None)
    device = pick_device()
    setup = set_up(
        p.architecture,
        p.optimizer,
        p.learning_rate,
        p.seed,
        train_split,
        device,
        kind=dataset.kind,
        shape=dataset.shape,
        classes=len(dataset.class_names),
    )
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
    dataset, p = job.dataset, spec.params
    statistics: dict[str, object] = {}
    if job.setup is not None and dataset.kind == "images":
        mean, std = float(job.setup.mean), float(job.setup.std)  # type: ignore[arg-type]
        statistics = {"pixel_mean": round(mean, 6), "pixel_std": round(std, 6)}
    tracker.log_params(
        {
            **p.hyperparameters(),
            "train_size": len(job.train),
            "val_size": len(dataset.val),
            "test_size": len(dataset.test),
            "classes": len(dataset.class_names),
            "input_shape": "x".join(str(d) for d in dataset.shape),
            "device": str(job.device),
            "dataset_digest": dataset.digest,
            "dataset_source": dataset.source,
            **statistics,
            **({"lr_decay_per_epoch": LR_DECAY_PER_EPOCH} if job.setup is not None else {}),
            **({"momentum": SGD_MOMENTUM} if p.optimizer == "sgd" and job.setup else {}),
        }
    )
    summary = {
        "dataset": dataset.reference,
        "kind": dataset.kind,
        "classes": list(dataset.class_names),
        "train": len(job.train),
        "val": len(dataset.val),
        "test": len(dataset.test),
    }
    tracker.log_dataset(dataset.name, dataset.digest, summary)
    if job.setup is None:
        history, final, model_info = _run_gbm(spec, job, tracker, emit, should_stop, reporter)
    else:
        history, final, model_info = _run_network(
            spec, job, job.setup, tracker, emit, should_stop, reporter
        )
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


def _run_network(
    spec: TrainSpec,
    job: _Prepared,
    setup: Setup,
    tracker: RunTracker,
    emit: Emit,
    should_stop: ShouldStop,
    reporter: TrialReporter | None,
) -> tuple[list[dict[str, float]], dict[str, float], ModelInfo]:
    dataset, model, p = job.dataset, setup.model, spec.params
    train_on = job.train.to(job.device)
    val_on = dataset.val.to(job.device)
    generator = torch.Generator().manual_seed(p.seed)
    augment = augmenter(dataset.shape, generator) if p.augment else None  # type: ignore[arg-type]
    throttle = Throttle(1.0 / BATCH_EVENTS_PER_S)
    history: list[dict[str, float]] = []
    for epoch in range(1, p.epochs + 1):

        def progress(batch: int, total: int, loss: float, epoch: int = epoch) -> None:
            emit(BatchProgress(epoch, batch, total, loss))

        started = time.perf_counter()
        train_loss = train_epoch(
            model,
            setup.optimizer,
            train_on,
            batch_size=p.batch_size,
            generator=generator,
            should_stop=should_stop,
            on_progress=progress,
            throttle=throttle,
            augment=augment,
        )
        trained = time.perf_counter()
        setup.scheduler.step()
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
        _epoch_done(tracker, emit, reporter, history, metrics, epoch, p.epochs)

    check_stop(should_stop)
    test_loss, test_accuracy, predicted = evaluate(model, dataset.test.to(job.device))
    final = {"test_accuracy": test_accuracy, "test_loss": test_loss}
    tracker.log_metrics(final, step=p.epochs)
    predictions = predicted.cpu().numpy()
    _log_artifacts(tracker, dataset, job.train, history, predictions)

    check_stop(should_stop)
    served = Probabilities(model).cpu().eval()
    example = job.train.images[:INPUT_EXAMPLE_ROWS].cpu().numpy()
    model_info = tracker.log_model(
        served,
        example,
        signature(dataset.features, len(dataset.class_names)),
        model_metadata(dataset.class_names, dataset.shape if dataset.kind == "images" else None),
    )
    return history, final, model_info


# gbm: scikit-learn's gradient boosting; each epoch adds this many trees.
GBM = "gbm"
GBM_TREES_PER_EPOCH = 50


def _run_gbm(
    spec: TrainSpec,
    job: _Prepared,
    tracker: RunTracker,
    emit: Emit,
    should_stop: ShouldStop,
    reporter: TrialReporter | None,
) -> tuple[list[dict[str, float]], dict[str, float], ModelInfo]:
    """Gradient boosting on a table: every epoch grows the ensemble (warm start) by
    GBM_TREES_PER_EPOCH trees and reports validation figures, like a network's epoch."""
    import pandas as pd
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.metrics import log_loss

    dataset, p = job.dataset, spec.params
    columns = list(dataset.columns) or [f"feature-{i}" for i in range(dataset.features)]

    def frame(split: Split) -> pd.DataFrame:
        return pd.DataFrame(split.images.numpy().astype(np.float64), columns=columns)

    x_train, y_train = frame(job.train), job.train.labels.numpy()
    x_val, y_val = frame(dataset.val), dataset.val.labels.numpy()
    classes = list(range(len(dataset.class_names)))
    model = GradientBoostingClassifier(
        learning_rate=p.learning_rate, warm_start=True, random_state=p.seed, n_estimators=0
    )
    history: list[dict[str, float]] = []
    for epoch in range(1, p.epochs + 1):
        check_stop(should_stop)
        started = time.perf_counter()
        model.set_params(n_estimators=epoch * GBM_TREES_PER_EPOCH)
        model.fit(x_train, y_train)
        trained = time.perf_counter()
        train_loss = log_loss(y_train, model.predict_proba(x_train), labels=classes)
        val_proba = model.predict_proba(x_val)
        metrics = {
            "train_loss": float(train_loss),
            "val_loss": float(log_loss(y_val, val_proba, labels=classes)),
            "val_accuracy": float((val_proba.argmax(axis=1) == y_val).mean()),
            "train_seconds": trained - started,
            "epoch_seconds": time.perf_counter() - started,
        }
        _epoch_done(tracker, emit, reporter, history, metrics, epoch, p.epochs)

    check_stop(should_stop)
    x_test, y_test = frame(dataset.test), dataset.test.labels.numpy()
    test_proba = model.predict_proba(x_test)
    predictions = test_proba.argmax(axis=1)
    final = {
        "test_accuracy": float((predictions == y_test).mean()),
        "test_loss": float(log_loss(y_test, test_proba, labels=classes)),
    }
    tracker.log_metrics(final, step=p.epochs)
    _log_artifacts(tracker, dataset, job.train, history, predictions, columns=x_train)
    check_stop(should_stop)
    model_info = tracker.log_sklearn_model(
        model, x_train.head(INPUT_EXAMPLE_ROWS), model_metadata(dataset.class_names, None)
    )
    return history, final, model_info


def _epoch_done(
    tracker: RunTracker,
    emit: Emit,
    reporter: TrialReporter | None,
    history: list[dict[str, float]],
    metrics: dict[str, float],
    epoch: int,
    epochs: int,
) -> None:
    history.append(metrics)
    tracker.log_metrics(metrics, step=epoch)
    emit(EpochCompleted(epoch, epochs, metrics))
    if reporter is not None and reporter.report(epoch, metrics, last=epoch == epochs):
        raise Pruned(epoch, metrics[reporter.spec.objective_metric])


def _log_artifacts(
    tracker: RunTracker,
    dataset: Dataset,
    train_split: Split,
    history: list[dict[str, float]],
    predictions: np.ndarray,
    columns: object | None = None,
) -> None:
    """The run's figures, report and drift reference: per column for a model served with a
    column signature (gbm), over its one input tensor otherwise."""
    labels = dataset.test.labels.numpy()
    names = list(dataset.class_names)
    with tempfile.TemporaryDirectory(prefix="mlmesh-train-") as tmp:
        directory = Path(tmp)
        report.write_training_curves(history, directory / report.TRAINING_CURVES)
        report.write_confusion_matrix(
            labels, predictions, names, directory / report.CONFUSION_MATRIX
        )
        report.write_classification_report(labels, predictions, names, directory)
        reference = report.input_reference(
            train_split.images, train_split.labels, len(names), dataset.kind
        )
        if columns is not None:  # a DataFrame of the training columns
            reference["inputs"] = drift_reference(dict(columns.items()))["inputs"]  # type: ignore[attr-defined]
        reference = {"dataset": dataset.reference, "dataset_digest": dataset.digest, **reference}
        report.write_input_reference(reference, directory / report.INPUT_REFERENCE)
        tracker.log_artifacts(directory)
