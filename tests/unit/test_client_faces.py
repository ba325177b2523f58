"""The SDK's faces against a real gRPC server in this process: retries on UNAVAILABLE for
idempotent calls only, deadlines, mlmesh's exception types, and the asyncio client.

The stand-in Registry and Training services fail the first N calls of a method with
UNAVAILABLE (as a restarting gateway does), or take longer than a deadline; they count the
calls that reached them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlmesh.registry.v1 import registry_pb2 as registry
from mlmesh.registry.v1 import registry_pb2_grpc
from mlmesh.training.v1 import training_pb2 as training
from mlmesh.training.v1 import training_pb2_grpc
from mlmesh_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    ImageError,
    MeshError,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from mlmesh_client.retry import Tries
from tests.unit.test_client_predict import stand_in  # noqa: F401 (a fixture)

FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


class Flaky(registry_pb2_grpc.RegistryServiceServicer, training_pb2_grpc.TrainingServiceServicer):
    """Every method fails with UNAVAILABLE until it has been called ``fail_first`` times."""

    def __init__(self) -> None:
        self.fail_first = 0
        self.calls: Counter[str] = Counter()
        self.release = threading.Event()

    def _arrive(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        if self.calls[method] <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def ListRegisteredModels(self, request, context):
        self._arrive("ListRegisteredModels", context)
        if request.page_token == "":
            return registry.ListRegisteredModelsResponse(
                registered_models=[registry.RegisteredModel(name="a")], next_page_token="2"
            )
        return registry.ListRegisteredModelsResponse(
            registered_models=[registry.RegisteredModel(name="b")]
        )

    def TransitionModelVersion(self, request, context):
        self._arrive("TransitionModelVersion", context)
        return registry.TransitionModelVersionResponse()

    def GetModelVersion(self, request, context):
        self._arrive("GetModelVersion", context)
        if request.name == "slow":
            self.release.wait(10)  # longer than the deadlines below
        if request.name == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model 'missing'")
        if request.name == "limited":
            context.set_trailing_metadata((("retry-after", "7"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "client 'erin' is over its limit")
        if request.name == "locked":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        return registry.GetModelVersionResponse(
            model_version=registry.ModelVersion(name=request.name, version=request.version)
        )

    def SubmitTrainingJob(self, request, context):
        self._arrive("SubmitTrainingJob", context)
        return training.SubmitTrainingJobResponse(job=training.TrainingJob(job_id="j1"))


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(None)


def test_reads_are_retried_on_unavailable_until_they_go_through(flaky) -> None:
    servicer, target = flaky
    servicer.fail_first = 2
    with Client(target, retry=FAST) as mesh:
        models = mesh.list_registered_models()
    assert [m.name for m in models] == ["a", "b"]  # both pages
    assert servicer.calls["ListRegisteredModels"] == 4  # 2 refused, then 2 pages


def test_retries_stop_after_the_policys_attempts(flaky) -> None:
    servicer, target = flaky
    servicer.fail_first = 100
    with Client(target, retry=FAST) as mesh, pytest.raises(Unavailable) as failed:
        mesh.get_model_version("m", 1)
    assert servicer.calls["GetModelVersion"] == FAST.attempts
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.details == "restarting"


def test_changes_are_not_retried_unless_they_carry_an_idempotency_key(flaky) -> None:
    servicer, target = flaky
    servicer.fail_first = 1
    with Client(target, retry=FAST) as mesh:
        with pytest.raises(Unavailable):
            mesh.promote("m", 1)
        assert servicer.calls["TransitionModelVersion"] == 1
        with pytest.raises(Unavailable):
            mesh.submit_training_job(epochs=1)
        assert servicer.calls["SubmitTrainingJob"] == 1
        servicer.calls.clear()
        assert mesh.submit_training_job(epochs=1, idempotency_key="k1").job_id == "j1"
        assert servicer.calls["SubmitTrainingJob"] == 2


def test_a_call_past_its_deadline_is_deadline_exceeded(flaky) -> None:
    _, target = flaky
    with Client(target, timeout_s=0.2) as mesh:
        with pytest.raises(DeadlineExceeded) as late:
            mesh.get_model_version("slow", 1)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # per call: another deadline on the same channel
        with pytest.raises(DeadlineExceeded):
            mesh.with_options(timeout_s=0.1).get_model_version("slow", 2)
        assert mesh.get_model_version("quick", 3).version == 3


def test_errors_are_mlmesh_types_with_the_code_and_a_hint(flaky) -> None:
    _, target = flaky
    with Client(target) as mesh:
        with pytest.raises(NotFound) as missing:
            mesh.get_model_version("missing", 1)
        assert isinstance(missing.value, MeshError)
        assert str(missing.value) == "NOT_FOUND: no model 'missing'"
        with pytest.raises(ResourceExhausted) as limited:
            mesh.get_model_version("limited", 1)
        assert limited.value.retry_after == 7.0
        assert str(limited.value).endswith("(retry after 7 s)")
        with pytest.raises(Unauthenticated, match="this call needs an API key: Client"):
            mesh.get_model_version("locked", 1)
    with Client(target, api_key="k" * 24) as keyed, pytest.raises(Unauthenticated) as unknown:
        keyed.get_model_version("locked", 1)
    assert "does not know the API key sent" in str(unknown.value)


def test_the_async_client_makes_the_same_calls(flaky) -> None:
    servicer, target = flaky
    servicer.fail_first = 1

    async def calls() -> None:
        async with AsyncClient(target, retry=FAST, timeout_s=0.2) as mesh:
            models = await mesh.list_registered_models()
            assert [m.name for m in models] == ["a", "b"]
            assert (await mesh.get_model_version("m", 4)).version == 4
            with pytest.raises(NotFound):
                await mesh.get_model_version("missing", 1)
            with pytest.raises(DeadlineExceeded):
                await mesh.get_model_version("slow", 1)
            with pytest.raises(Unavailable):
                await mesh.promote("m", 1)

    asyncio.run(calls())
    assert servicer.calls["ListRegisteredModels"] == 3  # one refused, then two pages


def test_backoff_grows_within_its_cap_and_the_deadline() -> None:
    policy = RetryPolicy(attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    for retry, cap in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        waits = [policy.backoff_s(retry) for _ in range(200)]
        assert all(0.0 <= w <= cap for w in waits) and max(waits) > cap / 2
    tries = Tries(policy, idempotent=True, timeout_s=None)
    assert tries.timeout_s() is None
    assert [tries.wait_s(grpc.StatusCode.UNAVAILABLE) is not None for _ in range(10)] == [
        True
    ] * 9 + [False]
    assert Tries(policy, True, None).wait_s(grpc.StatusCode.INTERNAL) is None
    assert Tries(policy, False, None).wait_s(grpc.StatusCode.UNAVAILABLE) is None
    assert Tries(policy, True, 0.0).wait_s(grpc.StatusCode.UNAVAILABLE) is None  # no time left
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_the_async_client_streams_and_stops_at_a_bad_image(stand_in) -> None:  # noqa: F811
    servicer, target = stand_in

    async def calls() -> tuple[list[str], list[str]]:
        async with AsyncClient(target, api_key="k" * 20) as mesh:
            answers = [a async for a in mesh.predict_stream([bytes(784), [0.0] * 784])]
            got = []
            with pytest.raises(ImageError, match="784 bytes, got 3"):
                async for answer in mesh.predict_stream([bytes(784), b"bad", bytes(784)]):
                    got.append(answer.request_id)
            return [a.request_id for a in answers], got

    answered, before_the_bad_one = asyncio.run(calls())
    assert answered == ["0", "1"] and before_the_bad_one == ["0"]
    assert servicer.keys == ["k" * 20] * 3
