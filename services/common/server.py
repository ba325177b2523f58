"""One lifecycle for every mlmesh gRPC process: build, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.interceptors import ServiceInterceptor
from services.common.ratelimit import RateLimiter
from services.common.settings import MESH_SERVICE_NAME, MeshTlsFiles, Settings, split_address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A servicer, the generated function that adds it, and its full service name."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    service_name: str


# -- mutual TLS: the services take requests only from holders of a certificate of the mesh's CA


class MeshTlsMissing(RuntimeError):
    """The mesh's certificates are not where the settings say; the message says what to do."""


def _read_mesh_tls(files: MeshTlsFiles, *paths: Any) -> list[bytes]:
    missing = files.missing(*paths)
    if missing:
        raise MeshTlsMissing(
            f"the mesh's certificates are missing ({', '.join(map(str, missing))}): the "
            "services take requests only over mutual TLS. `make up` makes them in "
            "STATE_DIR/mtls; elsewhere run `python -m services.launcher mesh-certs --dir DIR` "
            "and point MLMESH_MTLS_DIR at DIR"
        )
    return [path.read_bytes() for path in paths]


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """A service's gRPC server credentials: its certificate, and a client certificate of the
    mesh's CA required of every caller (the gateway, another service)."""
    files = settings.mesh_tls
    ca, cert, key = _read_mesh_tls(files, files.ca_cert, files.service_cert, files.service_key)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The same for an HTTP face (aiohttp): TLS, and a client certificate required."""
    files = settings.mesh_tls
    _read_mesh_tls(files, files.ca_cert, files.service_cert, files.service_key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca_cert)
    context.load_cert_chain(files.service_cert, files.service_key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials:
    """Credentials for a call to a service of the mesh (the Registry's to the Inference
    service; an operator's or a test's): the services' certificate as the client's, the
    mesh's CA as the only one trusted. Use with CHANNEL_OPTIONS."""
    files = settings.mesh_tls
    ca, cert, key = _read_mesh_tls(files, files.ca_cert, files.service_cert, files.service_key)
    return grpc.ssl_channel_credentials(ca, key, cert)


# Service certificates name who a service is (MESH_SERVICE_NAME), not where it listens: a
# client checks that name whatever address it dials.
CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", MESH_SERVICE_NAME),)


def service_channel(
    settings: Settings, address: str, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to the service at ``address`` over the mesh's mutual TLS."""
    return grpc.secure_channel(
        address, channel_credentials(settings), options=[*CHANNEL_OPTIONS, *options]
    )


def aio_service_channel(settings: Settings, address: str) -> grpc.aio.Channel:
    """An asyncio channel to the service at ``address`` over the mesh's mutual TLS."""
    return grpc.aio.secure_channel(address, channel_credentials(settings), options=CHANNEL_OPTIONS)


class GrpcServer:
    """Owns one grpc.aio server: interceptors, health, reflection, start and graceful stop.

    It listens on ``address`` over mutual TLS (server_credentials) and, in plain text, on its
    health port (Settings.health_address), where only health checks and reflection answer
    (the interceptor refuses every other call that came without a client certificate):
    probes (Kubernetes', the launcher's, compose's) carry no certificate.
    """

    def __init__(
        self,
        settings: Settings,
        address: str,
        registrations: Sequence[Registration],
        limiter: RateLimiter | None = None,
        health_address: str = "",
        interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    ) -> None:
        self._settings = settings
        self._address = address
        # Its own health port by default; a test serving on port 0 asks for port 0 here too.
        self._health_address = health_address or settings.health_address(address)
        self._registrations = registrations
        self._health = health.aio.HealthServicer()
        limit = settings.grpc_max_message_bytes
        self._server = grpc.aio.server(
            # mlmesh's own (identity, limits, errors, access log, metrics) unless told otherwise:
            # bench/floor.py serves without any, to measure the transport alone.
            interceptors=(
                [ServiceInterceptor(limiter, settings.prediction_log_every)]
                if interceptors is None
                else list(interceptors)
            ),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        self.port = 0
        self.health_port = 0

    async def start(self) -> None:
        """Register everything, bind and start serving; health turns SERVING last."""
        for reg in self._registrations:
            reg.add_to_server(reg.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [r.service_name for r in self._registrations]
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port = self._server.add_secure_port(self._address, server_credentials(self._settings))
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC server to {self._address}")
        self.health_port = self._server.add_insecure_port(self._health_address)
        if self.health_port == 0:
            raise RuntimeError(f"could not bind the health port {self._health_address}")
        await self._server.start()
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC serving %s on %s (mutual TLS), health on %s (plain text)",
            ", ".join(names),
            self._address,
            f"{split_address(self._health_address)[0]}:{self.health_port}",
        )

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


def run_on_event_loop(event_loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to the end on the event loop named (MLMESH_EVENT_LOOP): ``uvloop``
    (libuv, in C) or ``asyncio`` (Python's own)."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


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
