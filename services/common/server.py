"""One lifecycle for every mlmesh gRPC process: build, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.interceptors import ServiceInterceptor
from services.common.ratelimit import RateLimiter
from services.common.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A servicer, the generated function that adds it, and its full service name."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    service_name: str


class GrpcServer:
    """Owns one grpc.aio server: interceptors, health, reflection, start and graceful stop."""

    def __init__(
        self,
        settings: Settings,
        address: str,
        registrations: Sequence[Registration],
        limiter: RateLimiter | None = None,
    ) -> None:
        self._settings = settings
        self._address = address
        self._registrations = registrations
        self._health = health.aio.HealthServicer()
        limit = settings.grpc_max_message_bytes
        self._server = grpc.aio.server(
            interceptors=[ServiceInterceptor(limiter)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        self.port = 0

    async def start(self) -> None:
        """Register everything, bind and start serving; health turns SERVING last."""
        for reg in self._registrations:
            reg.add_to_server(reg.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [r.service_name for r in self._registrations]
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port = self._server.add_insecure_port(self._address)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC server to {self._address}")
        await self._server.start()
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC serving %s on %s", ", ".join(names), self._address)

    async def stop(self) -> None:
        """Flip health to NOT_SERVING, then let in-flight RPCs finish within the grace period."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._settings.shutdown_grace_s)
        log.info("gRPC server on %s stopped", self._address)


async def wait_for_termination() -> None:
    """Return when the process receives SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("termination signal received")


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once, at a process's entrypoint."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # a library imported earlier may have installed a handler already
    )


def configure_mlflow_client(settings: Settings) -> None:
    """Bound MLflow's REST retries so a down MLflow gives UNAVAILABLE fast, not a hang.

    The MLflow client reads these from the environment on every request; the entrypoint is
    the one place that sets them.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(settings.mlflow_request_timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.mlflow_request_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    # MLflow's telemetry thread sets and unsets an environment variable while requests, on
    # another thread, iterates os.environ: a trial once failed on that KeyError. (It would
    # only try to reach the internet anyway.) Training processes inherit this.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
