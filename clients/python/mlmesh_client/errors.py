"""mlmesh's exceptions: one per gRPC status code a caller handles, all under ``MeshError``.

>>> try:
...     mesh.get_training_job("no-such-job")
... except NotFound as err:
...     print(err.code, err.details)
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

# The wire names the SDK speaks (the server's services/common/headers.py says the same).
API_KEY_HEADER = "x-api-key"
RETRY_AFTER_HEADER = "retry-after"  # whole seconds, on RESOURCE_EXHAUSTED


class MeshError(Exception):
    """A call failed. ``code`` is its gRPC status code, ``details`` the server's message (the
    exception's text is both, with a hint where one helps) and ``trailers`` the trailing
    metadata that came with it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailers: Iterable[tuple[str, str | bytes]] = (),
        *,
        hint: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {details}" + (f" ({hint})" if hint else ""))
        self.code = code
        self.details = details
        self.trailers = dict(trailers)


class InvalidArgument(MeshError):
    """INVALID_ARGUMENT: the request is wrong; the message names the field."""


class NotFound(MeshError):
    """NOT_FOUND: no such job, sweep, model, version or dataset."""


class AlreadyExists(MeshError):
    """ALREADY_EXISTS."""


class FailedPrecondition(MeshError):
    """FAILED_PRECONDITION: not now (a finished job cancelled, a version in use deleted, a
    promotion the Inference service cannot load); the message says why."""


class Unauthenticated(MeshError):
    """UNAUTHENTICATED: the call needs an API key, or the gateway does not know the one sent."""


class PermissionDenied(MeshError):
    """PERMISSION_DENIED: the key is known but may not make this call."""


class ResourceExhausted(MeshError):
    """RESOURCE_EXHAUSTED: over a rate limit (or a size limit). ``retry_after`` is the seconds
    the gateway said to wait, None when it said nothing."""

    @property
    def retry_after(self) -> float | None:
        value = self.trailers.get(RETRY_AFTER_HEADER)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


class Unavailable(MeshError):
    """UNAVAILABLE: the gateway or a service behind it cannot be reached now. Idempotent calls
    were already retried with backoff before this was raised."""


class DeadlineExceeded(MeshError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline (``timeout_s``)."""


class Cancelled(MeshError):
    """CANCELLED."""


class Internal(MeshError):
    """INTERNAL or UNKNOWN: a fault on the server's side."""


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
}


def error_from(err: grpc.RpcError, *, key_sent: bool) -> MeshError:
    """The mlmesh exception for a failed call (sync or asyncio), with a hint for the codes a
    user acts on: what to do about a missing or unknown key, and when to retry."""
    code = err.code()
    details = err.details() or ""
    trailers = [(k, v) for k, v in (err.trailing_metadata() or ())]
    cls = _BY_CODE.get(code, MeshError)
    hint = ""
    if cls is Unauthenticated:
        hint = (
            "the gateway does not know the API key sent: a mistyped or rotated key?"
            if key_sent
            else "this call needs an API key: Client(api_key=...), the CLI's --api-key, or "
            "MLMESH_API_KEY; `mlmesh-server up` prints a development key"
        )
    elif cls is ResourceExhausted:
        after = dict(trailers).get(RETRY_AFTER_HEADER)
        hint = f"retry after {after} s" if after else ""
    return cls(code, details, trailers, hint=hint)
