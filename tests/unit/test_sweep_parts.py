"""Sweep logic that needs no servers: space validation, grid order, the CLI's parsing and table."""

from __future__ import annotations

import io

import pytest
from google.protobuf import struct_pb2

from mlmesh.training.v1 import sweep_pb2 as spb
from mlmesh_client.cli import SweepTable, UsageError, parse_space
from services.common.errors import InvalidArgument
from services.training.ml import search
from services.training.ml.search import Choice, FloatRange, IntRange, PrunerSpec
from services.training.params import PARAM_NAMES, Submission
from services.training.sweeps.spec import SweepSpec, SweepSubmission, validate_sweep


def sub(**fields) -> SweepSubmission:
    """A sweep of learning_rate; ``fields`` are the sweep's own or fixed parameters."""
    fixed = {k: fields.pop(k) for k in list(fields) if k in PARAM_NAMES}
    space = fields.pop("space", {"learning_rate": FloatRange(1e-4, 1e-2, True)})
    return SweepSubmission(space, Submission(fixed), **fields)


def test_defaults_and_round_trip() -> None:
    spec = validate_sweep(
        sub(space={"optimizer": Choice(("Adam", "sgd")), "batch_size": IntRange(32, 128, 32)})
    )
    assert spec.space["optimizer"] == Choice(("adam", "sgd"))  # normalized like a job's
    assert (spec.strategy, spec.direction, spec.objective_metric) == (
        "tpe",
        "maximize",
        "val_accuracy",
    )
    assert (spec.max_trials, spec.parallelism, spec.base.experiment_name) == (10, 2, "mnist-sweeps")
    assert SweepSpec.from_json(spec.to_json()) == spec
    assert validate_sweep(sub(objective_metric="val_loss")).direction == "minimize"
    assert spec.trial_params({"optimizer": "sgd", "batch_size": 64}).batch_size == 64


def test_grid_budget_is_the_grid() -> None:
    space = {"optimizer": Choice(("adam", "sgd")), "epochs": IntRange(1, 3)}
    assert validate_sweep(sub(space=space, strategy="grid")).max_trials == 6
    assert validate_sweep(sub(space=space, strategy="grid", max_trials=4)).max_trials == 4
    assert len(search.grid_points(space)) == 6


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"space": {"learning_rate": FloatRange(0.1, 0.01)}}, "search_space.learning_rate"),
        ({"space": {"learning_rate": FloatRange(0.0, 0.01, True)}}, "search_space.learning_rate"),
        ({"space": {"batch_size": IntRange(0, 64)}}, "search_space.batch_size"),
        ({"space": {"batch_size": IntRange(32, 100, 32)}}, "search_space.batch_size"),
        ({"space": {"epochs": Choice((1.5,))}}, "search_space.epochs"),
        ({"space": {"optimizer": Choice((1.0,))}}, "search_space.optimizer"),
        ({"space": {"optimizer": Choice(())}}, "search_space.optimizer"),
        ({"space": {"optimizer": Choice(("adam", "adam"))}}, "search_space.optimizer"),
        ({"space": {"seed": Choice((1.0,))}}, "search_space.seed"),
        ({"space": {}}, "search_space"),
        ({"learning_rate": 0.01}, "search_space.learning_rate"),
        ({"strategy": "grid"}, "search_space.learning_rate"),
        ({"max_trials": 501}, "max_trials"),
        ({"parallelism": -1}, "parallelism"),
        ({"objective_metric": "test_accuracy"}, "objective_metric"),
        ({"pruner": PrunerSpec(reduction_factor=1)}, "early_stopping.reduction_factor"),
    ],
)
def test_invalid_sweeps_name_the_problem(fields: dict, named: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_sweep(sub(**fields))
    assert named in str(err.value)


def test_storage_url_uses_psycopg2_and_its_own_schema() -> None:
    url = search.storage_url("postgresql://postgres@127.0.0.1:5432/mlmesh")
    assert url.startswith("postgresql+psycopg2://postgres@127.0.0.1:5432/mlmesh?")
    assert url.endswith("options=-csearch_path%3Doptuna")


def test_parse_space() -> None:
    assert parse_space("learning_rate=log:1e-4:1e-2") == (
        "learning_rate",
        {"range": {"low": 1e-4, "high": 1e-2, "scale": "SCALE_LOG"}},
    )
    assert parse_space("batch_size=int:32:256:32")[1] == {
        "int_range": {"low": 32, "high": 256, "step": 32}
    }
    assert parse_space("optimizer=adam,sgd")[1] == {"choice": {"values": ["adam", "sgd"]}}
    assert parse_space("epochs=1,2")[1] == {"choice": {"values": [1.0, 2.0]}}
    for bad in ("learning_rate", "x=log:1", "x=int:a:b", "=1,2"):
        with pytest.raises(UsageError):
            parse_space(bad)


def test_sweep_table_follows_the_events() -> None:
    out = io.StringIO()
    table = SweepTable(out, live=False)
    params = {"learning_rate": struct_pb2.Value(number_value=0.001)}
    events = [
        spb.WatchSweepResponse(sweep_id="s", queued=spb.SweepQueued()),
        spb.WatchSweepResponse(trial_started=spb.TrialStarted(trial_number=0, params=params)),
        spb.WatchSweepResponse(
            trial_epoch=spb.TrialEpoch(trial_number=0, epoch=1, total_epochs=2, value=0.9)
        ),
        spb.WatchSweepResponse(
            trial_ended=spb.TrialEnded(
                trial_number=0, state=spb.TRIAL_STATE_COMPLETE, value=0.95, epochs_completed=2
            )
        ),
        spb.WatchSweepResponse(new_best=spb.NewBest(trial_number=0, value=0.95)),
        spb.WatchSweepResponse(
            succeeded=spb.SweepSucceeded(
                best_trial=0,
                best_value=0.95,
                model_name="m",
                model_version=3,
                metrics={"test_accuracy": 0.94},
            )
        ),
    ]
    for event in events:
        table(event)
    lines = table.render()
    assert "complete" in lines[1] and "0.9500" in lines[1] and "learning_rate=0.001" in lines[1]
    assert lines[1].startswith("*")  # the best
    assert "registered m v3" in lines[-1]
    assert "registered m v3" in out.getvalue()


def test_a_sweep_without_a_seed_draws_one_and_a_given_seed_is_kept() -> None:
    drawn = {validate_sweep(sub()).base.seed for _ in range(5)}
    assert len(drawn) == 5  # not a fixed default: each sweep searches afresh
    assert all(0 <= seed < 2**32 for seed in drawn)
    spec = validate_sweep(sub(seed=1234))
    assert spec.base.seed == 1234
    assert SweepSpec.from_json(spec.to_json()).base.seed == 1234  # recorded with the sweep


def test_a_sweep_registers_under_its_datasets_model_unless_named() -> None:
    assert validate_sweep(sub()).base.model_name == "mnist-classifier"
    assert validate_sweep(sub(dataset="fashion_mnist")).base.model_name == (
        "fashion-mnist-classifier"
    )
    named = validate_sweep(sub(dataset="fashion_mnist", model_name="mine"))
    assert named.base.model_name == "mine"


def test_a_trial_that_trained_its_last_epoch_is_never_pruned(tmp_path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = search.study_name("unit")
    study = search.load_study(url, name, search.MAXIMIZE)
    good = study.ask()
    good.report(0.9, 1)
    study.tell(good, 0.9)
    poor = study.ask()
    spec = search.TrialSpec(
        sweep_id="unit",
        number=poor.number,
        storage_url=url,
        study_name=name,
        direction=search.MAXIMIZE,
        objective_metric="val_accuracy",
        pruner=PrunerSpec(startup_trials=1),
        parent_run_id="",
    )
    reporter = search.TrialReporter(spec)
    # The same poor objective: pruned before its last epoch, complete after it.
    assert reporter.report(1, {"val_accuracy": 0.1}, last=False) is True
    assert reporter.report(2, {"val_accuracy": 0.1}, last=True) is False
    frozen = study._storage.get_trial(poor._trial_id)
    assert frozen.state == optuna.trial.TrialState.RUNNING
    assert frozen.intermediate_values == {1: 0.1, 2: 0.1}
