"""Hyperparameter search on Optuna: spaces, samplers, pruners and the study storage.

Torch-free: the Training service and the workers drive a sweep's study (ask for trials,
tell their outcomes) and a trial's training process reports each epoch's objective and asks
whether to stop (``TrialReporter``). Studies live in mlmesh's PostgreSQL, in a schema of
their own (``optuna``, created by migration 3), so every process sees the same trials.
Every call here blocks (SQLAlchemy): async code runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

log = logging.getLogger(__name__)

GRID, RANDOM, TPE = "grid", "random", "tpe"
STRATEGIES = (GRID, RANDOM, TPE)
MAXIMIZE, MINIMIZE = "maximize", "minimize"
MEDIAN, SUCCESSIVE_HALVING = "median", "successive_halving"
STORAGE_SCHEMA = "optuna"

Value = float | int | str


@dataclass(frozen=True)
class Choice:
    """Pick one of ``values``."""

    values: tuple[Value, ...]


@dataclass(frozen=True)
class FloatRange:
    """A continuous range; ``log`` samples uniformly in log space."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntRange:
    """Integers from ``low`` to ``high`` (inclusive) every ``step``."""

    low: int
    high: int
    step: int = 1
    log: bool = False


Domain = Choice | FloatRange | IntRange


@dataclass(frozen=True)
class PrunerSpec:
    """Early stopping between epochs."""

    kind: str = MEDIAN  # MEDIAN or SUCCESSIVE_HALVING
    startup_trials: int = 1  # median: finished trials needed before anything is pruned
    warmup_epochs: int = 0  # epochs every trial trains before it may be pruned
    reduction_factor: int = 3  # successive halving: keep the best 1/this per rung


def distributions(space: dict[str, Domain]) -> dict[str, BaseDistribution]:
    """Optuna distributions of a search space."""
    out: dict[str, BaseDistribution] = {}
    for name, domain in space.items():
        if isinstance(domain, Choice):
            out[name] = CategoricalDistribution(list(domain.values))
        elif isinstance(domain, FloatRange):
            out[name] = FloatDistribution(domain.low, domain.high, log=domain.log)
        else:
            step = 1 if domain.log else domain.step
            out[name] = IntDistribution(domain.low, domain.high, log=domain.log, step=step)
    return out


def grid(space: dict[str, Domain]) -> dict[str, list[Value]]:
    """Every candidate of each parameter, for grid search (choices and integer ranges)."""
    out: dict[str, list[Value]] = {}
    for name, domain in space.items():
        if isinstance(domain, Choice):
            out[name] = list(domain.values)
        elif isinstance(domain, IntRange) and not domain.log:
            out[name] = list(range(domain.low, domain.high + 1, domain.step))
        else:
            raise ValueError(f"{name}: grid search needs a choice list or a linear integer range")
    return out


def grid_size(space: dict[str, Domain]) -> int:
    size = 1
    for values in grid(space).values():
        size *= len(values)
    return size


def grid_points(space: dict[str, Domain]) -> list[dict[str, Value]]:
    """Every combination, in Optuna's GridSampler order (parameters sorted by name)."""
    candidates = grid(space)
    names = sorted(candidates)
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(*(candidates[n] for n in names))
    ]


def startup_trials(max_trials: int) -> int:
    """Random trials TPE takes before it models: a quarter of the budget, 2 to 10."""
    return min(10, max(2, max_trials // 4))


def make_sampler(
    strategy: str, space: dict[str, Domain], seed: int, asked: int, max_trials: int
) -> optuna.samplers.BaseSampler:
    """The sampler for the next ask. Samplers keep their random state in memory only, so each
    ask builds one seeded by how many trials were asked before: repeatable, never repeating.
    The grid sampler is the exception: it shuffles the grid by its seed and reads what was
    visited from the storage, so its seed must stay the same for the whole sweep."""
    if strategy == GRID:
        return optuna.samplers.GridSampler(grid(space), seed=seed)
    seed = (seed + 7919 * asked) % 2**32
    if strategy == RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup_trials(max_trials), constant_liar=True
    )


def make_pruner(spec: PrunerSpec | None) -> optuna.pruners.BasePruner:
    if spec is None:
        return optuna.pruners.NopPruner()
    if spec.kind == SUCCESSIVE_HALVING:
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, spec.warmup_epochs), reduction_factor=spec.reduction_factor
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_epochs
    )


def storage_url(database_url: str) -> str:
    """SQLAlchemy URL of the Optuna storage: mlmesh's database, schema ``optuna``, psycopg2."""
    scheme, sep, rest = database_url.partition("://")
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg2"
    joiner = "&" if "?" in rest else "?"
    return f"{scheme}{sep}{rest}{joiner}options=-csearch_path%3D{STORAGE_SCHEMA}"


_storages: dict[str, optuna.storages.RDBStorage] = {}
_storages_lock = threading.Lock()


def storage(url: str) -> optuna.storages.RDBStorage:
    """One RDBStorage (a connection pool) per URL and process."""
    with _storages_lock:
        if url not in _storages:
            for attempt in range(3):
                try:
                    _storages[url] = optuna.storages.RDBStorage(
                        url, engine_kwargs={"pool_pre_ping": True, "pool_size": 2}
                    )
                    break
                except Exception:  # two processes creating Optuna's tables at once
                    if attempt == 2:
                        raise
                    log.warning("creating the Optuna storage failed; retrying", exc_info=True)
        return _storages[url]


def study_name(sweep_id: str) -> str:
    return f"mlmesh-sweep-{sweep_id}"


def load_study(
    url: str,
    name: str,
    direction: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """The study ``name``, created on first use."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=storage(url),
        study_name=name,
        direction=direction,
        sampler=sampler or optuna.samplers.RandomSampler(),
        pruner=pruner,
        load_if_exists=True,
    )


@dataclass(frozen=True)
class TrialSpec:
    """What a trial's training process needs to report to its sweep (picklable)."""

    sweep_id: str
    number: int
    storage_url: str
    study_name: str
    direction: str
    objective_metric: str
    pruner: PrunerSpec | None
    parent_run_id: str


class TrialReporter:
    """Reports a trial's objective per epoch to its study and says when to prune."""

    def __init__(self, spec: TrialSpec) -> None:
        self.spec = spec
        study = load_study(
            spec.storage_url, spec.study_name, spec.direction, pruner=make_pruner(spec.pruner)
        )
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, spec.number
        )
        self._trial = optuna.trial.Trial(study, trial_id)

    def report(self, epoch: int, metrics: dict[str, float], *, last: bool) -> bool:
        """Record the epoch's objective; True when the trial should stop here.

        Never after the ``last`` epoch: a trial that trained every epoch is complete, however
        its objective compares (the pruner would say "prune" to a poor one, and a one-epoch
        trial was then labelled pruned after finishing).
        """
        value = metrics[self.spec.objective_metric]
        if self._trial.study._storage.get_trial(self._trial._trial_id).state != (
            TrialState.RUNNING
        ):
            return False  # told already (a retried attempt after its sweep moved on)
        self._trial.report(value, epoch)
        return self.spec.pruner is not None and not last and bool(self._trial.should_prune())
