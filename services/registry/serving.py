"""Whether the Inference service can serve a version, asked before a version is made
production or staging: a promotion to a version that cannot load never moves an alias.

The Registry asks over the contract (InferenceService.LoadModelVersion), never by importing
the Inference service: the answer is the Inference service's own, with its runtimes, its
allowed flavors and its environment, and the version is loaded (warm) before traffic moves.
"""

from __future__ import annotations

import logging

import grpc

from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.errors import FailedPrecondition, Unavailable
from services.common.headers import CLIENT_HEADER
from services.common.server import aio_service_channel
from services.common.settings import Settings

log = logging.getLogger(__name__)


class ServingCheck:
    """Asks the Inference service at ``target`` to load a version, over the mesh's mutual TLS
    (the Inference service trusts the caller's x-mlmesh-client only with the certificate)."""

    def __init__(self, settings: Settings, target: str, timeout_s: float) -> None:
        self._settings = settings
        self._target = target
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._channel is None:  # made on first use, on the serving event loop
            self._channel = aio_service_channel(self._settings, self._target)
        return inference_pb2_grpc.InferenceServiceStub(self._channel)

    async def require_loadable(self, client: str, name: str, version: int) -> str:
        """The runtime that will serve ``version`` of ``name``; FailedPrecondition naming the
        reason when it cannot be served, Unavailable when the Inference service cannot say."""
        request = inference_pb2.LoadModelVersionRequest(model_name=name, model_version=str(version))
        try:
            answer = await self._stub().LoadModelVersion(
                request, timeout=self._timeout_s, metadata=((CLIENT_HEADER, client),)
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INTERNAL,
            ):
                raise FailedPrecondition(
                    f"version {version} of {name!r} cannot be served, so it was not moved: "
                    f"{err.details()}"
                ) from err
            raise Unavailable(
                f"cannot check that the Inference service at {self._target} can serve "
                f"version {version} of {name!r} ({err.code().name}: {err.details()}); nothing "
                "was changed, retry once it is up"
            ) from err
        return answer.runtime

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
