"""The Inference process: gRPC service, ops HTTP, model events and the periodic alias check."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from mlmesh.oip.v2 import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from services.common.process import Backends, ServiceParts, run_service
from services.common.server import (
    Registration,
    configure_logging,
    configure_mlflow_client,
    server_ssl_context,
)
from services.common.settings import Settings, split_address
from services.inference.cache import PredictionCache, RedisWrites
from services.inference.oip import OpenInference
from services.inference.oip_http import OipHttpServer
from services.inference.oip_servicer import OipServicer
from services.inference.repository import ModelRepository
from services.inference.rollouts import FeedbackStore, RolloutFollower, Tally
from services.inference.service import Inference
from services.inference.servicer import InferenceServicer

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
OIP_SERVICE_NAME = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def build(backends: Backends) -> ServiceParts:
    s = backends.settings
    # One thread runs forward passes, one batch at a time: requests queue behind it and
    # form the next batch (see batching.py).
    forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
    repository = ModelRepository(s, forward, backends.pool)
    tally = Tally(backends.redis)
    writes = RedisWrites(backends.redis)  # the cache's and the feedback store's, batched
    cache = PredictionCache(backends.redis, s.prediction_cache_ttl_s, writes)
    inference = Inference(
        repository,
        cache,
        s.default_model_name,
        RolloutFollower(repository, backends.pool, tally),
        FeedbackStore(backends.redis, s.feedback_retention_s, tally, writes),
        s.shadow_queue_size,
    )
    oip = OpenInference(inference, repository, s.inference_max_batch_images)

    async def warm_up() -> None:
        await repository.warm(s.default_model_name)
        oip.ready = True

    return ServiceParts(
        registrations=[
            Registration(
                InferenceServicer(inference, s.inference_max_batch_images),
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                SERVICE_NAME,
            ),
            Registration(
                OipServicer(oip),
                grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                OIP_SERVICE_NAME,
            ),
        ],
        background=[
            warm_up(),
            repository.follow_events(backends.redis),
            repository.refresh_forever(s.model_refresh_interval_s),
            inference.shadow.run(),
            tally.flush_forever(),
        ],
        closers=[writes.lane.aclose, cache.lane.aclose],
        sites=[
            OipHttpServer(
                oip,
                backends.limiter,
                split_address(s.inference_address)[0],
                s.inference_http_port,
                # JSON spells a tensor in up to about 4 times its bytes (as the gateway allows).
                4 * s.grpc_max_message_bytes,
                s.shutdown_grace_s,
                server_ssl_context(s),
            )
        ],
    )


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    configure_mlflow_client(settings)
    run_service(settings, settings.inference_address, settings.inference_ops_port, build)
