"""Per-client rate limits held in Redis: 429 with Retry-After over REST, RESOURCE_EXHAUSTED
over gRPC, one bucket across replicas, and predictions that outlive a Redis outage.

The session's mesh gives client erin small buckets (tests/conftest.py): 3 predictions, 2
training submissions and 2 registry writes, refilled at 1 a minute; only this module uses
erin's key.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from mlmesh.inference.v1 import inference_pb2 as pb
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from mlmesh.training.v1 import training_pb2, training_pb2_grpc
from services.common.errors import Unavailable
from services.common.limits import (
    CLASSES,
    PREDICTIONS,
    REGISTRY_WRITES,
    TRAINING_SUBMISSIONS,
    parse_limits,
)
from services.common.ratelimit import KEY_PREFIX, RateLimited, RateLimiter, lease_size
from services.launcher.mesh import Mesh
from tests.conftest import SHARED_REDIS, free_port, metric_sample
from tests.integration.replicas import inference_replica, second_gateway
from tests.integration.rpcs import DESCRIPTOR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

IMAGE = [0.0] * 784


def fresh_buckets(mesh: Mesh, client: str) -> None:
    """Forget ``client``'s buckets: a run before this one, on the same Redis db, may have
    drained them minutes ago."""
    redis = SyncRedis.from_url(mesh.settings.redis_url)
    try:
        for route_class in CLASSES:
            redis.delete(f"{KEY_PREFIX}:{route_class}:{client}")
    finally:
        redis.close()


def _code(call) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


def test_over_the_limit_is_429_with_retry_after_over_rest_and_resource_exhausted_over_grpc(
    mesh: Mesh, keys: dict[str, str], rest: httpx.Client, gateway_channel: grpc.Channel
) -> None:
    fresh_buckets(mesh, "erin")
    erin = {"x-api-key": keys["erin"]}
    body = {"image": IMAGE, "model_name": f"no-such-model-{secrets.token_hex(3)}"}
    # Predictions: REST, gRPC and the Open Inference Protocol draw on one bucket of 3.
    answers = [rest.post("/v1/predict", json=body, headers=erin) for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 404]  # let through, then not found
    over = rest.post("/v1/predict", json=body, headers=erin)
    assert over.status_code == 429, over.text
    assert int(over.headers["retry-after"]) >= 1
    assert "erin" in over.json()["message"] and "rate limit" in over.json()["message"]
    stub = inference_pb2_grpc.InferenceServiceStub(gateway_channel)
    code, details, trailers = _code(
        lambda: stub.Predict(pb.PredictRequest(image=IMAGE), metadata=list(erin.items()))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "predictions" in details
    assert int(trailers["retry-after"]) >= 1
    oip = rest.post(
        "/v2/models/any/infer",
        json={"inputs": [{"name": "input-0", "shape": [1, 784], "datatype": "FP32",
                          "data": IMAGE}]},
        headers=erin,
    )  # fmt: skip
    assert oip.status_code == 429 and "rate limit" in oip.json()["error"], oip.text
    assert int(oip.headers["retry-after"]) >= 1
    # Per client: alice is not affected.
    assert (
        rest.post("/v1/predict", json=body, headers={"x-api-key": keys["alice"]}).status_code == 404
    )

    # Registry writes: a bucket of 2.
    registry = registry_pb2_grpc.RegistryServiceStub(gateway_channel)
    transition = registry_pb2.TransitionModelVersionRequest(
        model_name=body["model_name"], version=1, stage="production"
    )
    codes = [
        _code(lambda: registry.TransitionModelVersion(transition, metadata=list(erin.items())))[0]
        for _ in range(3)
    ]
    assert codes == [grpc.StatusCode.NOT_FOUND] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]

    # Training submissions: a bucket of 2 (invalid ones count: the limit comes first).
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    bad = training_pb2.SubmitTrainingJobRequest(dataset="no-such-dataset")
    codes = [
        _code(lambda: training.SubmitTrainingJob(bad, metadata=list(erin.items())))[0]
        for _ in range(3)
    ]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    # Reads are never limited.
    for _ in range(5):
        assert rest.get("/v1/models", headers=erin).status_code == 200

    scrape = httpx.get(f"http://127.0.0.1:{mesh.settings.inference_ops_port}/metrics").text
    assert metric_sample(scrape, "rate_limit_denied_total", route_class="predictions") >= 2


def test_the_limit_holds_across_two_replicas(
    mesh: Mesh, keys: dict[str, str], tmp_path: Path
) -> None:
    """20 concurrent predictions with dave's key, split over two Inference replicas on the
    same Redis, each behind a gateway (the mesh's, and a second one in front of the second
    replica): exactly dave's burst (4) goes through."""
    fresh_buckets(mesh, "dave")
    replica = mesh.settings.model_copy(
        update={
            "inference_address": f"127.0.0.1:{free_port()}",
            "inference_ops_port": free_port(),
            "inference_http_port": free_port(),
            "inference_health_port": free_port(),
        }
    )
    with (
        inference_replica(replica, mesh.log_dir / "inference-second-replica.log"),
        second_gateway(
            mesh.settings,
            DESCRIPTOR,
            tmp_path,
            inference_address=replica.inference_address,
            inference_http_port=replica.inference_http_port,
        ) as gateway,
    ):
        channels = [
            grpc.insecure_channel(f"127.0.0.1:{s.gateway_port}") for s in (mesh.settings, gateway)
        ]
        try:
            stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
            request = pb.PredictRequest(image=IMAGE, model_name="no-such-model")
            metadata = [("x-api-key", keys["dave"])]

            def ask(i: int) -> grpc.StatusCode:
                call = stubs[i % 2].Predict
                return _code(lambda: call(request, metadata=metadata, timeout=10))[0]

            with ThreadPoolExecutor(20) as pool:
                codes = list(pool.map(ask, range(20)))
            # both replicas refused some of them
            for ops_port in (mesh.settings.inference_ops_port, replica.inference_ops_port):
                scrape = httpx.get(f"http://127.0.0.1:{ops_port}/metrics").text
                denied = metric_sample(scrape, "rate_limit_denied_total", route_class="predictions")
                assert denied >= 1, ops_port
        finally:
            for channel in channels:
                channel.close()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 16, codes
    assert codes.count(grpc.StatusCode.NOT_FOUND) == 4, codes  # let through: no such model


async def test_a_bucket_is_atomic_refills_and_is_per_client() -> None:
    redis = Redis.from_url(f"{SHARED_REDIS}/15")
    tag = secrets.token_hex(4)
    limiter = RateLimiter(redis, parse_limits(f"predictions=20/s:5,predictions@{tag}-vip=off"))
    other_replica = RateLimiter(redis, parse_limits("predictions=20/s:5"))
    try:

        async def take(limiter: RateLimiter, client: str) -> bool:
            try:
                await limiter.acquire(PREDICTIONS, client)
            except RateLimited:
                return False
            return True

        client = f"{tag}-a"
        results = await asyncio.gather(
            *(take(limiter if i % 2 else other_replica, client) for i in range(40))
        )
        assert results.count(True) == 5  # 40 at once over two limiters: exactly the burst
        with pytest.raises(RateLimited) as over:
            await limiter.acquire(PREDICTIONS, client)
        assert 0 < over.value.retry_after_s <= 0.05 + 1e-9 and over.value.retry_after == "1"
        await asyncio.sleep(0.25)  # 20/s: 5 tokens back
        assert [await take(limiter, client) for _ in range(6)].count(True) == 5
        assert all([await take(limiter, f"{tag}-b") for _ in range(5)])  # a bucket per client
        assert all([await take(limiter, f"{tag}-vip") for _ in range(50)])  # off for this one
    finally:
        await redis.aclose()


async def test_a_process_takes_its_tokens_in_leases_and_never_more_than_the_bucket() -> None:
    """Two processes (limiters) on one bucket of 100, refilled at 400/s, take leases of 5
    tokens: 300 predictions at once get the burst (within a lease per process, plus what
    refilled meanwhile) in about 100 / 5 calls to Redis, not 300."""
    redis = Redis.from_url(f"{SHARED_REDIS}/15")
    limits = parse_limits("predictions=400/s:100")
    assert lease_size(limits[(PREDICTIONS, "")]) == 5
    processes = [RateLimiter(redis, limits), RateLimiter(redis, limits)]
    calls = 0
    for limiter in processes:
        script = limiter._script

        async def counted(*args, _script=script, **kwargs):
            nonlocal calls
            calls += 1
            return await _script(*args, **kwargs)

        limiter._script = counted
    client = f"{secrets.token_hex(4)}-leases"
    try:

        async def take(limiter: RateLimiter) -> bool:
            try:
                await limiter.acquire(PREDICTIONS, client)
            except RateLimited:
                return False
            return True

        started = time.monotonic()
        results = await asyncio.gather(*(take(processes[i % 2]) for i in range(300)))
        elapsed = time.monotonic() - started
        admitted = results.count(True)
        assert 100 - 2 * 4 <= admitted <= 100 + 400 * elapsed + 1, (admitted, elapsed)
        assert calls <= admitted / 5 + 10, calls  # a call per lease, and a few that found none
    finally:
        await redis.aclose()


def test_a_lease_is_a_twentieth_of_the_rate_and_of_the_burst() -> None:
    texts = ("predictions=2000/s:4000", "predictions=20/s:5", "predictions=40/s:40",
             "predictions=100000/s:1000", "predictions=5/m:3")  # fmt: skip
    sizes = {text: lease_size(parse_limits(text)[(PREDICTIONS, "")]) for text in texts}
    # Submissions and registry writes are rare: exact, a call per request, whatever the limit.
    other = parse_limits("registry_writes=2000/s:4000")[(REGISTRY_WRITES, "")]
    assert lease_size(other, REGISTRY_WRITES) == 1
    assert sizes == {
        "predictions=2000/s:4000": 100,  # the default: a Redis call per 100 predictions
        "predictions=20/s:5": 1,  # small limits are exact: a call per request
        "predictions=40/s:40": 2,
        "predictions=100000/s:1000": 50,  # the burst bounds it
        "predictions=5/m:3": 1,
    }


async def test_without_redis_predictions_pass_and_writes_are_refused() -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    limiter = RateLimiter(dead, parse_limits("predictions=1/s:1,registry_writes=1/s:1"))
    try:
        for _ in range(3):
            await limiter.acquire(PREDICTIONS, "alice")  # fails open
        with pytest.raises(Unavailable, match="rate limiter cannot reach Redis"):
            await limiter.acquire(REGISTRY_WRITES, "alice")
        await limiter.acquire(TRAINING_SUBMISSIONS, "alice")  # no limit configured: no call
    finally:
        await dead.aclose()


def test_limits_parse_or_say_what_is_wrong() -> None:
    limits = parse_limits(
        " predictions=120/m:10 , registry_writes@ci-bot=off,training_submissions=1/h:3"
    )
    assert limits[("predictions", "")].rate == 2.0 and limits[("predictions", "")].burst == 10
    assert limits[("registry_writes", "ci-bot")] is None
    assert limits[("training_submissions", "")].rate == pytest.approx(1 / 3600)
    for bad in ("predictions=fast", "uploads=1/s:1", "predictions=1/d:1", "predictions=0/s:1",
                "predictions=1/s:0", "predictions@=1/s:1"):  # fmt: skip
        with pytest.raises(ValueError, match="rate limit"):
            parse_limits(bad)
