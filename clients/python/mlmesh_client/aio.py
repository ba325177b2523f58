"""The SDK for asyncio: ``AsyncClient`` makes ``Client``'s calls on a grpc.aio channel.

>>> async with AsyncClient("127.0.0.1:8000", api_key="...") as mesh:
...     answer = await mesh.predict(image)
...     async for event in mesh.watch_training_job(job_id):
...         ...

Every method of ``Client`` is here with the same arguments: unary ones return an awaitable
of what ``Client``'s return, ``watch_*`` and ``predict_stream`` an async iterator; deadlines,
retries and errors are the same (mlmesh_client.api writes each call once for both).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import grpc

from mlmesh.training.v1 import sweep_pb2 as sweeps
from mlmesh.training.v1 import training_pb2 as training
from mlmesh_client.api import DEFAULT_TIMEOUT_S, Call, MeshApi, Requests, Send, channel_credentials
from mlmesh_client.retry import RetryPolicy


def aio_gateway_channel(
    target: str, *, tls: bool = False, ca_file: str | os.PathLike[str] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to the gateway, as ``gateway_channel`` makes a sync one."""
    credentials = channel_credentials(tls, ca_file)
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


class AsyncClient(MeshApi):
    """mlmesh through its gateway, for asyncio; the arguments are ``Client``'s. Make it inside
    the event loop that uses it (a grpc.aio channel belongs to one loop)."""

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        *,
        tls: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        def channel(target: str) -> grpc.aio.Channel:
            return aio_gateway_channel(target, tls=tls, ca_file=ca_file)

        super().__init__(target, api_key, timeout_s, retry, channel)

    async def _run(self, call: Call) -> Any:
        plan = self._plan(call)
        outcome = None
        try:
            while True:
                outcome = await self._do(call, plan.send(outcome))
        except StopIteration as done:
            return done.value

    async def _do(self, call: Call, step: Send | float) -> Any:
        if not isinstance(step, Send):
            await asyncio.sleep(step)
            return None
        method = self._method(call)
        try:
            return await method(step.request, metadata=self._metadata(), timeout=step.timeout_s)
        except grpc.RpcError as err:
            return err

    async def _stream(self, call: Call) -> AsyncIterator:
        """A server-streaming call's answers; leaving the loop early cancels the call."""
        stream = self._method(call)(call.request, metadata=self._metadata())
        try:
            async for answer in stream:
                yield answer
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            stream.cancel()
        Requests.raise_error(call.request)

    async def train(
        self,
        on_event: Callable[[training.WatchTrainingJobResponse], None] | None = None,
        **fields: object,
    ) -> training.TrainingJob:
        """Submit a job and follow it to the end; returns the finished job."""
        job = await self.submit_training_job(**fields)
        async for event in self.watch_training_job(job.job_id):
            if on_event is not None:
                on_event(event)
        return await self.get_training_job(job.job_id)

    async def sweep(
        self,
        on_event: Callable[[sweeps.WatchSweepResponse], None] | None = None,
        **fields: object,
    ) -> sweeps.Sweep:
        """Submit a sweep and follow it to the end; returns the finished sweep."""
        sweep = await self.submit_sweep(**fields)
        async for event in self.watch_sweep(sweep.sweep_id):
            if on_event is not None:
                on_event(event)
        return await self.get_sweep(sweep.sweep_id)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
