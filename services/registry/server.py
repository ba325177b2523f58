"""The Registry process: wires settings to the store, database, Redis and gRPC server."""

from __future__ import annotations

import asyncio
import logging
import os

import aiohttp
from redis.asyncio import Redis

from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common import db
from services.common.ops import OpsServer, mlflow_check, postgres_check, redis_check
from services.common.server import (
    GrpcServer,
    Registration,
    configure_logging,
    wait_for_termination,
)
from services.common.settings import Settings, split_address
from services.registry.registry import Registry
from services.registry.servicer import RegistryServicer
from services.registry.store import MlflowStore

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def configure_mlflow_client(settings: Settings) -> None:
    """Bound MLflow's REST retries so a down MLflow gives UNAVAILABLE fast, not a hang.

    The MLflow client reads these from the environment on every request; the entrypoint is
    the one place that sets them.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(settings.mlflow_request_timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.mlflow_request_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


async def serve(settings: Settings) -> None:
    """Run the Registry until SIGTERM/SIGINT, then drain and close everything."""
    pool = await db.connect_pool(settings.database_url)
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.readiness_timeout_s)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.readiness_timeout_s))
    registry = Registry(MlflowStore(settings.mlflow_tracking_uri), pool, redis)
    server = GrpcServer(
        settings,
        settings.registry_address,
        [
            Registration(
                RegistryServicer(registry),
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                SERVICE_NAME,
            )
        ],
    )
    ops = OpsServer(
        split_address(settings.registry_address)[0],
        settings.registry_ops_port,
        {
            "mlflow": mlflow_check(settings.mlflow_tracking_uri, http),
            "redis": redis_check(redis),
            "postgres": postgres_check(pool),
        },
        settings.readiness_timeout_s,
    )
    try:
        await ops.start()
        await server.start()
        await wait_for_termination()
    finally:
        await server.stop()
        await ops.stop()
        await http.close()
        await redis.aclose()
        await pool.close()


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    configure_mlflow_client(settings)
    asyncio.run(serve(settings))
