"""Validation of a training submission: defaults resolved, every bad value named."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.training.jobs import JobParams
from services.training.ml.catalog import ARCHITECTURES, DATASETS, OPTIMIZERS

DEFAULT_DATASET = "mnist"
DEFAULT_ARCHITECTURE = "cnn"
DEFAULT_EPOCHS = 3
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 128
DEFAULT_OPTIMIZER = "adam"
DEFAULT_SEED = 42
MAX_SEED = 2**32 - 1
DEFAULT_EXPERIMENT = "mnist"
MODEL_NAME_SUFFIX = "-classifier"

_NAME = re.compile(r"^[\w][\w .:/@+-]{0,254}$")


@dataclass(frozen=True)
class Submission:
    """A submission as the caller sent it: None or "" means "use the default"."""

    dataset: str = ""
    architecture: str = ""
    epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    optimizer: str = ""
    seed: int | None = None
    train_subset: int = 0
    experiment_name: str = ""
    model_name: str = ""
    idempotency_key: str = ""


def _choice(value: str, field: str, allowed: tuple[str, ...], default: str) -> str:
    value = value.strip().lower() or default
    if value not in allowed:
        raise InvalidArgument(f"{field} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _in_range(value: float, field: str, low: float, high: float, *, open_low: bool = False) -> None:
    if value != value or value > high or value < low or (open_low and value == low):
        bound = f"above {low:g}" if open_low else f"at least {low:g}"
        raise InvalidArgument(f"{field} must be {bound} and at most {high:g}, got {value!r}")


def _name(value: str, field: str, default: str) -> str:
    value = value.strip() or default
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{field} must be 1-255 letters, digits, spaces or ._:/@+- characters, got {value!r}"
        )
    return value


def default_model_name(dataset: str) -> str:
    """The registered model a job or sweep on ``dataset`` adds its version to when it names
    none: one model per dataset (``fashion_mnist`` -> ``fashion-mnist-classifier``), so that
    no model name holds versions trained on different data."""
    return dataset.replace("_", "-") + MODEL_NAME_SUFFIX


def validate(sub: Submission) -> JobParams:
    """Resolve defaults and check every field; InvalidArgument names the first bad one."""
    epochs = DEFAULT_EPOCHS if sub.epochs is None else sub.epochs
    _in_range(epochs, "epochs", 1, 100)
    learning_rate = DEFAULT_LEARNING_RATE if sub.learning_rate is None else sub.learning_rate
    _in_range(learning_rate, "learning_rate", 0, 10, open_low=True)
    batch_size = DEFAULT_BATCH_SIZE if sub.batch_size is None else sub.batch_size
    _in_range(batch_size, "batch_size", 1, 4096)
    seed = DEFAULT_SEED if sub.seed is None else sub.seed
    _in_range(seed, "seed", 0, MAX_SEED)
    _in_range(sub.train_subset, "train_subset", 0, 10_000_000)
    if len(sub.idempotency_key) > 128:
        raise InvalidArgument("idempotency_key must be at most 128 characters")
    dataset = _choice(sub.dataset, "dataset", DATASETS, DEFAULT_DATASET)
    return JobParams(
        dataset=dataset,
        architecture=_choice(sub.architecture, "architecture", ARCHITECTURES, DEFAULT_ARCHITECTURE),
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        optimizer=_choice(sub.optimizer, "optimizer", OPTIMIZERS, DEFAULT_OPTIMIZER),
        seed=seed,
        train_subset=sub.train_subset,
        experiment_name=_name(sub.experiment_name, "experiment_name", DEFAULT_EXPERIMENT),
        model_name=_name(sub.model_name, "model_name", default_model_name(dataset)),
    )
