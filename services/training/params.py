"""Training parameters: their one typed definition, bounds included, and the one validator.

``JobParams`` is the definition. Each field is a parameter of a training job: its type is the
field's annotation, and ``param(...)`` gives its default, its bounds (or choices, or a name
pattern), whether a sweep may search it, whether it is a hyperparameter (logged as a param of
the job's MLflow run) and a one-line doc. Everything else is derived from it: ``validate``
(which every job, a sweep's fixed part and every value a sweep's space can produce go
through), the job's record in PostgreSQL (one JSON object), the protobuf conversions
(``convert.py``, by field name), the MLflow params a run logs and what a sweep may search.

Adding a parameter: one field below; its fields in the contract (SubmitTrainingJobRequest
and SubmitSweepRequest take it; TrainingJob or its Hyperparameters, and Sweep, report it:
``tests/unit/test_training_params.py`` checks that they agree); and the training code that
uses it (``ml/train.py`` reads ``spec.params``). Old records lack it and get its default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.training.ml.catalog import ARCHITECTURES, DATASETS, OPTIMIZERS

MODEL_NAME_SUFFIX = "-classifier"
# Experiment and registered-model names: what MLflow and the gateway's paths take well.
NAME = re.compile(r"^[\w][\w .:/@+-]{0,254}$")
NAME_RULE = "1-255 letters, digits, spaces or ._:/@+- characters"
IDEMPOTENCY_KEY_MAX = 128


class InvalidParameter(InvalidArgument, ValueError):
    """A parameter out of its bounds, of the wrong type or not one at all; the message names it.

    An InvalidArgument for a caller (INVALID_ARGUMENT), and a ValueError for the training
    process, which checks the parameters it is handed again.
    """


def default_model_name(dataset: str) -> str:
    """The registered model a job or sweep on ``dataset`` adds its version to when it names
    none: one model per dataset (``fashion_mnist`` -> ``fashion-mnist-classifier``), so that
    no model name holds versions trained on different data."""
    return dataset.replace("_", "-") + MODEL_NAME_SUFFIX


@dataclass(frozen=True)
class Param:
    """One parameter, as ``param(...)`` declares it on a field of ``JobParams``."""

    name: str
    kind: type  # int, float, str or bool: the field's annotation
    doc: str
    default: Any = None
    # The default when it depends on parameters declared before this one.
    default_from: Callable[[Mapping[str, Any]], Any] | None = None
    low: float | None = None
    high: float | None = None
    above_low: bool = False  # low itself is out of bounds
    choices: tuple[str, ...] = ()  # the only values a string takes (compared in lower case)
    pattern: re.Pattern[str] | None = None  # what a free-form string must match
    pattern_rule: str = ""  # the pattern, in words for error messages
    searchable: bool = False  # a sweep may search it
    hyperparameter: bool = True  # what a model is trained with (logged on its MLflow run)

    def coerce(self, value: Any) -> Any:
        """``value`` as this parameter's type (an integral float is an int, strings are
        trimmed and choices lower-cased); InvalidParameter when it cannot be."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidParameter(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise InvalidParameter(f"{self.name} must be a string, got {value!r}")
            return value.strip().lower() if self.choices else value.strip()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParameter(f"{self.name} must be a number, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise InvalidParameter(f"{self.name} must be an integer, got {value!r}")
            return int(value)
        return float(value)

    def check(self, value: Any) -> None:
        """Raise InvalidParameter naming this parameter unless ``value`` is a valid one."""
        if self.kind is bool:
            valid_type = isinstance(value, bool)
        elif self.kind is float:
            valid_type = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            valid_type = isinstance(value, self.kind) and not isinstance(value, bool)
        if not valid_type:
            noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
            raise InvalidParameter(f"{self.name} must be {noun[self.kind]}, got {value!r}")
        if self.choices and value not in self.choices:
            raise InvalidParameter(
                f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
            )
        if self.pattern is not None and not self.pattern.match(value):
            raise InvalidParameter(f"{self.name} must be {self.pattern_rule}, got {value!r}")
        if self.low is None or self.high is None:
            return
        too_low = value < self.low or (self.above_low and value == self.low)
        if math.isnan(value) or too_low or value > self.high:
            bound = f"above {self.low:g}" if self.above_low else f"at least {self.low:g}"
            raise InvalidParameter(
                f"{self.name} must be {bound} and at most {self.high:g}, got {value!r}"
            )


def param(doc: str, **declared: Any) -> Any:
    """A ``JobParams`` field that is a parameter; ``declared`` are ``Param``'s attributes."""
    return field(metadata={"param": {"doc": doc, **declared}})


@dataclass(frozen=True)
class JobParams:
    """What a job trains: every parameter, valid (construction checks them), defaults resolved.

    Build one from what a caller sent with ``validate``, from a stored record with
    ``from_record``. The order of the fields is the order they are resolved and checked in.
    """

    dataset: str = param("the dataset trained on", default="mnist", choices=DATASETS)
    architecture: str = param("the network", default="cnn", choices=ARCHITECTURES, searchable=True)
    epochs: int = param(
        "passes over the training split", default=3, low=1, high=100, searchable=True
    )
    learning_rate: float = param(
        "the first epoch's step size (it decays x0.7 per epoch)",
        default=1e-3,
        low=0,
        high=10,
        above_low=True,
        searchable=True,
    )
    batch_size: int = param("images per step", default=128, low=1, high=4096, searchable=True)
    optimizer: str = param("the optimizer", default="adam", choices=OPTIMIZERS, searchable=True)
    seed: int = param(
        "makes data order and initialisation repeatable", default=42, low=0, high=2**32 - 1
    )
    train_subset: int = param(
        "train on the first N training images; 0 means all", default=0, low=0, high=10_000_000
    )
    experiment_name: str = param(
        "the MLflow experiment the run is logged to",
        default="mnist",
        pattern=NAME,
        pattern_rule=NAME_RULE,
        hyperparameter=False,
    )
    model_name: str = param(
        "the registered model a version is added to; default the dataset's",
        default_from=lambda resolved: default_model_name(resolved["dataset"]),
        pattern=NAME,
        pattern_rule=NAME_RULE,
        hyperparameter=False,
    )

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise InvalidParameter naming the first bad parameter. Construction does this;
        the training process does it again (unpickling skips construction)."""
        for p in PARAMS:
            p.check(getattr(self, p.name))

    def hyperparameters(self) -> dict[str, Any]:
        """What the model is trained with, by name: the params of its MLflow run."""
        return {p.name: getattr(self, p.name) for p in PARAMS if p.hyperparameter}

    def to_record(self) -> dict[str, Any]:
        """The JSON object stored for a job (and as a sweep's fixed part)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> JobParams:
        """A stored record's parameters; one stored before a parameter existed gets its
        default."""
        return validate({name: v for name, v in record.items() if name in PARAM_NAMES})


def _definition() -> tuple[Param, ...]:
    kinds = typing.get_type_hints(JobParams)
    return tuple(
        Param(name=f.name, kind=kinds[f.name], **f.metadata["param"])
        for f in dataclasses.fields(JobParams)
    )


PARAMS: tuple[Param, ...] = _definition()
PARAM_NAMES = tuple(p.name for p in PARAMS)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
SEARCHABLE = tuple(p.name for p in PARAMS if p.searchable)


def given(value: Any) -> bool:
    """Whether a caller gave a value: None and "" mean "the default"."""
    return value is not None and value != ""


def validate(values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> JobParams:
    """The job ``values`` describe: each given value of its type and within its bounds, the
    rest their defaults (``defaults``, where a caller such as a sweep has its own, else the
    definition's); InvalidParameter names the first bad one."""
    unknown = sorted(set(values) - set(PARAM_NAMES))
    if unknown:
        raise InvalidParameter(
            f"{unknown[0]} is not a training parameter; one of {', '.join(PARAM_NAMES)}"
        )
    defaults = defaults or {}
    resolved: dict[str, Any] = {}
    for p in PARAMS:
        value = values.get(p.name)
        value = p.coerce(value) if given(value) else None
        if not given(value):  # a string of blanks is not given either
            if p.name in defaults:
                value = defaults[p.name]
            else:
                value = p.default_from(resolved) if p.default_from else p.default
        resolved[p.name] = value
    return JobParams(**resolved)  # which checks every value


@dataclass(frozen=True)
class Submission:
    """A job as the caller sent it: the parameters it gave, by name (the others take their
    defaults), and its idempotency key."""

    params: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""

    def validate(self, defaults: Mapping[str, Any] | None = None) -> JobParams:
        """The job's parameters; InvalidArgument names the first bad field."""
        if len(self.idempotency_key) > IDEMPOTENCY_KEY_MAX:
            raise InvalidArgument(
                f"idempotency_key must be at most {IDEMPOTENCY_KEY_MAX} characters"
            )
        return validate(self.params, defaults)
