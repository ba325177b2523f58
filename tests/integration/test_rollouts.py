"""Rollouts end to end through the gateway: canary split and stickiness, shadow agreement,
feedback and live accuracy, rollback by a guard, automatic promotion, a fresh replica that
follows a running rollout, and every bad request refused.

The versions differ for real: tiny classifiers that lean hard towards one class
(tests/integration/models.py), so on any image v1 answers class 0 and v2 class 3. The tests
label their images 0 (70%) or 3 (30%): v1's live accuracy is 0.7 on them, v2's 0.3. A third
version identical to v1 is the good candidate.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from mlmesh.inference.v1 import inference_pb2 as ipb
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2 as pb
from mlmesh.registry.v1 import registry_pb2_grpc
from services.common.headers import ROUTING_KEY_HEADER
from services.common.server import service_channel
from services.launcher.mesh import Mesh
from services.training.ml.train import train
from tests.conftest import free_port, metric_sample
from tests.integration.models import log_classifier
from tests.integration.readme import run_line, walk_through
from tests.integration.replicas import inference_replica, service_replica
from tests.integration.test_training_ml import a_spec

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(600)]


@dataclass
class Ctx:
    mesh: Mesh
    registry: registry_pb2_grpc.RegistryServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    auth: list[tuple[str, str]]

    def model(self, favourites: list[int]) -> str:
        """A new model with one version per favourite class; v1 is production."""
        name = f"it-rollout-{secrets.token_hex(3)}"
        for favourite in favourites:
            log_classifier(self.mesh.settings.mlflow_tracking_uri, name, favourite=favourite)
        self.registry.TransitionModelVersion(
            pb.TransitionModelVersionRequest(model_name=name, version=1, stage="production"),
            metadata=self.auth,
        )
        return name

    def start(self, name: str, candidate: int = 0, **fields: object) -> pb.Rollout:
        request = pb.StartRolloutRequest(model_name=name, candidate_version=candidate, **fields)
        return self.registry.StartRollout(request, metadata=self.auth).rollout

    def get(self, rollout_id: str) -> pb.Rollout:
        request = pb.GetRolloutRequest(rollout_id=rollout_id)
        return self.registry.GetRollout(request, metadata=self.auth).rollout

    def wait(self, rollout_id: str, until: Callable[[pb.Rollout], bool], timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.get(rollout_id)
            if until(found):
                return found
            assert time.monotonic() < deadline, f"rollout never got there: {found}"
            time.sleep(0.2)

    def predict(self, name: str, image: np.ndarray, key: str = "") -> ipb.PredictResponse:
        metadata = [*self.auth, (ROUTING_KEY_HEADER, key)] if key else self.auth
        request = ipb.PredictRequest(image=image.tolist(), model_name=name)
        return self.inference.Predict(request, metadata=metadata)


@pytest.fixture(scope="module")
def ctx(mesh: Mesh, gateway_channel: grpc.Channel, keys: dict[str, str]) -> Ctx:
    return Ctx(
        mesh,
        registry_pb2_grpc.RegistryServiceStub(gateway_channel),
        inference_pb2_grpc.InferenceServiceStub(gateway_channel),
        [("x-api-key", keys["alice"])],
    )


def images(n: int) -> np.ndarray:
    return np.random.default_rng(secrets.randbits(32)).random((n, 784), dtype=np.float32)


def label_of(i: int) -> int:
    """The true label the tests give their i-th image: 0 for 70% of them, 3 for the rest."""
    return 0 if i % 10 < 7 else 3


NO_DECISION = pb.RolloutGuards(min_requests=10**9, max_error_rate=0.5)


def test_bad_rollout_requests_are_refused(ctx: Ctx) -> None:
    name = ctx.model([0, 3])
    canary = {"mode": pb.ROLLOUT_MODE_CANARY, "weight": 20, "guards": NO_DECISION}
    bad: list[tuple[dict, grpc.StatusCode, str]] = [
        ({"candidate": 9, **canary}, grpc.StatusCode.INVALID_ARGUMENT, "unknown"),
        ({"candidate": 2, **canary, "weight": 0}, grpc.StatusCode.INVALID_ARGUMENT,
         "weight must be 1 to 99"),
        ({"candidate": 2, **canary, "weight": 100}, grpc.StatusCode.INVALID_ARGUMENT,
         "weight must be 1 to 99"),
        ({"candidate": 2, "mode": pb.ROLLOUT_MODE_CANARY, "weight": 20},
         grpc.StatusCode.INVALID_ARGUMENT, "guards are required"),
        ({"candidate": 2, **canary, "guards": pb.RolloutGuards(min_requests=10)},
         grpc.StatusCode.INVALID_ARGUMENT, "at least one of"),
        ({"candidate": 2, "weight": 20, "guards": NO_DECISION},
         grpc.StatusCode.INVALID_ARGUMENT, "mode must be"),
        ({"candidate": 1, **canary}, grpc.StatusCode.INVALID_ARGUMENT,
         "production version already"),
        ({"candidate": 2, **canary, "weight_steps": [10]},
         grpc.StatusCode.INVALID_ARGUMENT, "weight_steps must rise"),
        ({"candidate": 2, "mode": pb.ROLLOUT_MODE_SHADOW, "guards": pb.RolloutGuards(
            min_requests=5, max_accuracy_drop=2.0)}, grpc.StatusCode.INVALID_ARGUMENT,
         "max_accuracy_drop must be between"),
    ]  # fmt: skip
    for fields, code, words in bad:
        with pytest.raises(grpc.RpcError) as err:
            ctx.start(name, **fields)
        assert err.value.code() == code, (fields, err.value.details())
        assert words in err.value.details(), (fields, err.value.details())
    first = ctx.start(name, 2, **canary)
    with pytest.raises(grpc.RpcError) as err:
        ctx.start(name, 2, **canary)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first.rollout_id in err.value.details()
    ended = ctx.registry.AbortRollout(
        pb.AbortRolloutRequest(rollout_id=first.rollout_id, reason="test over"),
        metadata=ctx.auth,
    ).rollout
    assert ended.state == pb.ROLLOUT_STATE_ABORTED and "test over" in ended.decision.message
    with pytest.raises(grpc.RpcError) as err:  # ended already
        ctx.registry.AbortRollout(
            pb.AbortRolloutRequest(rollout_id=first.rollout_id), metadata=ctx.auth
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A model without production cannot have a rollout.
    bare = f"it-rollout-{secrets.token_hex(3)}"
    log_classifier(ctx.mesh.settings.mlflow_tracking_uri, bare)
    log_classifier(ctx.mesh.settings.mlflow_tracking_uri, bare, favourite=3)
    with pytest.raises(grpc.RpcError) as err:
        ctx.start(bare, 2, **canary)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no production version" in err.value.details()


def test_canary_split_sticky_feedback_and_rollback_by_accuracy(ctx: Ctx) -> None:
    name = ctx.model([0, 3])
    # The accuracy guard waits for 137 labels per version (the fewest the candidate may get below).
    guards = pb.RolloutGuards(min_requests=100, max_accuracy_drop=0.05, min_feedback=137)
    rollout = ctx.start(name, 2, mode=pb.ROLLOUT_MODE_CANARY, weight=20, guards=guards)
    assert rollout.state == pb.ROLLOUT_STATE_RUNNING and rollout.weight == 20
    n = 1000
    answers = [ctx.predict(name, image) for image in images(n)]
    versions = [a.model_version for a in answers]
    assert set(versions) == {1, 2}
    # Each version answers as it is: v1 class 0, v2 class 3.
    assert all(a.prediction == (0 if a.model_version == 1 else 3) for a in answers)
    share = versions.count(2)
    # 20% of 1,000: mean 200, standard deviation 12.6; 5 of them either side.
    assert 137 <= share <= 263, share
    # A routing key sticks to one version; different keys land on both.
    for key in ("user-1", "user-2", "user-3"):
        seen = {ctx.predict(name, image, key).model_version for image in images(15)}
        assert len(seen) == 1, (key, seen)
    seen = {ctx.predict(name, images(1)[0], f"user-{i}").model_version for i in range(60)}
    assert seen == {1, 2}
    # No labels yet: the accuracy guard waits, whatever the request count.
    time.sleep(2.5)
    assert ctx.get(rollout.rollout_id).state == pb.ROLLOUT_STATE_RUNNING
    # Labels for the first 1,000 answers, in batches; the same ids again are unknown. The
    # candidate's labels go last, so the controller cannot decide before the last batch: until
    # then the candidate has at most 263 - 250 = 13 labels, short of min_feedback.
    labelled = sorted(
        ((a, label_of(i)) for i, a in enumerate(answers)), key=lambda p: p[0].model_version
    )
    for start in range(0, n, 250):
        batch = labelled[start : start + 250]
        reply = ctx.inference.SubmitFeedback(
            ipb.SubmitFeedbackRequest(
                feedback=[ipb.Feedback(prediction_id=a.prediction_id, label=y) for a, y in batch]
            ),
            metadata=ctx.auth,
        )
        assert reply.recorded == len(batch) and not reply.unknown_ids
        assert reply.correct == sum(a.prediction == y for a, y in batch)
    again = ctx.inference.SubmitFeedback(
        ipb.SubmitFeedbackRequest(feedback=[ipb.Feedback(prediction_id=answers[0].prediction_id)]),
        metadata=ctx.auth,
    )
    assert again.recorded == 0 and list(again.unknown_ids) == [answers[0].prediction_id]

    def accuracy(version: int) -> float:
        mine = [(a, y) for a, y in labelled if a.model_version == version]
        return sum(a.prediction == y for a, y in mine) / len(mine)

    ended = ctx.wait(rollout.rollout_id, lambda r: r.state != pb.ROLLOUT_STATE_RUNNING)
    assert ended.state == pb.ROLLOUT_STATE_ROLLED_BACK, ended
    assert ended.production.feedback == n - share and ended.candidate.feedback == share
    assert ended.production.accuracy == pytest.approx(accuracy(1))
    assert ended.candidate.accuracy == pytest.approx(accuracy(2))
    assert 0.6 < accuracy(1) < 0.8 and 0.2 < accuracy(2) < 0.4
    assert ended.decision.guard == "max_accuracy_drop"
    assert ended.decision.candidate_value == pytest.approx(accuracy(2))
    assert ended.decision.production_value == pytest.approx(accuracy(1))
    assert ended.ended_by == "controller"
    # Production goes on serving alone.
    deadline = time.monotonic() + 5
    while {ctx.predict(name, image).model_version for image in images(20)} != {1}:
        assert time.monotonic() < deadline, "the candidate still answers after the rollback"
    events = ctx.registry.ListAuditEvents(
        pb.ListAuditEventsRequest(model_name=name), metadata=ctx.auth
    ).audit_events
    actions = [e.action for e in events]
    assert actions[:2] == ["rollout_rolled_back", "rollout_started"], actions
    assert "max_accuracy_drop" in events[0].note


def test_shadow_is_never_answered_and_rolls_back_by_agreement(ctx: Ctx) -> None:
    name = ctx.model([0, 3])
    scrape = f"http://127.0.0.1:{ctx.mesh.settings.inference_ops_port}/metrics"
    errors_before = metric_sample(httpx.get(scrape).text, "model_errors_total", model_name=name)
    guards = pb.RolloutGuards(min_requests=50, min_agreement=0.9)
    rollout = ctx.start(name, 2, mode=pb.ROLLOUT_MODE_SHADOW, guards=guards)
    shown = images(60)
    answers = [ctx.predict(name, image) for image in shown]
    assert {a.model_version for a in answers} == {1}
    # What the candidate says on the same images, asked directly.
    own = ctx.inference.PredictBatch(
        ipb.PredictBatchRequest(
            images=[ipb.Image(pixels=i.tolist()) for i in shown], model_name=name,
            model_version="2",
        ),
        metadata=ctx.auth,
    ).predictions  # fmt: skip
    expected = sum(a.prediction == o.prediction for a, o in zip(answers, own, strict=True)) / 60
    ended = ctx.wait(rollout.rollout_id, lambda r: r.state != pb.ROLLOUT_STATE_RUNNING)
    assert ended.state == pb.ROLLOUT_STATE_ROLLED_BACK, ended
    assert ended.decision.guard == "min_agreement"
    assert ended.shadow.agreement == pytest.approx(expected)
    assert ended.decision.candidate_value == pytest.approx(expected)
    assert ended.shadow.compared >= 50 and ended.production.errors == 0
    errors_after = metric_sample(httpx.get(scrape).text, "model_errors_total", model_name=name)
    assert errors_after == errors_before


def test_good_canary_is_promoted_and_a_fresh_watch_shows_it(
    ctx: Ctx, rest: httpx.Client, keys: dict[str, str]
) -> None:
    name = ctx.model([0, 3, 0])  # v3 answers as v1 does
    guards = pb.RolloutGuards(min_requests=30, max_error_rate=0.0, max_p99_latency_ms=5000)
    rollout = ctx.start(
        name, 3, mode=pb.ROLLOUT_MODE_CANARY, weight=10, weight_steps=[50],
        step_interval_seconds=1.0, guards=guards,
    )  # fmt: skip
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            ctx.predict(name, images(1)[0])

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    lines = []
    try:
        with rest.stream(
            "GET", f"/v1/rollouts/{rollout.rollout_id}:watch",
            headers={"x-api-key": keys["alice"]}, timeout=120,
        ) as resp:  # fmt: skip
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.strip():
                    lines.append(json.loads(line)["rollout"])
    finally:
        stop.set()
        sender.join(30)
    assert lines[0]["state"] == "ROLLOUT_STATE_RUNNING" and lines[0]["weight"] == 10
    assert any(line["weight"] == 50 for line in lines), [line["weight"] for line in lines]
    final = lines[-1]
    assert final["state"] == "ROLLOUT_STATE_PROMOTED", final
    assert final["decision"]["guard"] == "all_guards"
    found = ctx.registry.GetModelVersion(
        pb.GetModelVersionRequest(name=name, alias="production"), metadata=ctx.auth
    ).model_version
    assert found.version == 3
    event = ctx.registry.ListAuditEvents(
        pb.ListAuditEventsRequest(model_name=name), metadata=ctx.auth
    ).audit_events[0]
    assert (event.action, event.version, event.client) == (
        "transition",
        3,
        f"rollout {rollout.rollout_id}",
    )
    assert "promoted" in event.note


def test_manual_transition_ends_the_rollout(ctx: Ctx) -> None:
    name = ctx.model([0, 3])
    rollout = ctx.start(name, 2, mode=pb.ROLLOUT_MODE_CANARY, weight=30, guards=NO_DECISION)
    ctx.registry.TransitionModelVersion(
        pb.TransitionModelVersionRequest(model_name=name, version=2, stage="production"),
        metadata=ctx.auth,
    )
    ended = ctx.get(rollout.rollout_id)
    assert ended.state == pb.ROLLOUT_STATE_SUPERSEDED
    assert "transition of v2 to Production" in ended.decision.message
    events = ctx.registry.ListAuditEvents(
        pb.ListAuditEventsRequest(model_name=name), metadata=ctx.auth
    ).audit_events
    assert [e.action for e in events[:2]] == ["transition", "rollout_superseded"]
    assert rollout.rollout_id in events[0].note
    listed = ctx.registry.ListRollouts(
        pb.ListRolloutsRequest(model_name=name), metadata=ctx.auth
    ).rollouts
    assert [r.rollout_id for r in listed] == [rollout.rollout_id]


def test_a_fresh_replica_carries_on_mid_rollout(ctx: Ctx, tmp_path: Path) -> None:
    """What a restart finds: a new Inference replica follows the running rollout from
    PostgreSQL at once, and what it answered stays in the figures after it is gone; the
    controller decides from them."""
    name = ctx.model([0, 3])
    guards = pb.RolloutGuards(min_requests=40, max_error_rate=0.0)
    rollout = ctx.start(name, 2, mode=pb.ROLLOUT_MODE_CANARY, weight=50, guards=guards)
    settings = ctx.mesh.settings.model_copy(
        update={
            "inference_address": f"127.0.0.1:{free_port()}",
            "inference_ops_port": free_port(),
            "inference_http_port": free_port(),
            "inference_health_port": free_port(),
        }
    )
    with inference_replica(settings, tmp_path / "replica.log"):
        with service_channel(settings, settings.inference_address) as channel:
            replica = inference_pb2_grpc.InferenceServiceStub(channel)
            versions = [
                replica.Predict(
                    ipb.PredictRequest(image=image.tolist(), model_name=name)
                ).model_version
                for image in images(30)
            ]
    assert set(versions) == {1, 2}, versions
    # The figures hold what the replica (now gone) answered.
    seen = ctx.wait(rollout.rollout_id, lambda r: r.candidate.requests == versions.count(2))
    assert seen.state == pb.ROLLOUT_STATE_RUNNING
    assert seen.production.requests == versions.count(1)
    for image in images(100):  # the mesh's own replica, until the guards decide
        if ctx.get(rollout.rollout_id).state != pb.ROLLOUT_STATE_RUNNING:
            break
        ctx.predict(name, image)
    ended = ctx.wait(rollout.rollout_id, lambda r: r.state != pb.ROLLOUT_STATE_RUNNING)
    assert ended.state == pb.ROLLOUT_STATE_PROMOTED, ended
    assert ended.candidate.requests >= 40


def test_another_registry_decides_while_the_first_is_stopped(ctx: Ctx, tmp_path: Path) -> None:
    """A controller's state is all in PostgreSQL and Redis: with the mesh's Registry stopped
    (SIGSTOP) mid-rollout, a second Registry process's controller picks the rollout up and
    promotes the candidate."""
    name = ctx.model([0, 3, 0])  # v3 answers as v1 does
    guards = pb.RolloutGuards(min_requests=30, max_error_rate=0.0)
    rollout = ctx.start(name, 3, mode=pb.ROLLOUT_MODE_CANARY, weight=50, guards=guards)
    for image in images(10):
        ctx.predict(name, image)
    settings = ctx.mesh.settings.model_copy(
        update={
            "registry_address": f"127.0.0.1:{free_port()}",
            "registry_ops_port": free_port(),
            "registry_health_port": free_port(),
        }
    )
    first = ctx.mesh.pids()["registry"]
    with service_replica(settings, "registry", settings.registry_address, tmp_path / "r.log"):
        os.kill(first, signal.SIGSTOP)
        try:
            with service_channel(settings, settings.registry_address) as channel:
                second = registry_pb2_grpc.RegistryServiceStub(channel)
                request = pb.GetRolloutRequest(rollout_id=rollout.rollout_id)
                deadline = time.monotonic() + 60
                while (found := second.GetRollout(request).rollout).state == (
                    pb.ROLLOUT_STATE_RUNNING
                ):
                    assert time.monotonic() < deadline, found
                    ctx.predict(name, images(1)[0])  # Inference, through the gateway
        finally:
            os.kill(first, signal.SIGCONT)
    assert found.state == pb.ROLLOUT_STATE_PROMOTED, found
    assert found.candidate.requests >= 30 and found.ended_by == "controller"
    # The mesh's Registry answers again, and agrees.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert ctx.get(rollout.rollout_id).state == pb.ROLLOUT_STATE_PROMOTED
            break
        except grpc.RpcError as exc:  # the gateway's health check has not seen it back yet
            assert time.monotonic() < deadline, exc
            time.sleep(0.5)


@pytest.mark.slow
def test_the_readme_walk_through_rolls_back_the_weaker_version(
    ctx: Ctx, keys: dict[str, str]
) -> None:
    name = f"it-walk-{secrets.token_hex(3)}"
    # v1, trained well, in production (the README's `make demo` leaves one).
    v1 = train(a_spec(ctx.mesh, model_name=name, train_subset=3000), lambda _: None,
               lambda: False)  # fmt: skip
    assert v1.model_version == 1
    ctx.registry.TransitionModelVersion(
        pb.TransitionModelVersionRequest(model_name=name, version=1, stage="production"),
        metadata=ctx.auth,
    )
    gateway = f"127.0.0.1:{ctx.mesh.settings.gateway_port}"
    env = {**os.environ, "MLMESH_GATEWAY": gateway, "MLMESH_API_KEY": keys["alice"]}
    said = {}
    for line in walk_through("### Safe rollouts"):
        done = run_line(line.replace("mnist-classifier", name), cwd=ROOT, env=env, timeout=300)
        said[line.split()[1] + " " + line.split()[2]] = done.stdout
        print(f"$ {line}\n{done.stdout}")
    watched = said["rollout watch"]
    assert "[rolled_back]" in watched and "max_accuracy_drop broke" in watched, watched
    ended = ctx.registry.ListRollouts(
        pb.ListRolloutsRequest(model_name=name), metadata=ctx.auth
    ).rollouts[0]
    assert ended.decision.guard == "max_accuracy_drop"
    # The traffic script's own count of each version's answers and accuracy: the rollout's
    # final figures are those up to its decision (later answers are production's alone, and
    # a few labels come after it), so they are a part of the script's, close in accuracy.
    traffic = said["scripts/rollout_traffic.py mnist-classifier"]
    for version, figures in ((1, ended.production), (2, ended.candidate)):
        found = re.search(rf"v{version}: answered (\d+), accuracy (\d\.\d+)", traffic)
        assert found, traffic
        assert 100 <= figures.feedback <= int(found.group(1))
        assert figures.accuracy == pytest.approx(float(found.group(2)), abs=0.08)
    assert ended.candidate.accuracy < ended.production.accuracy - 0.02
    assert "rollout_rolled_back" in said["audit --model"]


def test_feedback_over_rest_and_the_open_inference_protocol(
    ctx: Ctx, rest: httpx.Client, keys: dict[str, str]
) -> None:
    name = ctx.model([0])
    key = {"x-api-key": keys["alice"]}
    body = {
        "inputs": [
            {"name": "input-0", "shape": [2, 784], "datatype": "FP32",
             "data": images(2).ravel().tolist()}
        ]
    }  # fmt: skip
    answer = rest.post(f"/v2/models/{name}/infer", json=body, headers=key)
    assert answer.status_code == 200, answer.text
    ids = answer.json()["parameters"]["prediction_id"].split(",")
    assert len(ids) == 2 and all(ids)
    feedback = {"feedback": [{"prediction_id": ids[0], "label": 0},
                             {"prediction_id": ids[1], "label": 5},
                             {"prediction_id": "never-issued", "label": 1}]}  # fmt: skip
    done = rest.post("/v1/feedback", json=feedback, headers=key)
    assert done.status_code == 200, done.text
    assert done.json() == {"recorded": 2, "correct": 1, "unknown_ids": ["never-issued"]}
    for bad, words in (
        ({"feedback": []}, "at least one"),
        ({"feedback": [{"prediction_id": "x", "label": -1}]}, "label must be 0 or more"),
        ({"feedback": [{"prediction_id": "x"}, {"prediction_id": "x"}]}, "given twice"),
        ({"feedback": [{"label": 1}]}, "prediction_id is required"),
    ):
        refused = rest.post("/v1/feedback", json=bad, headers=key)
        assert refused.status_code == 400, (bad, refused.text)
        assert words in refused.json()["message"], refused.text
    assert rest.post("/v1/feedback", json=feedback).status_code == 401
