"""Hyperparameter sweeps end to end: the gateway, the Training service, real ARQ workers,
Optuna's study in PostgreSQL, MLflow parent and child runs, and the registry.

Trials train the MLP on a small MNIST subset for one or two epochs, so a sweep takes a
minute or less on two cores.
"""

from __future__ import annotations

import itertools
import time

import grpc
import httpx
import mlflow
import pytest

from mlmesh.training.v1 import sweep_pb2 as spb
from mlmesh.training.v1 import training_pb2 as pb
from mlmesh.training.v1 import training_pb2_grpc
from services.launcher.mesh import Mesh
from tests.conftest import metric_sample

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMALL = {"train_subset": 2000, "architecture": "mlp", "experiment_name": "it-sweeps"}
ENDED = {spb.SWEEP_STATE_SUCCEEDED, spb.SWEEP_STATE_FAILED, spb.SWEEP_STATE_CANCELLED}
JOB_ENDED = {
    pb.JOB_STATE_SUCCEEDED,
    pb.JOB_STATE_FAILED,
    pb.JOB_STATE_CANCELLED,
    pb.JOB_STATE_PRUNED,
}


@pytest.fixture(scope="module")
def training(gateway_channel: grpc.Channel) -> training_pb2_grpc.TrainingServiceStub:
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def auth(keys: dict[str, str]) -> list[tuple[str, str]]:
    return [("x-api-key", keys["alice"])]


def choice(*values: float | str) -> spb.ParameterSpace:
    from google.protobuf import struct_pb2

    def value(v: float | str) -> struct_pb2.Value:
        if isinstance(v, str):
            return struct_pb2.Value(string_value=v)
        return struct_pb2.Value(number_value=v)

    return spb.ParameterSpace(choice=spb.Choice(values=[value(v) for v in values]))


def wait_for(sweep_id: str, training, auth, timeout_s: float = 300) -> spb.Sweep:
    deadline = time.monotonic() + timeout_s
    while True:
        sweep = training.GetSweep(spb.GetSweepRequest(sweep_id=sweep_id), metadata=auth).sweep
        if sweep.state in ENDED:
            return sweep
        assert time.monotonic() < deadline, f"sweep stuck: {sweep}"
        time.sleep(0.5)


def test_sweep_runs_trials_in_parallel_and_registers_the_best(
    mesh: Mesh, training, auth, rest: httpx.Client, keys: dict[str, str]
) -> None:
    request = spb.SubmitSweepRequest(
        search_space={
            "learning_rate": spb.ParameterSpace(
                range=spb.FloatRange(low=3e-4, high=3e-2, scale=spb.SCALE_LOG)
            ),
            "optimizer": choice("adam", "sgd"),
        },
        epochs=1,
        max_trials=4,
        parallelism=2,
        strategy=spb.SEARCH_STRATEGY_RANDOM,
        model_name="it-sweep-model",
        **SMALL,
    )
    sweep = training.SubmitSweep(request, metadata=auth).sweep
    assert sweep.state == spb.SWEEP_STATE_QUEUED and sweep.submitted_by == "alice"
    events = list(
        training.WatchSweep(
            spb.WatchSweepRequest(sweep_id=sweep.sweep_id), metadata=auth, timeout=300
        )
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
    assert kinds.count("trial_started") == 4 and kinds.count("trial_ended") == 4
    assert "trial_epoch" in kinds and "new_best" in kinds
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    started = [e.trial_started for e in events if e.HasField("trial_started")]
    assert all(set(s.params) == {"learning_rate", "optimizer"} for s in started)

    done = wait_for(sweep.sweep_id, training, auth)
    assert done.state == spb.SWEEP_STATE_SUCCEEDED, done.error
    assert [t.number for t in done.trials] == [0, 1, 2, 3]
    assert all(t.state == spb.TRIAL_STATE_COMPLETE for t in done.trials)

    # Each trial is an ordinary training job; two of them trained at the same time.
    jobs = [
        training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=t.job_id), metadata=auth).job
        for t in done.trials
    ]
    assert all(j.sweep_id == done.sweep_id and j.model_version == 0 for j in jobs)
    spans = sorted((j.start_time.ToDatetime(), j.end_time.ToDatetime()) for j in jobs)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans

    # The best is truly the best by the objective, as MLflow's child runs hold it.
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    children = {t.number: client.get_run(t.mlflow_run_id) for t in done.trials}
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == done.mlflow_run_id
        assert run.data.tags["mlmesh.sweep_id"] == done.sweep_id
        assert {"learning_rate", "optimizer"} <= set(run.data.params)
        assert "val_accuracy" in run.data.metrics
    scores = {n: r.data.metrics["val_accuracy"] for n, r in children.items()}
    best = max(scores, key=scores.__getitem__)
    assert done.best_trial == best and done.best_value == pytest.approx(scores[best])
    assert done.model_version >= 1
    version = client.get_model_version("it-sweep-model", str(done.model_version))
    assert version.run_id == done.trials[best].mlflow_run_id
    assert version.tags["mlmesh.sweep_id"] == done.sweep_id
    assert len(client.search_model_versions("name = 'it-sweep-model'")) == 1  # only the best

    parent = client.get_run(done.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert (
        "space.learning_rate" in parent.data.params and "best.learning_rate" in parent.data.params
    )
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(scores[best])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"objective_by_trial.png", "objective_by_parameter.png", "search_space.json"} <= (
        artifacts
    )

    # REST: the sweep and its place in the list.
    resp = rest.get(f"/v1/training/sweeps/{done.sweep_id}", headers={"x-api-key": keys["alice"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["sweep"]["state"] == "SWEEP_STATE_SUCCEEDED"
    assert rest.get(f"/v1/training/sweeps/{done.sweep_id}").status_code == 401
    listed = training.ListSweeps(
        spb.ListSweepsRequest(state=spb.SWEEP_STATE_SUCCEEDED), metadata=auth
    )
    assert done.sweep_id in [s.sweep_id for s in listed.sweeps]


def test_pruning_stops_a_hopeless_trial_early(mesh: Mesh, training, auth) -> None:
    # Grid order (Optuna's, seeded): a sane rate finishes first; the absurd ones come after
    # and are pruned after their first epoch, against the finished trial's median.
    request = spb.SubmitSweepRequest(
        search_space={"learning_rate": choice(0.002, 9.0, 10.0)},
        epochs=2,
        parallelism=1,
        seed=5,
        strategy=spb.SEARCH_STRATEGY_GRID,
        early_stopping=spb.EarlyStopping(pruner=spb.PRUNER_MEDIAN, startup_trials=1),
        model_name="it-sweep-pruned",
        **SMALL,
    )
    sweep = training.SubmitSweep(request, metadata=auth).sweep
    assert sweep.max_trials == 3  # the grid's size
    done = wait_for(sweep.sweep_id, training, auth)
    assert done.state == spb.SWEEP_STATE_SUCCEEDED, done.error
    pruned = [t for t in done.trials if t.state == spb.TRIAL_STATE_PRUNED]
    assert pruned, [(t.params["learning_rate"].number_value, t.state) for t in done.trials]
    for t in pruned:
        assert t.params["learning_rate"].number_value >= 9.0
        assert t.epochs_completed == 1
        job = training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=t.job_id), metadata=auth)
        assert job.job.state == pb.JOB_STATE_PRUNED
    assert done.best_params["learning_rate"].number_value == 0.002
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    history = client.get_metric_history(pruned[0].mlflow_run_id, "val_accuracy")
    assert len(history) == 1  # one epoch of two
    assert client.get_run(pruned[0].mlflow_run_id).data.tags["mlmesh.trial_state"] == "pruned"


def test_cancel_a_sweep_mid_way_stops_every_trial(mesh: Mesh, training, auth) -> None:
    request = spb.SubmitSweepRequest(
        search_space={"learning_rate": choice(0.001, 0.002, 0.003, 0.004, 0.005)},
        epochs=3,
        parallelism=2,
        strategy=spb.SEARCH_STRATEGY_GRID,
        model_name="it-sweep-cancelled",
        **{**SMALL, "train_subset": 20000},
    )
    sweep = training.SubmitSweep(request, metadata=auth).sweep
    for event in training.WatchSweep(
        spb.WatchSweepRequest(sweep_id=sweep.sweep_id), metadata=auth, timeout=300
    ):
        if event.HasField("trial_started"):
            break  # a trial is training now
    training.CancelSweep(spb.CancelSweepRequest(sweep_id=sweep.sweep_id), metadata=auth)
    done = wait_for(sweep.sweep_id, training, auth, timeout_s=90)
    assert done.state == spb.SWEEP_STATE_CANCELLED and done.cancelled_by == "alice"
    assert done.model_version == 0
    assert 1 <= len(done.trials) <= 2  # no trial was asked for after the cancel
    for t in done.trials:
        job = training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=t.job_id), metadata=auth)
        assert job.job.state in JOB_ENDED
        assert t.state == spb.TRIAL_STATE_CANCELLED
    listed = training.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=1000), metadata=auth)
    assert not [
        j
        for j in listed.jobs
        if j.sweep_id == done.sweep_id and j.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    ]
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    assert client.get_run(done.mlflow_run_id).info.status == "KILLED"
    last = list(training.WatchSweep(spb.WatchSweepRequest(sweep_id=sweep.sweep_id), metadata=auth))[
        -1
    ]
    assert last.cancelled.cancelled_by == "alice"


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"learning_rate": {"range": {"low": 0.1, "high": 0.01}}}, "learning_rate"),
        (
            {"learning_rate": {"range": {"low": 0, "high": 0.1, "scale": "SCALE_LOG"}}},
            "learning_rate",
        ),
        ({"learning_rate": {"range": {"low": 0.001, "high": 50}}}, "learning_rate"),
        ({"batch_size": {"int_range": {"low": 0, "high": 64}}}, "batch_size"),
        ({"batch_size": {"range": {"low": 16, "high": 64}}}, "batch_size"),
        ({"optimizer": {"choice": {"values": ["adam", "lbfgs"]}}}, "optimizer"),
        ({"optimizer": {"choice": {"values": []}}}, "optimizer"),
        ({"epochs": {"choice": {"values": [1.5]}}}, "epochs"),
        ({"momentum": {"choice": {"values": [0.9]}}}, "momentum"),
        ({"epochs": {}}, "epochs"),
        ({}, "search_space"),
    ],
)
def test_invalid_search_spaces_are_rejected(
    training, auth, rest: httpx.Client, keys: dict[str, str], space: dict, named: str
) -> None:
    before = len(training.ListSweeps(spb.ListSweepsRequest(), metadata=auth).sweeps)
    resp = rest.post(
        "/v1/training/sweeps", json={"search_space": space}, headers={"x-api-key": keys["alice"]}
    )
    assert resp.status_code == 400, resp.text
    assert named in resp.json()["message"]
    from google.protobuf import json_format

    request = json_format.ParseDict({"search_space": space}, spb.SubmitSweepRequest())
    with pytest.raises(grpc.RpcError) as err:
        training.SubmitSweep(request, metadata=auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()
    assert len(training.ListSweeps(spb.ListSweepsRequest(), metadata=auth).sweeps) == before


def test_grid_search_needs_finite_domains(training, auth) -> None:
    request = spb.SubmitSweepRequest(
        search_space={
            "learning_rate": spb.ParameterSpace(range=spb.FloatRange(low=1e-4, high=1e-2))
        },
        strategy=spb.SEARCH_STRATEGY_GRID,
    )
    with pytest.raises(grpc.RpcError) as err:
        training.SubmitSweep(request, metadata=auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "search_space.learning_rate" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        training.GetSweep(spb.GetSweepRequest(sweep_id="nope"), metadata=auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def submitted_sweeps(mesh: Mesh) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.settings.training_ops_port}/metrics").text
    return metric_sample(text, "training_sweeps_submitted_total", client="alice")


def test_trials_that_train_every_epoch_are_complete_not_pruned(
    mesh: Mesh, training, auth, rest: httpx.Client, keys: dict[str, str]
) -> None:
    # The grid of the pruning test above, one epoch each: the absurd rates score far below the
    # sane one, but they trained their only epoch, so they are complete, not pruned.
    request = spb.SubmitSweepRequest(
        search_space={"learning_rate": choice(0.002, 9.0, 10.0)},
        dataset="fashion_mnist",
        architecture="mlp",
        epochs=1,
        train_subset=300,
        parallelism=1,
        seed=5,
        strategy=spb.SEARCH_STRATEGY_GRID,
        early_stopping=spb.EarlyStopping(pruner=spb.PRUNER_MEDIAN, startup_trials=1),
        experiment_name="it-sweeps-fashion",
    )
    before = submitted_sweeps(mesh)
    sweep = training.SubmitSweep(request, metadata=auth).sweep
    assert submitted_sweeps(mesh) - before == 1
    assert sweep.model_name == "fashion-mnist-classifier"  # its dataset's, none named
    done = wait_for(sweep.sweep_id, training, auth)
    assert done.state == spb.SWEEP_STATE_SUCCEEDED, done.error
    rates = [t.params["learning_rate"].number_value for t in done.trials]
    assert rates[0] == 0.002, rates  # the sane rate first, so the others had a median to fail
    assert [(t.state, t.epochs_completed) for t in done.trials] == [
        (spb.TRIAL_STATE_COMPLETE, 1)
    ] * 3
    for t in done.trials:
        job = training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=t.job_id), metadata=auth)
        assert job.job.state == pb.JOB_STATE_SUCCEEDED
    assert done.best_trial == 0

    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    version = client.get_model_version("fashion-mnist-classifier", str(done.model_version))
    assert version.run_id == done.trials[0].mlflow_run_id
    parent = client.get_run(done.mlflow_run_id)
    assert parent.info.run_name == "sweep-fashion_mnist-grid-3-trials"
    assert parent.data.tags["mlmesh.sweep_id"] == done.sweep_id
    assert parent.data.params["seed"] == "5"
    for t in done.trials:
        run = client.get_run(t.mlflow_run_id)
        lr = t.params["learning_rate"].number_value
        assert run.info.run_name == f"trial-{t.number}-mlp-adam-lr{lr:.2g}-bs128-e1"
        assert run.data.tags["mlmesh.job_id"] == t.job_id
        assert run.data.tags["mlflow.parentRunId"] == done.mlflow_run_id
        assert "mlmesh.trial_state" not in run.data.tags
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # An ended sweep cannot be cancelled, and says so.
    with pytest.raises(grpc.RpcError) as err:
        training.CancelSweep(spb.CancelSweepRequest(sweep_id=done.sweep_id), metadata=auth)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended" in err.value.details() and "succeeded" in err.value.details()
    resp = rest.post(
        f"/v1/training/sweeps/{done.sweep_id}:cancel",
        json={},
        headers={"x-api-key": keys["alice"]},
    )
    assert resp.status_code == 400 and "already ended" in resp.json()["message"], resp.text
    again = training.GetSweep(spb.GetSweepRequest(sweep_id=done.sweep_id), metadata=auth).sweep
    assert again.state == spb.SWEEP_STATE_SUCCEEDED and not again.cancelled_by


def test_a_sweep_without_a_seed_draws_one_and_records_it(mesh: Mesh, training, auth) -> None:
    def submit(**seed: int) -> spb.Sweep:
        request = spb.SubmitSweepRequest(
            search_space={"learning_rate": choice(0.001, 0.002)},
            epochs=1,
            max_trials=1,
            parallelism=1,
            strategy=spb.SEARCH_STRATEGY_RANDOM,
            model_name="it-sweep-seeds",
            **{**SMALL, "train_subset": 200, "experiment_name": "it-sweeps-seeds"},
            **seed,
        )
        return training.SubmitSweep(request, metadata=auth).sweep

    first, second, given = submit(), submit(), submit(seed=1234)
    assert first.seed != second.seed  # the second does not replay the first
    assert given.seed == 1234
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    for submitted in (first, second, given):
        deadline = time.monotonic() + 120
        while True:
            sweep = training.GetSweep(
                spb.GetSweepRequest(sweep_id=submitted.sweep_id), metadata=auth
            ).sweep
            if sweep.mlflow_run_id:
                break
            assert time.monotonic() < deadline, f"no parent run: {sweep}"
            time.sleep(0.5)
        assert sweep.seed == submitted.seed
        assert client.get_run(sweep.mlflow_run_id).data.params["seed"] == str(submitted.seed)
    for submitted in (first, second, given):
        try:
            training.CancelSweep(spb.CancelSweepRequest(sweep_id=submitted.sweep_id), metadata=auth)
        except grpc.RpcError as err:  # it ended already
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        assert wait_for(submitted.sweep_id, training, auth, timeout_s=120).state in ENDED
