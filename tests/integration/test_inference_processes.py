"""Two Inference processes behind one gateway, as the launcher runs MLMESH_INFERENCE_PROCESSES=2:
started from the launcher's own child specs beside the session's mesh (its Registry, MLflow
and Redis), with an Envoy rendered for both. Requests through Envoy reach both processes, a
promotion is served by both, and each listens on the ports the README gives."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from services.common.settings import INFERENCE_PORT_STEP, InferenceEndpoint, Settings
from services.launcher.mesh import Mesh, child_env, grpc_serving, http_ok, inference_specs
from services.launcher.process import Child, port_open
from tests.conftest import free_port, metric_sample
from tests.integration.models import log_classifier
from tests.integration.replicas import second_gateway
from tests.integration.rpcs import DESCRIPTOR
from tests.integration.test_inference import promote

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROCESSES = 2


def free_ports_for_every_process() -> int:
    """A port p such that p + INFERENCE_PORT_STEP * i is free for each process i."""
    for _ in range(100):
        base = free_port()
        wanted = [base + INFERENCE_PORT_STEP * i for i in range(PROCESSES)]
        if wanted[-1] < 65536 and all(bindable(p) for p in wanted[1:]):
            return base
    raise AssertionError("no run of free ports found")


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Processes:
    settings: Settings  # the Inference processes' (MLMESH_INFERENCE_PROCESSES=2)
    gateway: Settings  # the Envoy in front of them
    bases: dict[str, int]  # the configured (process 0's) ports


@pytest.fixture(scope="module")
def processes(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    bases = {
        "grpc": free_ports_for_every_process(),
        "health": free_ports_for_every_process(),
        "ops": free_ports_for_every_process(),
        "http": free_ports_for_every_process(),
    }
    settings = mesh.settings.model_copy(
        update={
            "inference_processes": PROCESSES,
            "inference_address": f"127.0.0.1:{bases['grpc']}",
            "inference_health_port": bases["health"],
            "inference_ops_port": bases["ops"],
            "inference_http_port": bases["http"],
        }
    )
    work = tmp_path_factory.mktemp("inference-processes")
    env = child_env(settings)
    children: list[Child] = []
    try:
        # As Mesh.start() brings them up: each spec's command, in the mesh's environment with
        # the spec's own over it.
        for spec in inference_specs(settings):
            child = Child(spec, spec.command(), work / f"{spec.name}.log", {**env, **spec.env})
            child.start()
            children.append(child)
        deadline = time.monotonic() + 90
        for child in children:
            while not child.spec.ready():
                assert child.exit_code() is None, child.failure("exited")
                assert time.monotonic() < deadline, child.failure("not ready")
                time.sleep(0.25)
        with second_gateway(settings, DESCRIPTOR, work / "gateway") as gateway:
            yield Processes(settings, gateway, bases)
    finally:
        for child in reversed(children):
            child.stop(15)


def scrape(endpoint: InferenceEndpoint) -> str:
    return httpx.get(f"http://127.0.0.1:{endpoint.ops_port}/metrics", timeout=10).text


def predictions(endpoint: InferenceEndpoint, name: str, version: int | None = None) -> float:
    labels = (
        {"model_name": name}
        if version is None
        else {"model_name": name, "model_version": str(version)}
    )
    return metric_sample(scrape(endpoint), "model_predictions_total", **labels)


def healthy_in_envoy(gateway: Settings) -> dict[str, set[int]]:
    """cluster -> ports of its hosts that Envoy's health checks call healthy."""
    text = httpx.get(f"http://127.0.0.1:{gateway.gateway_admin_port}/clusters", timeout=5).text
    found: dict[str, set[int]] = {}
    for line in text.splitlines():
        cluster, _, rest = line.partition("::")
        address, _, stat = rest.partition("::")
        if stat == "health_flags::healthy":
            found.setdefault(cluster, set()).add(int(address.rsplit(":", 1)[1]))
    return found


def test_each_process_listens_on_the_ports_plus_100_times_its_index(
    processes: Processes,
) -> None:
    endpoints = processes.settings.inference_endpoints()
    b = processes.bases
    assert [(e.name, e.address, e.health_port, e.ops_port, e.http_port) for e in endpoints] == [
        ("inference", f"127.0.0.1:{b['grpc']}", b["health"], b["ops"], b["http"]),
        ("inference-1", f"127.0.0.1:{b['grpc'] + 100}", b["health"] + 100, b["ops"] + 100,
         b["http"] + 100),
    ]  # fmt: skip
    for e in endpoints:
        assert grpc_serving(e.health_address), e  # plain-text health
        assert http_ok(f"http://127.0.0.1:{e.ops_port}/health"), e  # ops
        assert port_open(e.host, int(e.address.rsplit(":", 1)[1])), e  # gRPC (mutual TLS)
        assert port_open(e.host, e.http_port), e  # OIP REST (mutual TLS)
    # Envoy health-checks both endpoints of both Inference clusters.
    wanted = {
        "inference": {b["grpc"], b["grpc"] + 100},
        "inference_http": {b["http"], b["http"] + 100},
    }
    deadline = time.monotonic() + 30
    while not all(healthy_in_envoy(processes.gateway).get(c) == p for c, p in wanted.items()):
        assert time.monotonic() < deadline, healthy_in_envoy(processes.gateway)
        time.sleep(0.5)


def test_requests_reach_both_processes_and_a_promotion_is_served_by_both(
    processes: Processes, mesh: Mesh, keys: dict[str, str]
) -> None:
    uri = mesh.settings.mlflow_tracking_uri
    name = f"it-procs-{secrets.token_hex(3)}"
    endpoints = processes.settings.inference_endpoints()
    auth = {"x-api-key": keys["alice"]}
    rng = np.random.default_rng(secrets.randbits(32))
    # The Registry checks the version on the session's Inference process; these two learn of
    # the promotion from the Redis model event, as every process of a mesh does.
    assert log_classifier(uri, name, favourite=1) == 1
    promote(mesh, keys, name, 1)

    with httpx.Client(base_url=processes.gateway.gateway_url, headers=auth, timeout=30) as rest:

        def rest_predict(version: int) -> None:
            """An uncached prediction over REST, through the inference (gRPC) cluster."""
            image = rng.random(784, dtype=np.float32).tolist()
            answer = rest.post("/v1/predict", json={"image": image, "model_name": name})
            assert answer.status_code == 200, answer.text
            assert int(answer.json()["model_version"]) == version and not answer.json()["cached"]

        def oip_predict(version: int) -> None:
            """One over the Open Inference Protocol's REST face: the inference_http cluster."""
            image = rng.random(784, dtype=np.float32).tolist()
            body = {"inputs": [{"name": "input-0", "shape": [1, 784], "datatype": "FP32",
                                "data": image}]}  # fmt: skip
            answer = rest.post(f"/v2/models/{name}/infer", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == str(version)

        # Each process loads version 1 on the first request for the model that reaches it;
        # Envoy spreads each cluster's requests over both.
        for predict in (rest_predict, oip_predict):
            before = [predictions(e, name) for e in endpoints]
            for _ in range(40):
                predict(1)
            rose = [predictions(e, name) - b for e, b in zip(endpoints, before, strict=True)]
            assert sum(rose) == 40 and all(r > 0 for r in rose), (predict.__name__, rose)

        assert log_classifier(uri, name, favourite=2) == 2
        promote(mesh, keys, name, 2)
        deadline = time.monotonic() + 15
        while any(
            metric_sample(scrape(e), "model_alias_version", model_name=name, alias="production")
            != 2
            for e in endpoints
        ):
            assert time.monotonic() < deadline, "a process never switched to version 2"
            time.sleep(0.2)
        for _ in range(20):  # every answer, from whichever process, is version 2's
            rest_predict(2)
            oip_predict(2)
        assert all(predictions(e, name, 2) > 0 for e in endpoints)

        # The cache is the mesh's, not a process's: one image asked 30 times is computed once,
        # and both processes answer repeats from it (all 29 on one: about 2 in a billion).
        image = rng.random(784, dtype=np.float32).tolist()
        hits = [metric_sample(scrape(e), "prediction_cache_hits_total", model_name=name)
                for e in endpoints]  # fmt: skip
        cached = [
            rest.post("/v1/predict", json={"image": image, "model_name": name}).json()["cached"]
            for _ in range(30)
        ]
        assert cached == [False] + [True] * 29, cached
        rose = [
            metric_sample(scrape(e), "prediction_cache_hits_total", model_name=name) - h
            for e, h in zip(endpoints, hits, strict=True)
        ]
        assert sum(rose) == 29 and all(r > 0 for r in rose), rose
