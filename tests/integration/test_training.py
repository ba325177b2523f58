"""Training end to end: the gateway, the Training service, real ARQ workers, MLflow, PostgreSQL.

Jobs train the real CNN on a small MNIST subset, so each one takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import mlflow
import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus
from redis import Redis

from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from mlmesh.training.v1 import training_pb2 as pb
from mlmesh.training.v1 import training_pb2_grpc
from services.launcher.mesh import Mesh, child_env
from tests.conftest import metric_sample

SMALL = {"train_subset": 2000, "epochs": 1, "experiment_name": "it-training"}


@pytest.fixture(scope="module")
def training(gateway_channel: grpc.Channel) -> training_pb2_grpc.TrainingServiceStub:
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def auth(keys: dict[str, str]) -> list[tuple[str, str]]:
    return [("x-api-key", keys["alice"])]


def wait_for(
    job_id: str, training, auth, states: set[int], timeout_s: float = 240
) -> pb.TrainingJob:
    deadline = time.monotonic() + timeout_s
    while True:
        job = training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job_id), metadata=auth).job
        if job.state in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {pb.JobState.Name(job.state)}"
        time.sleep(0.5)


def events_of(job_id: str, training, auth) -> list[pb.WatchTrainingJobResponse]:
    stream = training.WatchTrainingJob(
        pb.WatchTrainingJobRequest(job_id=job_id), metadata=auth, timeout=300
    )
    return list(stream)


TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def test_submit_over_rest_seed_route_answers_at_once(
    rest: httpx.Client, keys: dict[str, str], training, auth
) -> None:
    resp = rest.post(
        "/train",
        json={"epochs": 1, "lr": 0.002, "train_subset": 2000, "experiment_name": "it-training"},
        headers={"x-api-key": keys["alice"]},
    )
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["state"] == "JOB_STATE_QUEUED"  # answered before any training started
    assert job["mlflow_run_id"] == "" and job["attempts"] == 0
    assert job["hyperparameters"]["learning_rate"] == 0.002
    assert (job["dataset"], job["architecture"], job["model_name"]) == (
        "mnist",
        "cnn",
        "mnist-classifier",
    )
    assert job["submitted_by"] == "alice"
    status = rest.get(f"/train/status/{job['job_id']}", headers={"x-api-key": keys["alice"]})
    assert status.status_code == 200
    assert status.json()["job_id"] == job["job_id"]
    finished = wait_for(job["job_id"], training, auth, TERMINAL)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
    final = rest.get(f"/train/status/{job['job_id']}", headers={"x-api-key": keys["alice"]}).json()
    assert final["state"] == "JOB_STATE_SUCCEEDED"
    assert final["mlflow_run_id"] and final["model_version"] >= 1


def test_grpc_job_trains_logs_and_registers(
    mesh: Mesh, training, auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = training.SubmitTrainingJob(
        pb.SubmitTrainingJobRequest(model_name="it-train-model", **SMALL), metadata=auth
    ).job
    assert job.state == pb.JOB_STATE_QUEUED
    events = events_of(job.job_id, training, auth)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "succeeded", kinds
    assert "epoch_completed" in kinds and "batch_progress" in kinds
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    done = events[-1].succeeded
    assert done.model_name == "it-train-model" and done.model_version == 1
    assert done.metrics["test_accuracy"] > 0.8

    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    run = client.get_run(done.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert {"train_loss", "val_loss", "val_accuracy", "epoch_seconds", "test_accuracy"} <= set(
        run.data.metrics
    )
    assert run.data.tags["mlmesh.job_id"] == job.job_id
    assert run.data.tags["mlmesh.client"] == "alice"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "training_curves.png",
        "confusion_matrix.png",
        "classification_report.json",
    } <= artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mesh.settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/it-train-model/{done.model_version}")
    probs = np.asarray(model.predict(np.random.default_rng(0).random((3, 784), np.float32)))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)

    # A late watcher gets the whole history, the same events in the same order.
    again = events_of(job.job_id, training, auth)
    assert [e.sequence for e in again] == [e.sequence for e in events]
    final = training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id), metadata=auth).job
    assert (final.mlflow_run_id, final.model_version) == (done.mlflow_run_id, done.model_version)
    assert final.metrics["test_accuracy"] == pytest.approx(done.metrics["test_accuracy"])


def test_watch_over_rest_is_ndjson(
    rest: httpx.Client, keys: dict[str, str], training, auth
) -> None:
    job = training.SubmitTrainingJob(pb.SubmitTrainingJobRequest(**SMALL), metadata=auth).job
    lines = []
    with rest.stream(
        "GET",
        f"/v1/training/jobs/{job.job_id}:watch",
        headers={"x-api-key": keys["alice"]},
        timeout=300,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.strip():
                lines.append(json.loads(line))
    assert "queued" in lines[0] and "succeeded" in lines[-1], lines[-1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 1000),
        ("learning_rate", -1.0),
        ("batch_size", 0),
        ("dataset", "cifar10"),
        ("architecture", "transformer"),
        ("optimizer", "lbfgs"),
        ("model_name", "bad\nname"),
    ],
)
def test_invalid_hyperparameters_are_rejected_and_not_queued(
    mesh: Mesh, training, auth, rest: httpx.Client, keys: dict[str, str], field: str, value
) -> None:
    redis = Redis.from_url(mesh.settings.redis_url)
    before = redis.zcard(mesh.settings.training_queue)
    listed = training.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=1000), metadata=auth)
    with pytest.raises(grpc.RpcError) as err:
        training.SubmitTrainingJob(pb.SubmitTrainingJobRequest(**{field: value}), metadata=auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    resp = rest.post("/v1/training/jobs", json={field: value}, headers={"x-api-key": keys["alice"]})
    assert resp.status_code == 400 and field in resp.json()["message"]
    after = training.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=1000), metadata=auth)
    assert len(after.jobs) == len(listed.jobs)
    assert redis.zcard(mesh.settings.training_queue) <= before


def test_idempotency_key_trains_once(training, auth) -> None:
    request = pb.SubmitTrainingJobRequest(idempotency_key="it-once", **SMALL)
    first = training.SubmitTrainingJob(request, metadata=auth).job
    second = training.SubmitTrainingJob(request, metadata=auth).job
    assert first.job_id == second.job_id
    assert wait_for(first.job_id, training, auth, TERMINAL).state == pb.JOB_STATE_SUCCEEDED
    third = training.SubmitTrainingJob(request, metadata=auth).job
    assert third.job_id == first.job_id and third.attempts == 1


def test_two_jobs_at_once_on_one_worker(training, auth) -> None:
    # Tiny jobs: what is checked is that they overlap, and each one's start-up alone (a process,
    # torch, MLflow) outlasts the gap between the two starts.
    tiny = {**SMALL, "train_subset": 500}
    jobs = [
        training.SubmitTrainingJob(pb.SubmitTrainingJobRequest(seed=s, **tiny), metadata=auth).job
        for s in (1, 2)
    ]
    finished = [wait_for(j.job_id, training, auth, TERMINAL) for j in jobs]
    assert [f.state for f in finished] == [pb.JOB_STATE_SUCCEEDED] * 2
    assert finished[0].worker == finished[1].worker  # the one worker ran both
    a, b = (f.start_time.ToDatetime() for f in finished)
    c, d = (f.end_time.ToDatetime() for f in finished)
    assert a < d and b < c, "the two jobs overlapped in time"


def test_worker_exports_training_metrics(mesh: Mesh) -> None:
    text = httpx.get(f"http://127.0.0.1:{mesh.settings.worker_ops_port}/metrics").text
    for name in (
        "training_jobs_active",
        "training_jobs_total",
        "training_epoch_duration_seconds_bucket",
        "training_queue_depth",
    ):
        assert name in text, name
    succeeded = [
        line
        for line in text.splitlines()
        if line.startswith('training_jobs_total{state="succeeded"}')
    ]
    assert succeeded and float(succeeded[0].split()[-1]) >= 1


def test_cancel_a_running_job_then_the_worker_takes_the_next(training, auth) -> None:
    long = training.SubmitTrainingJob(
        pb.SubmitTrainingJobRequest(train_subset=20000, epochs=5, experiment_name="it-training"),
        metadata=auth,
    ).job
    wait_for(long.job_id, training, auth, {pb.JOB_STATE_RUNNING})
    for event in training.WatchTrainingJob(
        pb.WatchTrainingJobRequest(job_id=long.job_id), metadata=auth, timeout=300
    ):
        if event.WhichOneof("event") == "batch_progress":
            break  # it is training now
    cancelled = training.CancelTrainingJob(
        pb.CancelTrainingJobRequest(job_id=long.job_id), metadata=auth
    ).job
    assert cancelled.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLED)
    stopped = wait_for(long.job_id, training, auth, TERMINAL, timeout_s=60)
    assert stopped.state == pb.JOB_STATE_CANCELLED
    assert events_of(long.job_id, training, auth)[-1].cancelled.cancelled_by == "alice"
    nxt = training.SubmitTrainingJob(pb.SubmitTrainingJobRequest(**SMALL), metadata=auth).job
    assert wait_for(nxt.job_id, training, auth, TERMINAL).state == pb.JOB_STATE_SUCCEEDED


def test_cancel_a_queued_job_and_unknown_jobs(training, auth) -> None:
    with pytest.raises(grpc.RpcError) as err:
        training.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id="nope"), metadata=auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        training.GetTrainingJob(pb.GetTrainingJobRequest(job_id="nope"), metadata=auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- a job on Fashion-MNIST that names no model, as a newcomer's first one might ------------------
# These run before the SIGKILL test below: the worker it kills may be the mesh's only one.


@dataclass(frozen=True)
class FirstJob:
    submitted: pb.TrainingJob
    done: pb.TrainingJob
    submissions_counted: float  # training_jobs_submitted_total{client="alice"}, after - before


def submitted_jobs(mesh: Mesh) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.settings.training_ops_port}/metrics").text
    return metric_sample(text, "training_jobs_submitted_total", client="alice")


@pytest.fixture(scope="module")
def fashion_job(mesh: Mesh, training, auth) -> FirstJob:
    before = submitted_jobs(mesh)
    request = pb.SubmitTrainingJobRequest(
        dataset="fashion_mnist",
        architecture="mlp",
        epochs=2,
        train_subset=300,
        experiment_name="it-training-fashion",
    )
    submitted = training.SubmitTrainingJob(request, metadata=auth).job
    counted = submitted_jobs(mesh) - before
    done = wait_for(submitted.job_id, training, auth, TERMINAL)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    return FirstJob(submitted, done, counted)


def test_a_job_naming_no_model_registers_under_its_datasets_model(
    mesh: Mesh, fashion_job: FirstJob
) -> None:
    assert fashion_job.submitted.model_name == "fashion-mnist-classifier"
    done = fashion_job.done
    assert done.model_name == "fashion-mnist-classifier" and done.model_version >= 1
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    version = client.get_model_version("fashion-mnist-classifier", str(done.model_version))
    assert version.run_id == done.mlflow_run_id
    assert not client.search_model_versions(
        f"name = 'mnist-classifier' and run_id = '{done.mlflow_run_id}'"
    )


def test_the_logged_model_belongs_to_the_runs_experiment(mesh: Mesh, fashion_job: FirstJob) -> None:
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    run = client.get_run(fashion_job.done.mlflow_run_id)
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    mine = [m for m in logged if m.source_run_id == run.info.run_id]
    assert len(mine) == 1, logged
    assert mine[0].experiment_id == run.info.experiment_id and mine[0].name == "model"
    assert mine[0].status == LoggedModelStatus.READY
    assert [o.model_id for o in run.outputs.model_outputs] == [mine[0].model_id]
    # None of the job's models went to "Default" (where other tests' own models may be).
    in_default = client.search_logged_models(experiment_ids=["0"])
    assert [m for m in in_default if m.source_run_id == run.info.run_id] == []


def test_the_run_is_named_by_what_it_trained_and_tagged_with_the_job(
    mesh: Mesh, fashion_job: FirstJob
) -> None:
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    run = client.get_run(fashion_job.done.mlflow_run_id)
    assert run.info.run_name == "mlp-fashion_mnist-adam-lr0.001-bs128-e2"
    assert run.data.tags["mlmesh.job_id"] == fashion_job.done.job_id


def test_the_experiment_is_marked_as_model_training(mesh: Mesh, fashion_job: FirstJob) -> None:
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("it-training-fashion")
    assert experiment is not None
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_registry_reports_each_metric_at_its_step(
    mesh: Mesh, gateway_channel: grpc.Channel, rest: httpx.Client, fashion_job: FirstJob
) -> None:
    run_id = fashion_job.done.mlflow_run_id
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    last = client.get_metric_history(run_id, "val_accuracy")[-1]
    assert last.step == 2  # two epochs
    registry = registry_pb2_grpc.RegistryServiceStub(gateway_channel)
    got = registry.GetRun(registry_pb2.GetRunRequest(run_id=run_id)).run
    experiment_id = got.experiment_id
    listed = registry.ListRuns(registry_pb2.ListRunsRequest(experiment_ids=[experiment_id])).runs
    (listed_run,) = [r for r in listed if r.run_id == run_id]
    for run in (got, listed_run):
        metrics = {m.key: m for m in run.metrics}
        assert metrics["val_accuracy"].step == last.step
        assert metrics["val_accuracy"].value == pytest.approx(last.value)
        assert metrics["val_accuracy"].time.ToMilliseconds() == last.timestamp
    body = rest.get(f"/v1/runs/{run_id}").json()["run"]
    (val,) = [m for m in body["metrics"] if m["key"] == "val_accuracy"]
    assert int(val["step"]) == last.step


def test_cancelling_an_ended_job_says_it_has_ended(
    rest: httpx.Client, keys: dict[str, str], training, auth, fashion_job: FirstJob
) -> None:
    job_id = fashion_job.done.job_id
    with pytest.raises(grpc.RpcError) as err:
        training.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=job_id), metadata=auth)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended" in err.value.details() and "succeeded" in err.value.details()
    resp = rest.post(
        f"/v1/training/jobs/{job_id}:cancel", json={}, headers={"x-api-key": keys["alice"]}
    )
    assert resp.status_code == 400 and "already ended" in resp.json()["message"], resp.text
    job = training.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job_id), metadata=auth).job
    assert job.state == pb.JOB_STATE_SUCCEEDED  # left as it ended


def test_the_training_process_counts_submissions_by_client(fashion_job: FirstJob) -> None:
    assert fashion_job.submissions_counted == 1


@pytest.fixture()
def spare_worker(mesh: Mesh, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A second worker on the same queue, started the way the launcher starts one."""
    settings = mesh.settings.model_copy(update={"worker_ops_port": 0})
    log = (tmp_path / "spare-worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.training.worker"],
        env=child_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def test_sigkill_of_the_worker_loses_no_job(mesh: Mesh, training, auth, spare_worker) -> None:
    # The spare takes the job (the mesh's worker is paused meanwhile) and is killed; the mesh's
    # worker, resumed, takes the job over. Killing the mesh's own worker instead would leave
    # the tests after this one without a worker once the spare is stopped.
    mesh_worker = mesh.pids()["worker"]
    os.kill(mesh_worker, signal.SIGSTOP)
    try:
        job = training.SubmitTrainingJob(
            # Big enough to be killed mid-training (the kill follows the run's start at once),
            # small enough that training it twice is not the test's whole cost.
            pb.SubmitTrainingJobRequest(train_subset=3000, epochs=2, experiment_name="it-training"),
            metadata=auth,
        ).job
        running = wait_for(job.job_id, training, auth, {pb.JOB_STATE_RUNNING})
        while not running.mlflow_run_id:  # wait until it is really training
            time.sleep(0.2)
            running = wait_for(job.job_id, training, auth, {pb.JOB_STATE_RUNNING})
        pid = int(running.worker.rsplit(":", 1)[1])
        assert pid == spare_worker.pid
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(mesh_worker, signal.SIGCONT)
    finished = wait_for(job.job_id, training, auth, TERMINAL, timeout_s=300)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
    assert finished.attempts == 2
    assert finished.worker != running.worker
    events = events_of(job.job_id, training, auth)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("succeeded") == 1 and kinds.count("started") == 2
    client = mlflow.MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    assert client.get_run(running.mlflow_run_id).info.status == "KILLED"


def test_list_jobs_filters_and_paginates(training, auth) -> None:
    everything = training.ListTrainingJobs(
        pb.ListTrainingJobsRequest(page_size=1000), metadata=auth
    )
    assert len(everything.jobs) >= 3
    times = [j.create_time.ToDatetime() for j in everything.jobs]
    assert times == sorted(times, reverse=True)
    first = training.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=2), metadata=auth)
    second = training.ListTrainingJobs(
        pb.ListTrainingJobsRequest(page_size=2, page_token=first.next_page_token), metadata=auth
    )
    assert [j.job_id for j in [*first.jobs, *second.jobs]] == [
        j.job_id for j in everything.jobs[:4]
    ]
    done = training.ListTrainingJobs(
        pb.ListTrainingJobsRequest(state=pb.JOB_STATE_SUCCEEDED, page_size=1000), metadata=auth
    )
    assert done.jobs and all(j.state == pb.JOB_STATE_SUCCEEDED for j in done.jobs)
