"""mlmesh.inference.v1.InferenceService: protobuf in, Inference.predict, protobuf out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from mlmesh.inference.v1 import inference_pb2 as pb
from mlmesh.inference.v1 import inference_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.headers import ROUTING_KEY_HEADER
from services.inference import metrics
from services.inference.inputs import Shape, check_batch_size, image_array, image_shape
from services.inference.service import Inference, Predictions

# Answers of one stream being computed at once; later messages wait (flow control).
STREAM_WINDOW = 32


def fresh_requested(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller sent ``cache-control: no-cache``: compute, don't read the cache."""
    for key, value in context.invocation_metadata() or ():
        if key == "cache-control" and "no-cache" in str(value).lower():
            return True
    return False


def routing_key(context: grpc.aio.ServicerContext) -> str:
    """The caller's routing key (x-mlmesh-routing-key): during a canary rollout, the same key
    is answered by the same version."""
    for key, value in context.invocation_metadata() or ():
        if key == ROUTING_KEY_HEADER:
            return str(value)
    return ""


def _fields(p: Predictions, i: int) -> dict[str, object]:
    """The fields of image ``i``'s answer: those of pb.Prediction, which PredictResponse
    repeats (each response is built once from them, never copied from another message)."""
    probabilities = p.probabilities[i]
    best = int(probabilities.argmax())
    return {
        "prediction": best,
        "confidence": float(probabilities[best]),
        "probabilities": probabilities.tolist(),
        "cached": bool(p.cached[i]),
        "class_name": p.class_name(best),
        "prediction_id": p.prediction_ids[i] if i < len(p.prediction_ids) else "",
    }


def _prediction(p: Predictions, i: int) -> pb.Prediction:
    return pb.Prediction(**_fields(p, i))


def _image(image: pb.Image, field: str) -> tuple[np.ndarray, Shape]:
    shape = image_shape(image.height, image.width, image.channels, field)
    return image_array(image.pixels, image.raw, shape, f"{field}.pixels", f"{field}.raw"), shape


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Thin adapter from the generated service to the Inference domain."""

    def __init__(self, inference: Inference, max_batch_images: int) -> None:
        self._inference = inference
        self._max_batch_images = max_batch_images
        # Labels of one SubmitFeedback at most: as many as the answers of a few batches.
        self._max_feedback = 10 * max_batch_images

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        shape = image_shape(request.height, request.width, request.channels, "image")
        image = image_array(request.image, request.image_raw, shape, "image", "image_raw")
        p = await self._inference.classify(
            image[np.newaxis],
            shape,
            request.model_name,
            request.model_version,
            read_cache=not fresh_requested(context),
            routing_key=routing_key(context),
        )
        response = pb.PredictResponse(
            model_name=p.model_name, model_version=p.model_version, **_fields(p, 0)
        )
        metrics.PREDICTION_DURATION.labels("Predict").observe(time.perf_counter() - started)
        return response

    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictBatchResponse:
        started = time.perf_counter()
        check_batch_size(len(request.images), self._max_batch_images, "images")
        decoded = [_image(im, f"images[{i}]") for i, im in enumerate(request.images)]
        shape = decoded[0][1]
        for i, (_, other) in enumerate(decoded):
            if other != shape:
                raise InvalidArgument(
                    f"images[{i}] is {other[0]}x{other[1]}x{other[2]}; images[0] is "
                    f"{shape[0]}x{shape[1]}x{shape[2]}: one batch holds images of one size"
                )
        images = np.stack([image for image, _ in decoded])
        p = await self._inference.classify(
            images,
            shape,
            request.model_name,
            request.model_version,
            read_cache=not fresh_requested(context),
            routing_key=routing_key(context),
        )
        metrics.PREDICTION_DURATION.labels("PredictBatch").observe(time.perf_counter() - started)
        return pb.PredictBatchResponse(
            predictions=[_prediction(p, i) for i in range(len(images))],
            model_name=p.model_name,
            model_version=p.model_version,
        )

    async def LoadModelVersion(
        self, request: pb.LoadModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelVersionResponse:
        loaded = await self._inference.load(request.model_name, request.model_version)
        return pb.LoadModelVersionResponse(
            model_name=loaded.model.name,
            model_version=loaded.model.version,
            runtime=loaded.model.runtime.kind,
            already_loaded=loaded.already_loaded,
        )

    async def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitFeedbackResponse:
        done = await self._inference.feedback(
            [(f.prediction_id, f.label) for f in request.feedback], self._max_feedback
        )
        return pb.SubmitFeedbackResponse(
            recorded=done.recorded, correct=done.correct, unknown_ids=done.unknown_ids
        )

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[pb.PredictStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        """Answers in request order; up to STREAM_WINDOW messages are in flight at once, so
        one stream's images share forward passes."""
        read_cache = not fresh_requested(context)
        key = routing_key(context)
        pending: asyncio.Queue[asyncio.Task[pb.PredictStreamResponse] | None] = asyncio.Queue(
            STREAM_WINDOW
        )

        async def one(request: pb.PredictStreamRequest) -> pb.PredictStreamResponse:
            started = time.perf_counter()
            try:
                image, shape = _image(request.image, "image")
            except InvalidArgument as exc:
                raise InvalidArgument(f"request {request.request_id!r}: {exc}") from exc
            p = await self._inference.classify(
                image[np.newaxis],
                shape,
                request.model_name,
                request.model_version,
                read_cache=read_cache,
                routing_key=key,
            )
            metrics.PREDICTION_DURATION.labels("PredictStream").observe(
                time.perf_counter() - started
            )
            return pb.PredictStreamResponse(
                request_id=request.request_id,
                prediction=_prediction(p, 0),
                model_name=p.model_name,
                model_version=p.model_version,
            )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.create_task(one(request)))
            finally:
                # Also when the request stream fails (an undecodable message): the writer
                # must wake up to surface the failure, or the call would hang.
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
