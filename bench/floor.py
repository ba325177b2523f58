"""The transport floor: the Inference service's prediction RPCs answered with fixed responses.

    python -m bench.floor --address HOST:PORT --health-port PORT --http-port PORT

The bench (bench/predict.py) runs this behind an Envoy rendered from the same configuration
as the mesh's gateway (the API-key check, the Lua filter, the transcoder, mutual TLS to the
upstream), so that what mlmesh's rows cost beyond it is what the Inference service does. It
takes the settings (MLMESH_*) as the services do, for the mesh's certificates and the message
size limits, and serves on the same stack as the Inference service (one grpc.aio server,
mutual TLS, health and reflection; aiohttp for the Open Inference Protocol's REST face), but
without mlmesh's interceptor, model, cache, limiter or batcher: each request is parsed, then
answered with a response built once at start, as large as an MNIST answer.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
from aiohttp import web

from mlmesh.inference.v1 import inference_pb2 as pb
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.oip.v2 import grpc_predict_v2_pb2 as oip
from mlmesh.oip.v2 import grpc_predict_v2_pb2_grpc
from services.common.server import (
    GrpcServer,
    Registration,
    run_on_event_loop,
    server_ssl_context,
    wait_for_termination,
)
from services.common.settings import Settings, split_address

log = logging.getLogger("bench.floor")

CLASSES = 10
PROBABILITIES = [0.01] * (CLASSES - 1) + [0.91]


class FloorInference(inference_pb2_grpc.InferenceServiceServicer):
    """Predict and PredictBatch: one fixed answer per image, whatever the images."""

    def __init__(self) -> None:
        fields = {
            "prediction": CLASSES - 1,
            "confidence": PROBABILITIES[-1],
            "probabilities": PROBABILITIES,
            "prediction_id": "0" * 24,
        }
        self.predict_response = pb.PredictResponse(model_name="floor", model_version=1, **fields)
        self._prediction = pb.Prediction(**fields)

    async def Predict(self, request: pb.PredictRequest, context: object) -> pb.PredictResponse:
        return self.predict_response

    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: object
    ) -> pb.PredictBatchResponse:
        return pb.PredictBatchResponse(
            predictions=[self._prediction] * len(request.images),
            model_name="floor",
            model_version=1,
        )


class FloorOpenInference(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer: 10 FP32 scores a row, raw, for as many rows as the first input has."""

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: object
    ) -> oip.ModelInferResponse:
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        return oip.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            outputs=[
                oip.ModelInferResponse.InferOutputTensor(
                    name="output-0", datatype="FP32", shape=[rows, CLASSES]
                )
            ],
            raw_output_contents=[np.tile(np.float32(PROBABILITIES), rows).tobytes()],
        )


def oip_http_app() -> web.Application:
    """/v2/models/{name}/infer answering one fixed JSON body; the health routes Envoy asks."""
    body = json.dumps(
        {
            "model_name": "floor",
            "model_version": "1",
            "outputs": [
                {
                    "name": "output-0",
                    "datatype": "FP32",
                    "shape": [1, CLASSES],
                    "data": PROBABILITIES,
                }
            ],
        }
    ).encode()

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    app.router.add_get("/v2/health/live", ok)
    app.router.add_get("/v2/health/ready", ok)
    return app


async def serve(settings: Settings, address: str, health_port: int, http_port: int) -> None:
    host = split_address(address)[0]
    server = GrpcServer(
        settings,
        address,
        [
            Registration(
                FloorInference(),
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            ),
            Registration(
                FloorOpenInference(),
                grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            ),
        ],
        health_address=f"{host}:{health_port}",
        interceptors=(),
    )
    await server.start()
    runner = web.AppRunner(oip_http_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, http_port, ssl_context=server_ssl_context(settings))
    await site.start()
    log.info("floor serving gRPC on %s, /v2 on %s:%d", address, host, http_port)
    try:
        await wait_for_termination()
    finally:
        await runner.cleanup()
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--health-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    # On the event loop the services run on (MLMESH_EVENT_LOOP).
    run_on_event_loop(settings.event_loop, serve(settings, args.address, args.health_port,
                                                 args.http_port))  # fmt: skip


if __name__ == "__main__":
    main()
