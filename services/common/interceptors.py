"""Server interceptors shared by every mlmesh gRPC service: identity, errors, access log.

Identity: a service takes calls on its mutual-TLS port, where every caller presented a
certificate of the mesh's CA (the gateway, another service), and on a plain-text health port.
Only a caller with such a certificate is trusted to say who the end client is
(``x-mlmesh-client``, which the gateway sets from the API key); any other call but a health
check or reflection (which only describes the API) is refused with UNAUTHENTICATED, so the
header means nothing coming from anyone else.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from services.common.errors import InvalidArgument, MeshError
from services.common.headers import CLIENT_HEADER, RETRY_AFTER_HEADER
from services.common.limits import PREDICTIONS
from services.common.ratelimit import RPC_CLASSES, RateLimited, RateLimiter
from services.common.text import check_message

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"

_client: contextvars.ContextVar[str] = contextvars.ContextVar("mlmesh_client", default=ANONYMOUS)

# Health probes and reflection are not traffic: neither logged nor counted. They are also the
# only calls taken without a client certificate (on the plain-text health port): grpcurl needs
# reflection to ask for a health check, and it tells no more than the repository's protos.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
NO_CERTIFICATE = (
    "this port takes calls only from the mesh's gateway and services: present a client "
    "certificate of the mesh's CA (over mutual TLS), or call through the gateway"
)

# The standard gRPC server metrics (the names of go-grpc-prometheus and py-grpc-prometheus).
_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status code.",
    (*_RPC_LABELS, "grpc_code"),
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status, on the server.",
    _RPC_LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECEIVED = Counter("grpc_server_msg_received_total", "Messages received from clients.", _RPC_LABELS)
SENT = Counter("grpc_server_msg_sent_total", "Messages sent to clients.", _RPC_LABELS)


def current_client() -> str:
    """The API-key client of the RPC being served, or "anonymous" on public routes."""
    return _client.get()


def has_mesh_certificate(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller presented a certificate the server verified against the mesh's CA
    (calls on the mutual-TLS port; a plain-text connection has no peer identity)."""
    return bool(context.peer_identities())


def _client_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_HEADER and value:
            return str(value)
    return ANONYMOUS


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, RateLimited):
        # REST callers get it as the Retry-After header (see gateway/envoy.yaml.j2).
        context.set_trailing_metadata(((RETRY_AFTER_HEADER, exc.retry_after),))
    if isinstance(exc, MeshError):
        await context.abort(exc.code, str(exc))
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server log")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Binds the caller's identity, applies its rate limits, maps domain errors to status
    codes, logs each RPC and counts it in the standard gRPC server metrics.

    The access log has a line per RPC, but for predictions answered OK: one in
    ``prediction_log_every`` of those (a line per prediction would cost a tenth of a cached
    answer's time). Every error is logged.
    """

    def __init__(self, limiter: RateLimiter | None = None, prediction_log_every: int = 1) -> None:
        self._limiter = limiter
        self._prediction_log_every = max(1, prediction_log_every)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_QUIET_PREFIXES):
            return handler
        # Wrapped once per method (this runs for every RPC); the handler is the same object
        # for every call of a method.
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            rpc_log_every = (
                self._prediction_log_every if RPC_CLASSES.get(details.method) == PREDICTIONS else 1
            )
            wrapped = _wrap(details.method, handler, self._limiter, rpc_log_every)
            cached = (handler, wrapped)
            self._wrapped[details.method] = cached
        return cached[1]


class _Refused:
    """A request message that did not parse, or that holds text no request may
    (services/common/text.py); the wrappers answer it with INVALID_ARGUMENT (for one that
    did not parse, gRPC itself would answer UNKNOWN, or leave a streaming call hanging)."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _checked(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            message = deserialize(data)
        except Exception as exc:  # DecodeError; whatever a custom deserializer raises
            return _Refused(InvalidArgument(f"the request is not a valid protobuf message: {exc}"))
        if isinstance(message, Message):
            try:
                check_message(message)
            except InvalidArgument as exc:
                return _Refused(exc)
        return message

    return parse


def _wrap(
    method: str, handler: grpc.RpcMethodHandler, limiter: RateLimiter | None, log_every: int
) -> grpc.RpcMethodHandler:
    handler = handler._replace(request_deserializer=_checked(handler.request_deserializer))
    if handler.unary_unary:
        rpc = _Rpc(method, "unary", limiter, log_every)
        return handler._replace(unary_unary=_wrap_unary(rpc, handler.unary_unary, False))
    if handler.stream_unary:
        rpc = _Rpc(method, "client_stream", limiter, log_every)
        return handler._replace(stream_unary=_wrap_unary(rpc, handler.stream_unary, True))
    if handler.unary_stream:
        rpc = _Rpc(method, "server_stream", limiter, log_every)
        return handler._replace(unary_stream=_wrap_stream(rpc, handler.unary_stream, False))
    rpc = _Rpc(method, "bidi_stream", limiter, log_every)
    return handler._replace(stream_stream=_wrap_stream(rpc, handler.stream_stream, True))


class _Rpc:
    """One method's name, rate-limit class and metric children, made once per method, used
    by every call."""

    def __init__(
        self, method: str, grpc_type: str, limiter: RateLimiter | None, log_every: int = 1
    ) -> None:
        self.method = method
        self.log_every = log_every
        self.answered_ok = 0
        self.sampled = f" (one in {log_every} answered OK is logged)" if log_every > 1 else ""
        route_class = RPC_CLASSES.get(method)
        self.limiter = limiter if route_class else None
        self.route_class = route_class or ""
        service, _, name = method.lstrip("/").rpartition("/")
        self.labels = (grpc_type, service, name)
        self.started = STARTED.labels(*self.labels)
        self.handling = HANDLING.labels(*self.labels)
        self.received = RECEIVED.labels(*self.labels)
        self.sent = SENT.labels(*self.labels)
        self.handled_ok = HANDLED.labels(*self.labels, "OK")

    def finish(self, client: str, code: str, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.handling.observe(elapsed)
        if code != "OK":
            HANDLED.labels(*self.labels, code).inc()
            log.info("rpc %s client=%s code=%s ms=%.1f", self.method, client, code, elapsed * 1e3)
            return
        self.handled_ok.inc()
        self.answered_ok += 1
        if (self.answered_ok - 1) % self.log_every == 0:  # the 1st, then every log_every-th
            log.info("rpc %s client=%s code=OK ms=%.1f%s", self.method, client, elapsed * 1e3,
                     self.sampled)  # fmt: skip


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    """The code a handler aborted with (context.abort)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _counted(requests: AsyncIterator[Any], rpc: _Rpc) -> AsyncIterator[Any]:
    async for request in requests:
        rpc.received.inc()
        if isinstance(request, _Refused):
            raise request.error
        yield request


def _wrap_unary(
    rpc: _Rpc, behavior: Callable[..., Awaitable[Any]], streaming_request: bool
) -> Callable[..., Any]:
    method = rpc.method

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        trusted = has_mesh_certificate(context)
        client = _client_from(context) if trusted else ANONYMOUS
        token = _client.set(client)
        start = time.perf_counter()
        rpc.started.inc()
        if streaming_request:
            request = _counted(request, rpc)
        else:
            rpc.received.inc()
        code = "OK"
        try:
            if not trusted:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_CERTIFICATE)
            if isinstance(request, _Refused):
                raise request.error
            if rpc.limiter is not None:
                await rpc.limiter.acquire(rpc.route_class, client)
            response = await behavior(request, context)
            rpc.sent.inc()
            return response
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:  # the client went away or the deadline passed
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, MeshError) else "INTERNAL"
            await _abort(context, method, exc)
        finally:
            _client.reset(token)
            rpc.finish(client, code, start)

    return wrapper


def _wrap_stream(
    rpc: _Rpc, behavior: Callable[..., AsyncIterator[Any]], streaming_request: bool
) -> Callable[..., Any]:
    method = rpc.method

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        trusted = has_mesh_certificate(context)
        client = _client_from(context) if trusted else ANONYMOUS
        token = _client.set(client)
        start = time.perf_counter()
        rpc.started.inc()
        if streaming_request:
            request = _counted(request, rpc)
        else:
            rpc.received.inc()
        code = "OK"
        try:
            if not trusted:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_CERTIFICATE)
            if isinstance(request, _Refused):
                raise request.error
            if rpc.limiter is not None:  # a stream takes one token, when it opens
                await rpc.limiter.acquire(rpc.route_class, client)
            async for response in behavior(request, context):
                rpc.sent.inc()
                yield response
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:  # the client went away or the deadline passed
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, MeshError) else "INTERNAL"
            await _abort(context, method, exc)
        finally:
            _client.reset(token)
            rpc.finish(client, code, start)

    return wrapper
