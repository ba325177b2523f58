"""The Inference domain: a version's inputs in, its outputs out, through cache and batcher.

Every protocol face calls here: the Open Inference Protocol (any model, its tensors as its
contract names them) with ``answer``, and mlmesh's own Predict RPCs (image classifiers) with
``classify``. Caching, batching, drift, model resolution, errors and metrics live only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from redis.exceptions import RedisError

from services.common.errors import FailedPrecondition, Internal, InvalidArgument
from services.common.rollouts import CANARY, SHADOW, Rollout
from services.inference import metrics
from services.inference.cache import PredictionCache, cache_keys, decode_outputs, encode_outputs
from services.inference.inputs import DEFAULT_SHAPE, IMAGE_PIXELS, Shape
from services.inference.repository import LoadedModel, ModelRepository, parse_version
from services.inference.rollouts import (
    CANDIDATE,
    PRODUCTION,
    FeedbackStore,
    Labelled,
    RolloutFollower,
    ShadowQueue,
    canary_picks_candidate,
    classes_of,
)
from services.inference.runtime import ModelRaised

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A version made ready to serve, and whether it was in memory already."""

    model: LoadedModel
    already_loaded: bool


@dataclass(frozen=True)
class Routed:
    """The version that answers a request, and the rollout that chose it (if any)."""

    model: LoadedModel
    rollout: Rollout | None = None
    role: str = ""  # production or candidate, during a rollout
    shadow: LoadedModel | None = None  # the candidate that also computes it (shadow)


@dataclass(frozen=True)
class Answer:
    """A version's answers to one request."""

    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray]  # the outputs asked for, every row
    cached: np.ndarray  # (rows,) bool, or (1,) for a model without a batch dimension
    prediction_ids: tuple[str, ...] = ()  # one per row (one for an unbatched model)


@dataclass(frozen=True)
class Predictions:
    """An image classifier's answers for a batch of images, and the version that gave them."""

    model_name: str
    model_version: int
    probabilities: np.ndarray  # (N, classes) float32
    cached: np.ndarray  # (N,) bool
    class_names: tuple[str, ...] = ()  # the model's own, in class order; empty when unnamed
    prediction_ids: tuple[str, ...] = ()  # one per image, for SubmitFeedback

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else ""


class Inference:
    """Answers requests for the registered models the repository resolves."""

    def __init__(
        self,
        repository: ModelRepository,
        cache: PredictionCache,
        default_model_name: str,
        rollouts: RolloutFollower,
        feedback: FeedbackStore,
        shadow_queue_size: int,
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._default_model_name = default_model_name
        self._rollouts = rollouts
        self._feedback = feedback
        self.shadow = ShadowQueue(rollouts, self._shadow_compute, shadow_queue_size)

    async def route(self, model_name: str, model_version: str, routing_key: str = "") -> Routed:
        """The version that answers for ``model_name`` at ``model_version``: the one asked
        for, or, when production is asked for during a rollout, the one the rollout picks
        (canary: the candidate for its weight's share, sticky by ``routing_key``; shadow:
        production, with the candidate computing it too)."""
        name = model_name.strip() or self._default_model_name
        model = await self._repository.model(name, model_version)
        if model_version.strip():
            return Routed(model)
        rollout = await self._rollouts.running(name)
        # A rollout of another production (an alias moved meanwhile) is not followed.
        if rollout is None or rollout.production_version != model.version:
            return Routed(model)
        candidate = await self._repository.get(name, rollout.candidate_version)
        if rollout.mode == CANARY and canary_picks_candidate(rollout, routing_key):
            return Routed(candidate, rollout, CANDIDATE)
        return Routed(model, rollout, PRODUCTION, candidate if rollout.mode == SHADOW else None)

    async def answer(
        self,
        routed: Routed,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        *,
        read_cache: bool = True,
    ) -> Answer:
        """The answer to a routed request: timed and counted in its rollout's figures,
        shadowed when the rollout says so, and its answers kept for feedback."""
        model, rollout = routed.model, routed.rollout
        started = time.perf_counter()
        try:
            answer, stored = await self._infer(model, inputs, outputs, read_cache)
        except Internal:
            if rollout is not None:
                self._rollouts.record(rollout, model, routed.role,
                                      time.perf_counter() - started, True)  # fmt: skip
            raise
        if rollout is not None:
            self._rollouts.record(rollout, model, routed.role, time.perf_counter() - started,
                                  False)  # fmt: skip
            if routed.shadow is not None:
                self.shadow.offer(rollout, routed.shadow, inputs, answer.outputs)
        rows = len(answer.cached)
        ids = self._feedback.new_ids(rows)
        role = routed.role or (
            PRODUCTION if self._repository.production_version(model.name) == model.version
            else ""
        )  # fmt: skip
        classes = classes_of(answer.outputs) if model.contract.batched else None
        # One pipeline carries both; awaited, so that the caller's next request finds its
        # answer cached and its id known. A failure was logged and counted by its owner.
        writes = {
            w
            for w in (
                self._cache.stage(stored),
                self._feedback.stage(ids, model, classes, role, rollout),
            )
            if w is not None
        }
        for written in writes:
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(written)
        return Answer(answer.model_name, answer.model_version, answer.outputs, answer.cached,
                      tuple(ids))  # fmt: skip

    async def feedback(self, labels: Sequence[tuple[str, int]], max_batch: int) -> Labelled:
        """Score true labels against the answers their prediction ids name."""
        return await self._feedback.label(labels, max_batch)

    async def _shadow_compute(
        self, model: LoadedModel, inputs: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]:
        """A shadow request on the candidate: computed fresh, not cached, not counted as
        answered (model_predictions_total)."""
        rows = len(next(iter(inputs.values()))) if model.contract.batched else None
        return await self._compute(model, inputs, rows, list(range(rows or 1)))

    async def model(self, model_name: str, model_version: str) -> LoadedModel:
        """The loaded version ``model_version`` ("" = production) of ``model_name`` (""
        = the default model)."""
        name = model_name.strip() or self._default_model_name
        return await self._repository.model(name, model_version)

    async def load(self, model_name: str, model_version: str) -> Loaded:
        """Load ``model_name`` at ``model_version`` (a number or an alias) if it is not held
        yet; FailedPrecondition says why a version cannot be served."""
        name = model_name.strip() or self._default_model_name
        version = await self._repository.resolve(name, parse_version(model_version))
        already = self._repository.holds(name, version)
        return Loaded(await self._repository.get(name, version), already)

    async def _infer(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        read_cache: bool,
    ) -> tuple[Answer, list[tuple[str, bytes]]]:
        """``model``'s outputs (those named, or all) for ``inputs``, checked against its
        contract already, and the cache entries to store for the answers computed.
        ``read_cache=False`` computes fresh answers (still to be stored)."""
        wanted = [model.contract.output(n).name for n in outputs] or [
            o.name for o in model.contract.outputs
        ]
        rows = len(next(iter(inputs.values()))) if model.contract.batched else None
        model.observe(inputs)
        keys = cache_keys(model.cache_scope, inputs, wanted, rows)
        # While the cache is read, a batch forming for this version may wait for this request.
        model.batcher.expect()
        try:
            found = await self._cache.get_many(keys) if read_cache else [None] * len(keys)
        finally:
            model.batcher.arrived()
        answers = [decode_outputs(v) if v is not None else None for v in found]
        missing = [i for i, a in enumerate(answers) if a is None]
        stored: list[tuple[str, bytes]] = []
        if missing:
            computed = await self._compute(model, inputs, rows, missing)
            if rows is None:
                answers[0] = computed
                stored.append((keys[0], encode_outputs({n: computed[n] for n in wanted})))
            else:
                for j, i in enumerate(missing):
                    answers[i] = {n: computed[n][j] for n in wanted}
                    stored.append((keys[i], encode_outputs(answers[i])))
        if missing and len(missing) == len(answers) and rows is not None:
            result = {n: computed[n] for n in wanted}  # nothing cached: no re-stacking
        elif rows is None:
            result = {n: answers[0][n] for n in wanted}  # type: ignore[index]
        else:
            result = {n: np.stack([a[n] for a in answers]) for n in wanted}  # type: ignore[index]
        cached = np.ones(len(answers), dtype=bool)
        cached[missing] = False
        name = model.name
        if len(answers) - len(missing):
            metrics.CACHE_HITS.labels(name).inc(len(answers) - len(missing))
        if missing:
            metrics.CACHE_MISSES.labels(name).inc(len(missing))
        metrics.PREDICTIONS.labels(*model.labels).inc(len(answers))
        return Answer(name, model.version, result, cached), stored

    async def classify(
        self,
        images: np.ndarray,
        shape: Shape,
        model_name: str,
        model_version: str,
        *,
        read_cache: bool = True,
        routing_key: str = "",
    ) -> Predictions:
        """Class probabilities of ``images`` ((N, height x width x channels) float32 in [0, 1],
        rows row-major with channels last, each of ``shape``) by an image classifier: a
        version that takes one FP32 image tensor a row and answers one numeric tensor of
        class scores a row."""
        routed = await self.route(model_name, model_version, routing_key)
        model = routed.model
        contract = model.contract
        image = contract.inputs[0] if len(contract.inputs) == 1 else None
        scores = contract.outputs[0] if len(contract.outputs) == 1 else None
        layout = _image_layout(image.shape[1:], contract.image_shape) if image else None
        if (
            image is None
            or scores is None
            or layout is None
            or not contract.batched
            or image.datatype != "FP32"
            or scores.datatype in ("BYTES", "BOOL")
            or len(scores.shape) != 2
        ):
            raise FailedPrecondition(
                f"model {model.name!r} version {model.version} is not an image classifier "
                f"({contract.describe()}); ask it through the Open Inference Protocol "
                f"(/v2/models/{model.name}/infer)"
            )
        takes, channels_first = layout
        if shape != takes:
            raise InvalidArgument(
                f"the image is {_describe(shape)}; model {model.name!r} version "
                f"{model.version} takes {_describe(takes)} images (resize it first: "
                "mlmesh predict --image FILE --resize)"
            )
        batch = images.reshape((len(images), *takes))
        if channels_first:
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        batch = batch.reshape((len(images), *image.shape[1:]))
        answer = await self.answer(
            routed, {image.name: batch}, [scores.name], read_cache=read_cache
        )
        probabilities = answer.outputs[scores.name].astype(np.float32, copy=False)
        return Predictions(
            model.name,
            model.version,
            probabilities,
            answer.cached,
            contract.class_names,
            answer.prediction_ids,
        )

    async def _compute(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        rows: int | None,
        missing: list[int],
    ) -> dict[str, np.ndarray]:
        if rows is not None and len(missing) != rows:
            inputs = {n: a[missing] for n, a in inputs.items()}
        try:
            return await model.batcher.predict(inputs, len(missing) if rows is not None else 1)
        except ModelRaised as exc:
            metrics.MODEL_ERRORS.labels(*model.labels).inc()
            log.error("model %r version %d failed on a request: %s", model.name, model.version,
                      exc)  # fmt: skip
            raise Internal(f"model {model.name!r} version {model.version} failed: {exc}") from exc


def _image_layout(trailing: tuple[int, ...], declared: Shape | None) -> tuple[Shape, bool] | None:
    """The (height, width, channels) images a model's input takes, and whether it wants them
    channels first; None when the input is not an image of known size. A flat input needs
    the size the model declares (mlmesh's models do), or is MNIST's 784 values."""
    if -1 in trailing or not trailing:
        return None
    if len(trailing) == 1:
        size = trailing[0]
        if declared is not None and declared[0] * declared[1] * declared[2] == size:
            return declared, False
        return (DEFAULT_SHAPE, False) if size == IMAGE_PIXELS else None
    if len(trailing) == 2:
        return (trailing[0], trailing[1], 1), False
    if len(trailing) == 3 and trailing[2] in (1, 3):
        return (trailing[0], trailing[1], trailing[2]), False
    if len(trailing) == 3 and trailing[0] in (1, 3):
        return (trailing[1], trailing[2], trailing[0]), True
    return None


def _describe(shape: Shape) -> str:
    return f"{shape[0]}x{shape[1]} {'RGB' if shape[2] == 3 else 'grey'}"
