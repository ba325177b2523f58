"""Every service process counts its RPCs in the standard gRPC server metrics; health checks
are not traffic."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from mlmesh.training.v1 import training_pb2, training_pb2_grpc
from services.common.server import service_channel
from services.launcher.mesh import Mesh
from tests.conftest import metric_sample as sample

pytestmark = pytest.mark.slow


def test_rpcs_are_counted_by_method_and_code(mesh: Mesh) -> None:
    s = mesh.settings
    registry_ops = f"http://127.0.0.1:{s.registry_ops_port}/metrics"
    rpc = {"grpc_service": "mlmesh.registry.v1.RegistryService"}
    before = httpx.get(registry_ops).text
    with service_channel(s, s.registry_address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        for _ in range(3):
            stub.ListExperiments(registry_pb2.ListExperimentsRequest(page_size=5))
        with pytest.raises(grpc.RpcError) as bad:
            stub.ListExperiments(registry_pb2.ListExperimentsRequest(page_size=-1))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            health.Check(health_pb2.HealthCheckRequest())
    after = httpx.get(registry_ops).text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **rpc, **labels) - sample(before, name, **rpc, **labels)

    method = {"grpc_method": "ListExperiments", "grpc_type": "unary"}
    assert delta("grpc_server_started_total", **method) == 4
    assert delta("grpc_server_handled_total", **method, grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", **method, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("grpc_server_handling_seconds_count", **method) == 4
    assert delta("grpc_server_msg_received_total", **method) == 4
    assert delta("grpc_server_msg_sent_total", **method) == 3
    assert "grpc.health.v1" not in after

    # A server stream on another process: Training's WatchTrainingJob of an unknown job.
    training_ops = f"http://127.0.0.1:{s.training_ops_port}/metrics"
    with service_channel(s, s.training_address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            list(stub.WatchTrainingJob(training_pb2.WatchTrainingJobRequest(job_id="nope")))
        assert missing.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    text = httpx.get(training_ops).text
    watched = {"grpc_method": "WatchTrainingJob", "grpc_type": "server_stream"}
    assert sample(text, "grpc_server_handled_total", **watched,
                  grpc_code=missing.value.code().name) >= 1  # fmt: skip
