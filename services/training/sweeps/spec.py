"""What a sweep is: its submission, its validated spec, and the validation between them.

A sweep searches some of a training job's parameters (those ``params.py`` marks searchable);
the rest are fixed for all its trials. Every candidate a space can produce must be a valid
training job, so the fixed part and every value of the space go through the jobs' own
validator (``params.validate``): a bad value is INVALID_ARGUMENT naming
``search_space.<parameter>``.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.training.ml import search
from services.training.ml.search import Choice, Domain, FloatRange, IntRange, PrunerSpec
from services.training.params import BY_NAME, SEARCHABLE, JobParams, Param, Submission, validate

OBJECTIVES = ("val_accuracy", "val_loss", "train_loss")
DEFAULT_OBJECTIVE = "val_accuracy"
DEFAULT_SWEEP_EXPERIMENT = "mnist-sweeps"
DEFAULT_MAX_TRIALS = 10
MAX_TRIALS = 500
DEFAULT_PARALLELISM = 2
MAX_PARALLELISM = 64


@dataclass(frozen=True)
class SweepSubmission:
    """A sweep as the caller sent it: the space, the fixed parameters it gave (with its
    idempotency key), and how to search; 0 or "" means "use the default"."""

    space: dict[str, Domain]
    fixed: Submission = field(default_factory=Submission)
    objective_metric: str = ""
    direction: str = ""
    max_trials: int = 0
    parallelism: int = 0
    strategy: str = ""
    pruner: PrunerSpec | None = None


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the fixed part of every trial, the space, and how to search it."""

    base: JobParams
    space: dict[str, Domain]
    objective_metric: str
    direction: str
    strategy: str
    max_trials: int  # the budget; for grid search at most the grid's size
    parallelism: int
    pruner: PrunerSpec | None

    def trial_params(self, sampled: dict[str, Any]) -> JobParams:
        """The job a trial trains: the base with the sampled values."""
        return dataclasses.replace(self.base, **sampled)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base.to_record(),
            "space": {name: _domain_json(d) for name, d in self.space.items()},
            "objective_metric": self.objective_metric,
            "direction": self.direction,
            "strategy": self.strategy,
            "max_trials": self.max_trials,
            "parallelism": self.parallelism,
            "pruner": dataclasses.asdict(self.pruner) if self.pruner else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepSpec:
        return cls(
            base=JobParams.from_record(data["base"]),
            space={name: _domain_from_json(d) for name, d in data["space"].items()},
            objective_metric=data["objective_metric"],
            direction=data["direction"],
            strategy=data["strategy"],
            max_trials=data["max_trials"],
            parallelism=data["parallelism"],
            pruner=PrunerSpec(**data["pruner"]) if data["pruner"] else None,
        )


def _domain_json(domain: Domain) -> dict[str, Any]:
    kind = {Choice: "choice", FloatRange: "range", IntRange: "int_range"}[type(domain)]
    values = dataclasses.asdict(domain)
    if isinstance(domain, Choice):
        values["values"] = list(domain.values)
    return {"kind": kind, **values}


def _domain_from_json(data: dict[str, Any]) -> Domain:
    data = dict(data)
    kind = data.pop("kind")
    if kind == "choice":
        return Choice(tuple(data["values"]))
    return FloatRange(**data) if kind == "range" else IntRange(**data)


def _bad(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"search_space.{name}: {message}")


def _check_value(p: Param, value: Any, fixed: Submission, defaults: dict[str, Any]) -> Any:
    """``value`` as a trial would take it: checked, and normalized ("Adam" -> "adam"), by
    the jobs' validator, with the sweep's fixed parameters beside it."""
    try:
        params = validate({**fixed.params, p.name: p.coerce(value)}, defaults)
    except InvalidArgument as err:
        raise _bad(p.name, str(err)) from None
    return getattr(params, p.name)


def _kinds(kind: type) -> str:
    return " and ".join(name for name in SEARCHABLE if BY_NAME[name].kind is kind)


def _check_domain(p: Param, domain: Domain, fixed: Submission, defaults: dict[str, Any]) -> Domain:
    name = p.name
    if isinstance(domain, Choice):
        if not domain.values:
            raise _bad(name, "a choice needs at least one value")
        values = tuple(_check_value(p, v, fixed, defaults) for v in domain.values)
        if len(set(values)) != len(values):
            raise _bad(name, f"choice values repeat: {list(values)}")
        return Choice(values)
    if isinstance(domain, FloatRange):
        if p.kind is not float:
            raise _bad(name, f"a continuous range is only for {_kinds(float)}; use int_range")
        low = _check_value(p, domain.low, fixed, defaults)
        high = _check_value(p, domain.high, fixed, defaults)
        if not low < high:
            raise _bad(name, f"range low must be below high, got {low:g} and {high:g}")
        return FloatRange(low, high, domain.log)
    if p.kind is not int:
        raise _bad(name, f"an integer range is only for {_kinds(int)}")
    low = _check_value(p, domain.low, fixed, defaults)
    high = _check_value(p, domain.high, fixed, defaults)
    step = domain.step or 1
    if step < 1:
        raise _bad(name, f"int_range step must be at least 1, got {step}")
    if not low <= high:
        raise _bad(name, f"int_range low must be at most high, got {low} and {high}")
    if domain.log and step != 1:
        raise _bad(name, "a log-scale int_range takes no step")
    if (high - low) % step:
        raise _bad(name, f"int_range high - low must be a multiple of step {step}")
    return IntRange(low, high, step, domain.log)


def validate_sweep(sub: SweepSubmission) -> SweepSpec:
    """Resolve defaults and check every field; InvalidArgument names the first bad one.

    A sweep given no seed draws one (recorded in its spec, so passing it again repeats the
    sweep): with a fixed default, every such sweep would replay the same trials. A job keeps
    its fixed default seed, since repeatable training is what a job's seed is for.
    """
    # A sweep's own defaults: a seed drawn within the definition's bounds, an experiment.
    defaults = {
        "seed": secrets.randbelow(int(BY_NAME["seed"].high) + 1),  # type: ignore[arg-type]
        "experiment_name": DEFAULT_SWEEP_EXPERIMENT,
    }
    params = sub.fixed.validate(defaults)
    if not sub.space:
        raise InvalidArgument("search_space must name at least one of " + ", ".join(SEARCHABLE))
    space: dict[str, Domain] = {}
    for name, domain in sub.space.items():
        if name not in SEARCHABLE:
            raise _bad(name, "not a searchable hyperparameter; one of " + ", ".join(SEARCHABLE))
        if sub.fixed.params.get(name) not in (None, ""):
            raise _bad(name, f"also given as the fixed {name}; give one or the other")
        space[name] = _check_domain(BY_NAME[name], domain, sub.fixed, defaults)

    objective = sub.objective_metric.strip() or DEFAULT_OBJECTIVE
    if objective not in OBJECTIVES:
        raise InvalidArgument(
            f"objective_metric must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
        )
    direction = sub.direction or (
        search.MAXIMIZE if objective.endswith("accuracy") else search.MINIMIZE
    )
    strategy = sub.strategy.strip().lower() or search.TPE
    if strategy not in search.STRATEGIES:
        raise InvalidArgument(
            f"strategy must be one of {', '.join(search.STRATEGIES)}, got {strategy!r}"
        )
    if not 0 <= sub.max_trials <= MAX_TRIALS:
        raise InvalidArgument(f"max_trials must be 1 to {MAX_TRIALS}, got {sub.max_trials}")
    max_trials = sub.max_trials or DEFAULT_MAX_TRIALS
    if strategy == search.GRID:
        for name, domain in space.items():
            if isinstance(domain, FloatRange) or (isinstance(domain, IntRange) and domain.log):
                raise _bad(name, "grid search needs a choice list or a linear int_range")
        size = search.grid_size(space)
        if size > MAX_TRIALS:
            raise InvalidArgument(f"search_space: the grid has {size} points, above {MAX_TRIALS}")
        max_trials = min(sub.max_trials or size, size)
    if not 0 <= sub.parallelism <= MAX_PARALLELISM:
        raise InvalidArgument(f"parallelism must be 1 to {MAX_PARALLELISM}, got {sub.parallelism}")
    parallelism = sub.parallelism or DEFAULT_PARALLELISM
    pruner = sub.pruner
    if pruner is not None:
        if not 1 <= pruner.startup_trials <= 100:
            raise InvalidArgument(
                f"early_stopping.startup_trials must be 1 to 100, got {pruner.startup_trials}"
            )
        if not 0 <= pruner.warmup_epochs <= 99:
            raise InvalidArgument(
                f"early_stopping.warmup_epochs must be 0 to 99, got {pruner.warmup_epochs}"
            )
        if not 2 <= pruner.reduction_factor <= 10:
            raise InvalidArgument(
                f"early_stopping.reduction_factor must be 2 to 10, got {pruner.reduction_factor}"
            )
    return SweepSpec(
        base=params,
        space=space,
        objective_metric=objective,
        direction=direction,
        strategy=strategy,
        max_trials=max_trials,
        parallelism=parallelism,
        pruner=pruner,
    )
