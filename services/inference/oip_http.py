"""The Open Inference Protocol's REST face: the ``/v2`` routes, over OpenInference.

A thin HTTP handler rather than Envoy's transcoder, which cannot speak the protocol's JSON:
a tensor's elements are ``data`` (any nesting) in REST but typed ``contents`` fields in gRPC,
shapes are JSON numbers where proto3 JSON writes int64 as strings, readiness is the HTTP
status rather than a body, and tensors may come as binary data after the JSON (Triton's
binary tensor extension, which tritonclient uses by default). The gateway forwards ``/v2`` here
after checking the API key (the health routes are public).

Errors are the protocol's: ``{"error": "<message>"}`` with 400 for a bad request, 404 for an
unknown model, version or route, 503 when a dependency is down.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from services.common.errors import InvalidArgument, MeshError
from services.common.headers import CLIENT_HEADER, RETRY_AFTER_HEADER, ROUTING_KEY_HEADER
from services.common.interceptors import ANONYMOUS
from services.common.model_contract import DATATYPES, RequestTensor, TensorSpec
from services.common.ratelimit import PREDICTIONS, RateLimited, RateLimiter
from services.common.text import check_text
from services.inference import metrics
from services.inference.oip import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    OpenInference,
    bytes_array,
    check_datatype,
    check_parameters,
    check_shape,
    decode_raw,
    encode_raw,
)

log = logging.getLogger(__name__)

# The binary tensor extension: the JSON's length, when binary data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
NO_CACHE = "no-cache"

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
# The JSON keys of the protocol's request objects; any other key is refused, not ignored.
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}
# numpy kinds a JSON array may decode to for each datatype's family
_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _object(value: Any, field: str, keys: set[str]) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise InvalidArgument(
            f"{field} has unknown key {unknown[0]!r}; the protocol's keys are "
            + ", ".join(sorted(keys))
        )
    return value


def _parameters(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}.parameters must be a JSON object")
    check_parameters(value, field)
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string")
    return value


def _shape(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidArgument(f"{field}.shape must be a list of integers")
    return check_shape(value, field)


def _json_data(value: Any, datatype: str, field: str) -> np.ndarray:
    """A tensor's ``data`` (flat or nested lists, row-major) as a flat array; BYTES elements
    are JSON strings (UTF-8)."""
    if datatype == "BYTES":
        flat = _flatten(value, field)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidArgument(f"{field}.data must hold BYTES values (JSON strings)")
        return bytes_array(v.encode() for v in flat)
    dtype = DATATYPES[datatype]
    try:
        found = np.asarray(value)
    except ValueError:
        raise InvalidArgument(f"{field}.data is a ragged nest of lists") from None
    if found.dtype.kind not in _KINDS[dtype.kind] or found.dtype == object:
        raise InvalidArgument(
            f"{field}.data must hold {datatype} values (JSON "
            f"{'booleans' if dtype.kind == 'b' else 'numbers'})"
        )
    if dtype.kind in "iu" and found.size:
        info = np.iinfo(dtype)
        if found.min() < info.min or found.max() > info.max:
            raise InvalidArgument(f"{field}.data holds a value out of {datatype}'s range")
    return found.astype(dtype).ravel()


def _flatten(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{field}.data must be a list")
    flat: list[Any] = []
    stack = [iter(value)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_values(data: np.ndarray) -> list[Any]:
    """An output's elements for JSON: numbers, booleans, or text for BYTES."""
    if data.dtype.kind == "O":
        return [v.decode(errors="replace") for v in data.ravel().tolist()]
    return data.ravel().tolist()


class OipHttpServer:
    """Serves the protocol's REST routes on their own port (the gateway forwards /v2 here)."""

    def __init__(
        self,
        oip: OpenInference,
        limiter: RateLimiter,
        host: str,
        port: int,
        max_body_bytes: int,
        grace_s: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._oip = oip
        # The gateway's mutual TLS (services/common/server.py, server_ssl_context): a caller
        # without a certificate of the mesh's CA fails the handshake, so x-mlmesh-client
        # here always comes from the gateway.
        self._ssl_context = ssl_context
        self._limiter = limiter
        self._host = host
        self._port = port
        self._max_body_bytes = max_body_bytes
        self._grace_s = grace_s
        self._runner: web.AppRunner | None = None

    # -- routes ------------------------------------------------------------------------------

    async def _live(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _ready(self, _: web.Request) -> web.Response:
        ready = self._oip.ready
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = await self._oip.model_ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 400)

    async def _server_metadata(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        )

    async def _model_metadata(self, request: web.Request) -> web.Response:
        found = await self._oip.model_metadata(*_model(request))
        return web.json_response(
            {
                "name": found.name,
                "versions": found.versions,
                "platform": found.platform,
                "inputs": [_tensor_metadata(t) for t in found.inputs],
                "outputs": [_tensor_metadata(t) for t in found.outputs],
            }
        )

    async def _infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        # The same bucket as the gRPC face's ModelInfer and Predict (the interceptor's).
        await self._limiter.acquire(PREDICTIONS, request.headers.get(CLIENT_HEADER, ANONYMOUS))
        name, version = _model(request)
        body = await self._body(request)
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        try:
            parsed = json.loads(header)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
        req = _object(parsed, "the request", _REQUEST_KEYS)
        request_id = _string(req.get("id", ""), "id")
        params = _parameters(req.get("parameters"), "the request")
        inputs = _decode_inputs(req.get("inputs"), binary)
        wanted = req.get("outputs") or []
        if not isinstance(wanted, list):
            raise InvalidArgument("outputs must be a list")
        outputs = [_object(o, f"outputs[{i}]", _OUTPUT_KEYS) for i, o in enumerate(wanted)]
        names = [_string(o.get("name"), f"outputs[{i}].name") for i, o in enumerate(outputs)]
        output_params = [_parameters(o.get("parameters"), f"outputs[{i}]") for i, o in
                         enumerate(outputs)]  # fmt: skip
        answer = await self._oip.infer(
            name,
            version,
            inputs,
            names,
            read_cache=NO_CACHE not in request.headers.get("cache-control", "").lower(),
            routing_key=request.headers.get(ROUTING_KEY_HEADER, ""),
        )
        # Binary output for the outputs that ask for it or, for those named without saying
        # (or when none is named), as the request says.
        default = bool(params.get("binary_data_output", False))
        binary_for = {
            n: bool(p.get("binary_data", default))
            for n, p in zip(names, output_params, strict=True)
        }
        reply: dict[str, Any] = {
            "model_name": answer.model_name,
            "model_version": answer.model_version,
            "parameters": {"prediction_id": answer.prediction_id},
            "outputs": [],
        }
        if request_id:
            reply["id"] = request_id
        blobs = []
        for spec, data in answer.outputs:
            output: dict[str, Any] = {
                "name": spec.name,
                "datatype": spec.datatype,
                "shape": list(data.shape),
            }
            if binary_for.get(spec.name, default):
                blob = encode_raw(data)
                output["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                output["data"] = _json_values(data)
            reply["outputs"].append(output)
        metrics.PREDICTION_DURATION.labels("ModelInfer").observe(time.perf_counter() - started)
        if not blobs:
            return web.json_response(reply)
        text = json.dumps(reply).encode()
        return web.Response(
            body=text + b"".join(blobs),
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(text))},
        )

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self._max_body_bytes:
            raise _TooLarge(request.content_length, self._max_body_bytes)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _TooLarge(None, self._max_body_bytes) from None

    # -- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The protocol's error body for every failure; an access log line per request."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except MeshError as exc:
            response = _error(_STATUS.get(exc.code, 500), str(exc))
            if isinstance(exc, RateLimited):
                response.headers[RETRY_AFTER_HEADER] = exc.retry_after
        except _TooLarge as exc:
            response = _error(413, str(exc))
        except web.HTTPException as exc:  # no such route, method not allowed
            response = _error(
                exc.status,
                f"no such route: {request.method} {request.path}; the Open Inference Protocol "
                "routes are /v2, /v2/health/{live,ready} and /v2/models/NAME[/versions/V]"
                "[/ready|/infer]",
            )
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = _error(500, f"internal error in {request.path}; see server log")
        log.info(
            "http %s %s client=%s status=%d ms=%.1f",
            request.method,
            request.path,
            request.headers.get(CLIENT_HEADER, ANONYMOUS),
            response.status,
            (time.perf_counter() - started) * 1e3,
        )
        return response

    async def start(self) -> None:
        # The body limit is ours (_body), so the error is the protocol's.
        app = web.Application(middlewares=[self._errors], client_max_size=self._max_body_bytes)
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/v2/health/ready", self._ready)
        app.router.add_get("/v2", self._server_metadata)
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.router.add_get(model, self._model_metadata)
            app.router.add_get(model + "/ready", self._model_ready)
            app.router.add_post(model + "/infer", self._infer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._grace_s)
        await self._runner.setup()
        await web.TCPSite(
            self._runner, self._host, self._port, ssl_context=self._ssl_context
        ).start()
        log.info("Open Inference Protocol REST on %s:%d (/v2)", self._host, self._port)

    async def stop(self) -> None:
        """Report not ready, then let requests in flight finish within the grace period."""
        self._oip.ready = False
        if self._runner is not None:
            await self._runner.cleanup()


class _TooLarge(Exception):
    def __init__(self, size: int | None, limit: int) -> None:
        told = f"is {size} bytes" if size is not None else "is larger than that"
        super().__init__(
            f"the request body {told}; at most {limit} bytes are accepted "
            "(4 x MLMESH_GRPC_MAX_MESSAGE_BYTES)"
        )


def _model(request: web.Request) -> tuple[str, str]:
    """The path's model name and version (the text rule every RPC's fields follow)."""
    return (
        check_text(request.match_info["name"], "the model name"),
        check_text(request.match_info.get("version", ""), "the model version"),
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a body (binary tensor extension)."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON's length in bytes, at "
            f"most the body's {len(body)}"
        )
    return body[: int(header_length)], body[int(header_length) :]


def _decode_inputs(value: Any, binary: bytes) -> list[RequestTensor]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument("inputs must be a non-empty list of tensors")
    decoded, offset = [], 0
    for i, item in enumerate(value):
        field = f"inputs[{i}]"
        tensor = _object(item, field, _INPUT_KEYS)
        name = _string(tensor.get("name"), f"{field}.name")
        datatype = _string(tensor.get("datatype"), f"{field}.datatype")
        dtype = check_datatype(datatype, field)
        shape = _shape(tensor.get("shape"), field)
        params = _parameters(tensor.get("parameters"), field)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(f"{field} has data and binary_data_size; use one form")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"{field}.parameters.binary_data_size must be an integer")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"{field}.parameters.binary_data_size is {size} but only "
                    f"{len(binary) - offset} bytes of binary data are left"
                )
            data = decode_raw(binary[offset : offset + size], dtype, shape, field)
            offset += size
        elif "data" in tensor:
            data = _json_data(tensor["data"], datatype, field)
        else:
            raise InvalidArgument(f"{field} has no data (nor parameters.binary_data_size)")
        decoded.append(RequestTensor(name, datatype, shape, data, field))
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data follow the JSON that no input claims"
        )
    return decoded


def _tensor_metadata(info: TensorSpec) -> dict[str, Any]:
    return {"name": info.name, "datatype": info.datatype, "shape": list(info.shape)}
