"""Server interceptors shared by every mlmesh gRPC service: identity, errors, access log."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.errors import MeshError

log = logging.getLogger(__name__)

# Set by the gateway's api_key_auth filter after it strips any copy the client sent.
CLIENT_HEADER = "x-mlmesh-client"
ANONYMOUS = "anonymous"

_client: contextvars.ContextVar[str] = contextvars.ContextVar("mlmesh_client", default=ANONYMOUS)

# Health probes are not traffic: neither logged nor (later) counted.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def current_client() -> str:
    """The API-key client of the RPC being served, or "anonymous" on public routes."""
    return _client.get()


def _client_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_HEADER and value:
            return str(value)
    return ANONYMOUS


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, MeshError):
        await context.abort(exc.code, str(exc))
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server log")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Binds the caller's identity, maps domain errors to status codes, and logs each RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_QUIET_PREFIXES):
            return handler
        method = details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(method, handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(method, handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(method, handler.unary_stream))
        return handler._replace(stream_stream=_wrap_stream(method, handler.stream_stream))


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = _client.set(_client_from(context))
        start = time.perf_counter()
        code = "OK"
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, MeshError) else "INTERNAL"
            await _abort(context, method, exc)
        finally:
            _client.reset(token)
            log.info(
                "rpc %s client=%s code=%s ms=%.1f",
                method,
                _client_from(context),
                code,
                (time.perf_counter() - start) * 1e3,
            )

    return wrapper


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        token = _client.set(_client_from(context))
        start = time.perf_counter()
        code = "OK"
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, MeshError) else "INTERNAL"
            await _abort(context, method, exc)
        finally:
            _client.reset(token)
            log.info(
                "rpc %s client=%s code=%s ms=%.1f",
                method,
                _client_from(context),
                code,
                (time.perf_counter() - start) * 1e3,
            )

    return wrapper
