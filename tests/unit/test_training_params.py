"""The one definition of training parameters and events, and what is derived from it: the
validator (jobs and sweeps alike), the contract's fields, the event log, the CLI's options."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from mlmesh.training.v1 import sweep_pb2 as spb
from mlmesh.training.v1 import training_pb2 as pb
from mlmesh_client.cli import SHORT_FLAGS, add_field_options, field_values
from services.common.errors import InvalidArgument
from services.training import convert, events
from services.training.eventlog import EventRecord
from services.training.jobs import Job
from services.training.ml.search import Choice
from services.training.params import (
    PARAM_NAMES,
    PARAMS,
    SEARCHABLE,
    InvalidParameter,
    JobParams,
    Param,
    Submission,
    validate,
)
from services.training.sweeps.spec import SweepSubmission, validate_sweep

# What a parameter's kind may be in the contract, and the largest integer each field holds.
FIELD_KINDS = {
    int: {FieldDescriptor.CPPTYPE_INT32: 2**31 - 1, FieldDescriptor.CPPTYPE_INT64: 2**63 - 1},
    float: {FieldDescriptor.CPPTYPE_DOUBLE: None},
    str: {FieldDescriptor.CPPTYPE_STRING: None},
    bool: {FieldDescriptor.CPPTYPE_BOOL: None},
}


def out_of_bounds(p: Param) -> list[Any]:
    """Values of the right type that the definition refuses for ``p``."""
    bad: list[Any] = []
    if p.choices:
        bad.append("no-such-" + p.name)
    if p.pattern is not None:
        bad.append("!" + p.name)
    if p.low is not None:
        bad.append(p.low if p.above_low else p.kind(p.low - 1))
    if p.high is not None:
        bad.append(p.kind(p.high + 1) if p.kind is int else p.high * 1.5)
    return bad


BAD_VALUES = [(p.name, value) for p in PARAMS for value in out_of_bounds(p)]


# -- the definition and the contract ------------------------------------------------------------


@pytest.mark.parametrize(
    "message", [pb.SubmitTrainingJobRequest, spb.SubmitSweepRequest, spb.Sweep]
)
def test_the_contract_has_every_parameter_in_a_field_that_holds_it(message: Any) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for p in PARAMS:
        assert p.name in fields, f"{message.DESCRIPTOR.name} has no field {p.name}"
        field = fields[p.name]
        assert field.cpp_type in FIELD_KINDS[p.kind], (p.name, field.cpp_type)
        largest = FIELD_KINDS[p.kind][field.cpp_type]
        assert largest is None or p.high is None or p.high <= largest, p.name


def test_requests_take_presence_where_a_zero_is_not_the_default() -> None:
    # A field without presence cannot say "0, not the default": its zero must be the
    # default, or (a string) never a valid value.
    for message in (pb.SubmitTrainingJobRequest, spb.SubmitSweepRequest):
        for p in PARAMS:
            if message.DESCRIPTOR.fields_by_name[p.name].has_presence:
                continue
            if p.kind is str:
                with pytest.raises(InvalidParameter):
                    p.check("")
            else:
                assert p.default == p.kind(), (message.DESCRIPTOR.name, p.name)


def test_every_parameter_has_a_doc_and_a_default() -> None:
    for p in PARAMS:
        assert p.doc and "\n" not in p.doc, p.name
        assert p.default is not None or p.default_from is not None, p.name


# -- the validator ----------------------------------------------------------------------------


def test_nothing_given_means_every_default() -> None:
    params = validate({})
    for p in PARAMS:
        expected = p.default_from(dataclasses.asdict(params)) if p.default_from else p.default
        assert getattr(params, p.name) == expected, p.name
    assert params.model_name == "mnist-classifier"


def test_values_are_normalized_and_blanks_are_defaults() -> None:
    params = validate({"optimizer": " AdamW ", "epochs": 2.0, "experiment_name": "  "})
    assert (params.optimizer, params.epochs, params.experiment_name) == ("adamw", 2, "mnist")
    assert isinstance(params.epochs, int)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_value_out_of_bounds_is_refused_naming_the_parameter(name: str, value: Any) -> None:
    with pytest.raises(InvalidParameter, match=rf"^{name} must be"):
        validate({name: value})
    with pytest.raises(InvalidParameter, match=rf"^{name} must be"):
        dataclasses.replace(validate({}), **{name: value})  # construction checks too


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("epochs", "3", "must be a number"),
        ("epochs", 1.5, "must be an integer"),
        ("epochs", True, "must be a number"),
        ("optimizer", 1.0, "must be a string"),
        ("learning_rate", float("nan"), "above 0 and at most 10"),
        ("no_such_parameter", 1, "is not a training parameter"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(name: str, value: Any, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words) as err:
        validate({name: value})
    assert str(err.value).startswith(name)


def test_a_long_idempotency_key_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        Submission({}, "k" * 129).validate()


def test_a_stored_record_gets_the_default_of_a_parameter_added_since() -> None:
    stored = validate({"epochs": 5}).to_record()
    del stored["train_subset"]  # as a record written before the parameter existed
    stored["retired_parameter"] = 1
    params = JobParams.from_record(stored)
    assert params.epochs == 5
    assert params.train_subset == 0


def test_hyperparameters_are_the_parameters_a_model_is_trained_with() -> None:
    logged = validate({}).hyperparameters()
    assert set(logged) == {p.name for p in PARAMS if p.hyperparameter}
    assert {"experiment_name", "model_name"}.isdisjoint(logged)


# -- sweeps: the same validator ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, v in BAD_VALUES if n in SEARCHABLE])
def test_a_sweep_refuses_what_a_job_refuses(name: str, value: Any) -> None:
    with pytest.raises(InvalidArgument) as job:
        validate({name: value})
    with pytest.raises(InvalidArgument) as searched:
        validate_sweep(SweepSubmission({name: Choice((value,))}))
    assert str(searched.value) == f"search_space.{name}: {job.value}"
    space = {n: Choice((validate({}).hyperparameters()[n],)) for n in SEARCHABLE if n != name}
    with pytest.raises(InvalidArgument) as fixed:
        validate_sweep(SweepSubmission(space, Submission({name: value})))
    assert str(fixed.value) == str(job.value)


def test_only_searchable_parameters_may_be_searched() -> None:
    for p in PARAMS:
        if p.searchable:
            continue
        with pytest.raises(InvalidArgument, match=f"search_space.{p.name}: not a searchable"):
            validate_sweep(SweepSubmission({p.name: Choice((p.default,))}))


# -- events -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kinds", "response"),
    [
        (events.JOB_EVENTS, pb.WatchTrainingJobResponse),
        (events.SWEEP_EVENTS, spb.WatchSweepResponse),
    ],
)
def test_every_event_is_a_field_of_its_watch_response(kinds: tuple, response: Any) -> None:
    oneof = response.DESCRIPTOR.oneofs_by_name["event"]
    assert sorted(k.oneof for k in kinds) == sorted(f.name for f in oneof.fields)
    for kind in kinds:
        message = response.DESCRIPTOR.fields_by_name[kind.oneof].message_type
        assert {f.name for f in dataclasses.fields(kind)} == set(message.fields_by_name), kind
    assert len({k.kind for k in kinds}) == len(kinds)  # one tag per event in the log


JOB_SAMPLES = [
    events.Queued(),
    events.JobStarted(attempt=2, mlflow_run_id="run", device="cpu"),
    events.BatchProgress(epoch=1, batch=3, total_batches=16, train_loss=0.5),
    events.EpochCompleted(epoch=1, total_epochs=2, metrics={"val_accuracy": 0.9}),
    events.JobSucceeded(mlflow_run_id="run", model_name="m", model_version=3, metrics={"a": 1.0}),
    events.Failed(error="boom"),
    events.Cancelled(cancelled_by="alice"),
    events.JobPruned(epoch=1, value=0.25),
]
SWEEP_SAMPLES = [
    events.Queued(),
    events.TrialStarted(0, "job", {"learning_rate": 0.01, "optimizer": "sgd"}, 1, "run"),
    events.TrialEpoch(trial_number=0, epoch=1, total_epochs=2, value=0.8),
    events.TrialEnded(trial_number=0, state="complete", epochs_completed=2, value=0.9),
    events.TrialEnded(trial_number=1, state="failed", epochs_completed=0, error="boom"),
    events.NewBest(trial_number=0, value=0.9, params={"batch_size": 64}),
    events.SweepSucceeded(0, 0.9, {"optimizer": "sgd"}, "m", 4, {"test_accuracy": 0.95}),
    events.Failed(error="no trial completed"),
    events.Cancelled(cancelled_by="bob"),
]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("samples", "parse", "to_pb"),
    [
        (JOB_SAMPLES, events.parse_job_event, convert.event),
        (SWEEP_SAMPLES, events.parse_sweep_event, convert.sweep_event),
    ],
)
def test_events_round_trip_the_log_and_become_their_messages(samples, parse, to_pb) -> None:
    for event in samples:
        stored = event.to_record()
        assert stored["type"] == event.kind
        assert parse(stored) == event
        message = to_pb(EventRecord("owner", 7, NOW, event))
        assert message.sequence == 7
        assert message.WhichOneof("event") == event.oneof
        as_json = json_format.MessageToDict(
            getattr(message, event.oneof), preserving_proto_field_name=True
        )
        for name, value in dataclasses.asdict(event).items():
            if name == "state":
                assert as_json[name] == "TRIAL_STATE_" + value.upper()
            elif value not in (None, "", 0, {}):
                assert as_json[name] == value, (event, name)


def test_the_log_reads_what_older_writers_wrote() -> None:
    # trial_ended omitted a value and an error it did not have; extra keys are ignored.
    old = {"type": "trial_ended", "trial_number": 2, "state": "pruned", "epochs_completed": 1}
    assert events.parse_sweep_event(old) == events.TrialEnded(2, "pruned", 1)
    assert events.parse_job_event({"type": "cancelled"}) == events.Cancelled("")
    with pytest.raises(ValueError, match="unknown event type"):
        events.parse_job_event({"type": "trial_ended"})  # a sweep's, not a job's


def test_terminal_events_end_their_owner_in_a_state() -> None:
    ends = {type(e).__name__: e.ends_in for e in JOB_SAMPLES + SWEEP_SAMPLES}
    assert ends["JobSucceeded"] == ends["SweepSucceeded"] == "succeeded"
    assert (ends["Failed"], ends["Cancelled"], ends["JobPruned"]) == (
        "failed",
        "cancelled",
        "pruned",
    )
    assert ends["BatchProgress"] is None and ends["TrialEnded"] is None


# -- protobuf conversions, by field name ---------------------------------------------------------


def test_a_request_gives_what_it_sets() -> None:
    empty = convert.given_params(pb.SubmitTrainingJobRequest())
    assert empty == {}
    request = pb.SubmitTrainingJobRequest(epochs=0, dataset="fashion_mnist", train_subset=9)
    assert convert.given_params(request) == {"epochs": 0, "dataset": "fashion_mnist",
                                             "train_subset": 9}  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"^epochs must be at least 1"):
        convert.submission(request).validate()  # an explicit 0 is not "the default"


def test_a_job_reports_its_parameters() -> None:
    params = validate({"architecture": "mlp", "learning_rate": 0.5, "seed": 2**32 - 1})
    job = Job("j", "queued", params, 0, "", 0, 0.0, {}, "", "alice", "", 0, "", False, "",
              NOW, None, None)  # fmt: skip
    out = convert.job(job)
    assert (out.architecture, out.model_name) == ("mlp", "mnist-classifier")
    assert (out.hyperparameters.learning_rate, out.hyperparameters.seed) == (0.5, 2**32 - 1)
    assert out.progress.total_epochs == params.epochs


# -- the CLI's options are the requests' fields --------------------------------------------------


@pytest.mark.parametrize("message", [pb.SubmitTrainingJobRequest, spb.SubmitSweepRequest])
def test_every_scalar_field_of_a_request_is_an_option(message: Any) -> None:
    parser = argparse.ArgumentParser()
    add_field_options(parser, message)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None:
            assert "--" + field.name.replace("_", "-") in flags, field.name
    assert {f for f in SHORT_FLAGS.values() if f in flags} <= flags


def test_options_become_the_request() -> None:
    parser = argparse.ArgumentParser()
    add_field_options(parser, spb.SubmitSweepRequest)
    line = "--lr 0.01 --trials 4 --strategy GRID --direction minimize --experiment e --seed 5"
    args = parser.parse_args(line.split())
    fields = field_values(args, spb.SubmitSweepRequest)
    assert fields == {
        "learning_rate": 0.01,
        "max_trials": 4,
        "strategy": "SEARCH_STRATEGY_GRID",
        "direction": "OBJECTIVE_DIRECTION_MINIMIZE",
        "experiment_name": "e",
        "seed": 5,
    }
    request = json_format.ParseDict(fields, spb.SubmitSweepRequest())
    assert request.strategy == spb.SEARCH_STRATEGY_GRID
    assert convert.given_params(request) == {"learning_rate": 0.01, "seed": 5,
                                             "experiment_name": "e"}  # fmt: skip
    assert set(convert.given_params(request)) <= set(PARAM_NAMES)
