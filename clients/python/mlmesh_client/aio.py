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
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc

from mlmesh_client.api import Call, Followed, MeshApi, OnEvent, Requests, Send


class AsyncClient(MeshApi):
    """mlmesh through its gateway, for asyncio; the arguments are ``Client``'s. Make it inside
    the event loop that uses it (a grpc.aio channel belongs to one loop)."""

    @staticmethod
    def _open_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, credentials)

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
            return await method(step.request, metadata=self._metadata(call), timeout=step.timeout_s)
        except grpc.RpcError as err:
            return err

    async def _stream(self, call: Call) -> AsyncIterator:
        """A server-streaming call's answers; leaving the loop early cancels the call."""
        stream = self._method(call)(call.request, metadata=self._metadata(call))
        try:
            async for answer in stream:
                yield answer
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            stream.cancel()
        Requests.raise_error(call.request)

    async def _follow(self, kind: Followed, submitted: Any, on_event: OnEvent) -> Any:
        started = getattr(await submitted, kind.id_field)
        async for event in getattr(self, kind.watch)(started):
            if on_event is not None:
                on_event(event)
        return await getattr(self, kind.get)(started)

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
