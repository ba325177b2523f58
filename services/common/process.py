"""The shared shape of an mlmesh service process: backends, gRPC server, ops HTTP, drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import asyncpg
from arq.connections import ArqRedis

from services.common import db
from services.common.limits import parse_limits
from services.common.ops import OpsServer, mlflow_check, postgres_check, redis_check
from services.common.ratelimit import RateLimiter
from services.common.server import (
    GrpcServer,
    Registration,
    run_on_event_loop,
    wait_for_termination,
)
from services.common.settings import Settings, split_address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backends:
    """The clients a service process shares: PostgreSQL, Redis (ARQ-capable), HTTP, and the
    rate limiter on that Redis."""

    settings: Settings
    pool: asyncpg.Pool
    redis: ArqRedis
    http: aiohttp.ClientSession
    limiter: RateLimiter


class Site(Protocol):
    """A server a service runs beside its gRPC server (an HTTP face)."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop taking requests; let those in flight finish within the grace period."""


@dataclass(frozen=True)
class ServiceParts:
    """What a service adds to the shared shape: its servicers, background loops and other
    servers."""

    registrations: Sequence[Registration]
    background: Sequence[Coroutine[Any, Any, None]] = ()
    sites: Sequence[Site] = ()
    closers: Sequence[Callable[[], Awaitable[None]]] = ()  # after the servers drained


@dataclass(frozen=True)
class Serving:
    """A service running in this process."""

    backends: Backends
    parts: ServiceParts
    address: str  # where its gRPC server listens: the port it bound when asked for port 0
    health_address: str  # its plain-text health port, likewise


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    address: str,
    ops_port: int,
    build: Callable[[Backends], ServiceParts],
    *,
    health_address: str = "",
) -> AsyncIterator[Serving]:
    """Run one service in this process while the block runs: its backends, gRPC server, ops
    HTTP, other sites and background loops. On exit, drain RPCs and close every client.

    ``serve_process`` holds it until SIGTERM; a test holds it around its calls, on free
    ports (``address`` and ``health_address`` "127.0.0.1:0"; ``Serving.address`` and
    ``Serving.health_address`` say which it got). The health port defaults to the service's
    own (Settings.health_address).
    """
    async with contextlib.AsyncExitStack() as stack:
        pool = await db.connect_pool(settings.database_url)
        stack.push_async_callback(pool.close)
        # Connects lazily: a Redis outage at start-up degrades /ready instead of the process.
        redis = ArqRedis.from_url(settings.redis_url, socket_timeout=settings.readiness_timeout_s)
        stack.push_async_callback(redis.aclose)
        timeout = aiohttp.ClientTimeout(total=settings.readiness_timeout_s)
        http = aiohttp.ClientSession(timeout=timeout)
        stack.push_async_callback(http.close)
        limiter = RateLimiter(redis, parse_limits(settings.rate_limits))
        backends = Backends(settings, pool, redis, http, limiter)
        parts = build(backends)
        for close in parts.closers:
            stack.push_async_callback(close)
        server = GrpcServer(settings, address, parts.registrations, limiter, health_address)
        ops = OpsServer(
            split_address(address)[0],
            ops_port,
            {
                "mlflow": mlflow_check(settings.mlflow_tracking_uri, http),
                "redis": redis_check(redis),
                "postgres": postgres_check(pool),
            },
            settings.readiness_timeout_s,
        )
        await ops.start()
        stack.push_async_callback(ops.stop)
        sites: list[Site] = []
        stack.push_async_callback(_drain, server, sites)
        await server.start()
        for site in parts.sites:
            await site.start()
            sites.append(site)
        tasks = [asyncio.create_task(job) for job in parts.background]
        stack.push_async_callback(_cancel, tasks)
        host = split_address(address)[0]
        yield Serving(backends, parts, f"{host}:{server.port}", f"{host}:{server.health_port}")


async def _drain(server: GrpcServer, sites: Sequence[Site]) -> None:
    # Every face drains at once, within the same grace period.
    await asyncio.gather(server.stop(), *(site.stop() for site in sites))


async def _cancel(tasks: Sequence[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve_process(
    settings: Settings, address: str, ops_port: int, build: Callable[[Backends], ServiceParts]
) -> None:
    """Run one service until SIGTERM/SIGINT, then drain RPCs and close every client."""
    async with serving(settings, address, ops_port, build):
        # What start-up made (torch, MLflow, protobuf modules: millions of objects) lives as
        # long as the process; frozen, the collector stops walking it, so a full collection
        # no longer stalls requests for a few hundred milliseconds.
        gc.collect()
        gc.freeze()
        await wait_for_termination()


def run_service(
    settings: Settings, address: str, ops_port: int, build: Callable[[Backends], ServiceParts]
) -> None:
    """A service process's entrypoint: ``serve_process`` on the event loop the settings name
    (uvloop by default)."""
    run_on_event_loop(settings.event_loop, serve_process(settings, address, ops_port, build))
