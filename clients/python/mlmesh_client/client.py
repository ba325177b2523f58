"""The SDK over the gateway's gRPC face, for plain (synchronous) Python; ``AsyncClient``
(mlmesh_client.aio) makes the same calls for asyncio."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc

from mlmesh_client.api import (
    DATASET_FORMATS,
    DATASET_SPLITS,
    DEFAULT_TARGET,
    Call,
    Followed,
    MeshApi,
    OnEvent,
    Requests,
    Send,
    channel_credentials,
)
from mlmesh_client.errors import MeshError

__all__ = [
    "DATASET_FORMATS",
    "DATASET_SPLITS",
    "DEFAULT_TARGET",
    "Client",
    "MeshError",
    "gateway_channel",
]


def gateway_channel(
    target: str, *, tls: bool = False, ca_file: str | os.PathLike[str] | None = None
) -> grpc.Channel:
    """A channel to the gateway: plain text (h2c), or TLS when ``tls`` or a CA file is given
    (``ca_file``, else MLMESH_GATEWAY_CA_FILE)."""
    return Client._open_channel(target, channel_credentials(tls, ca_file))


class Client(MeshApi):
    """mlmesh through its gateway.

    >>> with Client("127.0.0.1:8000", api_key="...") as mesh:
    ...     mesh.list_registered_models()

    ``target`` defaults to ``MLMESH_GATEWAY`` or 127.0.0.1:8000, ``api_key`` to
    ``MLMESH_API_KEY``. Read-only registry calls work without a key.

    A gateway that speaks TLS takes ``tls=True``: the client then trusts the system's CAs, or
    only the PEM file ``ca_file`` (default ``MLMESH_GATEWAY_CA_FILE``; naming one turns TLS
    on), e.g. the development certificate `mlmesh-server dev-cert` writes.

    Unary calls have a deadline of ``timeout_s`` seconds (None: none), and the idempotent ones
    (reads, predictions, submissions with an idempotency key) are retried on UNAVAILABLE as
    ``retry`` says; ``with_options`` changes either for some calls. Failures raise
    ``MeshError`` subclasses that carry the gRPC code (mlmesh_client.errors).
    """

    @staticmethod
    def _open_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, credentials)

    def _run(self, call: Call) -> Any:
        plan = self._plan(call)
        outcome = None
        try:
            while True:
                outcome = self._do(call, plan.send(outcome))
        except StopIteration as done:
            return done.value

    def _do(self, call: Call, step: Send | float) -> Any:
        if not isinstance(step, Send):
            time.sleep(step)
            return None
        try:
            return self._method(call)(
                step.request, metadata=self._metadata(call), timeout=step.timeout_s
            )
        except grpc.RpcError as err:
            return err

    def _stream(self, call: Call) -> Iterator:
        """A server-streaming call's answers; closing the iterator early cancels the call."""
        stream = self._method(call)(call.request, metadata=self._metadata(call))
        try:
            yield from stream
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            stream.cancel()
        Requests.raise_error(call.request)

    def _follow(self, kind: Followed, submitted: Any, on_event: OnEvent) -> Any:
        started = getattr(submitted, kind.id_field)
        for event in getattr(self, kind.watch)(started):
            if on_event is not None:
                on_event(event)
        return getattr(self, kind.get)(started)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
