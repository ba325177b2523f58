"""Each process's small HTTP face for operators: /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import asyncpg
import prometheus_client
from aiohttp import web
from redis.asyncio import Redis

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]


def mlflow_check(tracking_uri: str, session: aiohttp.ClientSession) -> Check:
    """A check that the MLflow server answers its /health endpoint."""

    async def check() -> None:
        async with session.get(tracking_uri.rstrip("/") + "/health") as resp:
            if resp.status != 200:
                raise RuntimeError(f"MLflow /health answered {resp.status}")

    return check


def redis_check(redis: Redis) -> Check:
    """A check that Redis answers PING."""

    async def check() -> None:
        await redis.ping()

    return check


def postgres_check(pool: asyncpg.Pool) -> Check:
    """A check that PostgreSQL answers a query."""

    async def check() -> None:
        await pool.fetchval("SELECT 1")

    return check


async def readiness(checks: Mapping[str, Check], timeout_s: float) -> tuple[bool, dict]:
    """Run every check concurrently; report each as connected or disconnected."""

    async def run(name: str, check: Check) -> tuple[str, str | None]:
        try:
            await asyncio.wait_for(check(), timeout_s)
            return name, None
        except Exception as exc:  # any failure means "not ready", with the reason reported
            return name, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    results = await asyncio.gather(*(run(n, c) for n, c in checks.items()))
    ready = all(err is None for _, err in results)
    body: dict = {"status": "ready" if ready else "not_ready"}
    body.update({name: "connected" if err is None else "disconnected" for name, err in results})
    errors = {name: err for name, err in results if err is not None}
    if errors:
        body["errors"] = errors
    return ready, body


class OpsServer:
    """Serves /health (alive), /ready (dependencies) and /metrics (Prometheus) over HTTP."""

    def __init__(self, host: str, port: int, checks: Mapping[str, Check], timeout_s: float) -> None:
        self._host = host
        self._port = port
        self._checks = checks
        self._timeout_s = timeout_s
        self._runner: web.AppRunner | None = None

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def _ready(self, _: web.Request) -> web.Response:
        ready, body = await readiness(self._checks, self._timeout_s)
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("ops HTTP on %s:%d (/health, /ready, /metrics)", self._host, self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
