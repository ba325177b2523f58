"""Input hardening: message size limits, and property-based fuzzing of every RPC.

Every RPC of the gateway's descriptor set gets hypothesis-made requests: over native gRPC
through the gateway (messages built from the request type's fields, with huge numbers, NaN,
unicode, long strings, nested and repeated values, and undecodable bytes), and over each of
its REST bindings (hostile JSON: wrong types, huge numbers, deep nesting, unicode, empty and
malformed bodies, odd path segments and query parameters). The promise checked: never a 5xx
or INTERNAL/UNKNOWN, never a hang, always a message that says what was wrong, and every
service still healthy afterwards.

MLMESH_FUZZ_EXAMPLES sets the examples per target (default 15). The number of cases run per
target is printed at the end of the module and written to MLMESH_FUZZ_REPORT if set.

Each run draws a seed (or takes MLMESH_FUZZ_SEED) and prints it at the start and the end of
the module, failures included: MLMESH_FUZZ_SEED=<that seed> makes the same cases again, so a
failure found by chance can be replayed, fixed and checked.

Submissions that happen to be valid start real work: each accepted Submit* is cancelled at
once (its Cancel* RPC), and the module cancels any job left live at the end. SubmitFeedback
starts nothing (it records labels), so it has no Cancel*; a fuzzed id was never issued, so
an accepted one must have recorded no label.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gateway.keys import API_KEY_HEADER
from mlmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.server import service_channel
from services.launcher.mesh import Mesh
from tests.conftest import cancel_live_jobs
from tests.integration.rpcs import DESCRIPTOR, Method, descriptor_methods

EXAMPLES = int(os.environ.get("MLMESH_FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("MLMESH_FUZZ_SEED") or secrets.randbits(32))
METHODS = descriptor_methods(DESCRIPTOR)
REST_CALLS = [(m, verb, template, body) for m in METHODS for verb, template, body in m.rest]
TIMEOUT_S = 20.0
# Server faults, and what a hang or a crash looks like to the client.
BAD_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
}
CASES: Counter[str] = Counter()  # target -> cases run
ACCEPTED: Counter[str] = Counter()  # target -> cases answered OK / 2xx


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file:
        pool.Add(file)
    return pool


POOL = _pool()


def _input_descriptor(method: Method) -> Descriptor:
    service, name = method.path.lstrip("/").rsplit("/", 1)
    return POOL.FindServiceByName(service).FindMethodByName(name).input_type


def _output_descriptor(method: Method) -> Descriptor:
    service, name = method.path.lstrip("/").rsplit("/", 1)
    return POOL.FindServiceByName(service).FindMethodByName(name).output_type


# -- strategies: protobuf messages from their descriptors -----------------------------------------

_F = FieldDescriptor
HOSTILE_TEXT = [
    "",
    " ",
    "0",
    "-1",
    "..",
    "../../etc/passwd",
    "%00",
    "\x00",
    "a\nb",
    "' OR 1=1 --",
    '"; DROP TABLE jobs; --',
    "%s%s%n",
    "${jndi:ldap://x}",
    "ℵ₀ 日本語 🚀 \u202e",
    "NaN",
    "Infinity",
    "null",
    "runs:/x/model",
    "JOB_STATE_RUNNING",
    "x" * 300,
]
text = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=40),
    st.text(min_size=1000, max_size=5000),
)


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [
        v for v in (0, 1, -1, 2, 100, 4096, 10**9, low, high, low + 1, high - 1) if low <= v <= high
    ]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_SCALARS: dict[int, st.SearchStrategy[object]] = {
    _F.TYPE_INT32: _ints(32, True),
    _F.TYPE_SINT32: _ints(32, True),
    _F.TYPE_SFIXED32: _ints(32, True),
    _F.TYPE_INT64: _ints(64, True),
    _F.TYPE_SINT64: _ints(64, True),
    _F.TYPE_SFIXED64: _ints(64, True),
    _F.TYPE_UINT32: _ints(32, False),
    _F.TYPE_FIXED32: _ints(32, False),
    _F.TYPE_UINT64: _ints(64, False),
    _F.TYPE_FIXED64: _ints(64, False),
    _F.TYPE_BOOL: st.booleans(),
    _F.TYPE_FLOAT: st.floats(width=32),
    _F.TYPE_DOUBLE: st.floats(),
    _F.TYPE_STRING: text,
    _F.TYPE_BYTES: st.one_of(st.binary(max_size=64), st.binary(min_size=700, max_size=900)),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[object]:
    if field.type == _F.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    if field.type == _F.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    return _SCALARS[field.type]


def _repeated(field: FieldDescriptor, depth: int) -> st.SearchStrategy[list[object]]:
    element = _value(field, depth)
    if field.type in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        # Images are 784 floats: around that size, and far from it.
        return st.one_of(
            st.lists(element, max_size=8),
            st.integers(0, 2000).flatmap(lambda n: st.lists(element, min_size=n, max_size=n)),
        )
    return st.lists(element, max_size=4 if depth < 2 else 1)


_MAX_DEPTH = 3


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> object:
    msg = message_factory.GetMessageClass(descriptor)()
    if depth > _MAX_DEPTH:
        return msg
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            entries = draw(
                st.dictionaries(_value(key_field, depth), _value(value_field, depth), max_size=3)
            )
            target = getattr(msg, field.name)
            for k, v in entries.items():
                if value_field.type == _F.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            values = draw(_repeated(field, depth))
            if field.type == _F.TYPE_MESSAGE:
                getattr(msg, field.name).extend(values)
            else:
                getattr(msg, field.name)[:] = values
        elif field.type == _F.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(msg, field.name, draw(_value(field, depth)))
    return msg


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[object]:
    return _message(descriptor, depth)


def request_bytes(method: Method) -> st.SearchStrategy[bytes]:
    """A serialized request: a well-formed message (mostly) or undecodable bytes."""
    well_formed = message_strategy(_input_descriptor(method)).map(lambda m: m.SerializeToString())
    garbage = st.one_of(
        st.binary(min_size=1, max_size=64),
        st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10, b"\x0b"]),
    )
    return st.one_of(well_formed, well_formed, well_formed, garbage)


# -- strategies: hostile JSON ------------------------------------------------------------------

HUGE_NUMBERS = [
    "1e999999",
    "-1e999999",
    "123456789012345678901234567890",
    "-9223372036854775809",
    "18446744073709551616",
    "4294967296",
    "2147483648",
    "1.5",
    "-0",
    "0x10",
    "1e-400",
    "NaN",
    "Infinity",
]


def _json_fields(descriptor: Descriptor) -> list[str]:
    return sorted({k for f in descriptor.fields for k in (f.name, f.json_name)})


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def json_text(descriptor: Descriptor | None) -> st.SearchStrategy[str]:
    """JSON-ish request bodies: real field names with wrong or extreme values, and worse."""
    names = _json_fields(descriptor) if descriptor is not None else []
    key = st.one_of(st.sampled_from(names), st.text(max_size=10)) if names else st.text(max_size=10)
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
    )
    values = st.recursive(
        scalar,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=4)
        ),
        max_leaves=12,
    )
    objects = st.dictionaries(key, values, max_size=5).map(
        lambda d: json.dumps(d, ensure_ascii=False)
    )
    # A real field with a raw token JSON's encoders cannot produce (huge numbers, NaN, ...).
    raw_number = st.tuples(st.sampled_from(names or ["x"]), st.sampled_from(HUGE_NUMBERS)).map(
        lambda kv: f'{{"{kv[0]}": {kv[1]}}}'
    )
    nested = st.one_of(
        st.integers(30, 3000).map(_deep),
        st.tuples(st.sampled_from(names or ["x"]), st.integers(30, 300)).map(
            lambda kv: "{" + f'"{kv[0]}":' + "{" * kv[1] + "}" * kv[1] + "}"
        ),
    )
    malformed = st.one_of(
        st.sampled_from(
            [
                "",
                " ",
                "{",
                "}",
                "[",
                "null",
                "[]",
                "true",
                '"x"',
                "0",
                "{}}",
                '{"a":}',
                "{'a':1}",
                "{a:1,}",
                '{"a":1,}',
                "\ufeff{}",
                '{"\\ud800":1}',
                "[{}, 1]",
            ]
        ),
        st.text(max_size=50),
    )
    return st.one_of(objects, objects, raw_number, nested, malformed)


segment = st.one_of(
    st.sampled_from(["1", "0", "-1", "x", "..", ".", "%2F", "a:b", "ℵ", "🚀", "x" * 2000]),
    st.text(min_size=1, max_size=30),
)


def rest_request(
    method: Method, template: str, has_body: bool
) -> st.SearchStrategy[tuple[str, dict[str, str], str | None]]:
    """(path, query, body) for one REST binding."""
    descriptor = _input_descriptor(method)
    variables = re.findall(r"\{([^}=]+)[^}]*\}", template)

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, dict[str, str], str | None]:
        path = template
        for var in variables:
            value = quote(draw(segment), safe="")
            start = path.index("{" + var)
            path = path[:start] + value + path[path.index("}", start) + 1 :]
        body = draw(json_text(descriptor)) if has_body else None
        query: dict[str, str] = {}
        if not has_body or draw(st.booleans()):
            names = [f.name for f in descriptor.fields] or ["x"]
            query = draw(
                st.dictionaries(
                    st.one_of(st.sampled_from(names), st.text(min_size=1, max_size=8)),
                    st.one_of(st.sampled_from(HUGE_NUMBERS), text),
                    max_size=3,
                )
            )
        return path, query, body

    return build()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth(keys: dict[str, str]) -> list[tuple[str, str]]:
    return [(API_KEY_HEADER, keys["alice"])]


@pytest.fixture(scope="module", autouse=True)
def report_and_clean_up(
    mesh: Mesh, auth: list[tuple[str, str]], request: pytest.FixtureRequest
) -> Iterator[None]:
    """Print (and record) the seed and the cases run; cancel whatever jobs fuzzing got
    accepted."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    replay = f"fuzz: seed {SEED} (MLMESH_FUZZ_SEED={SEED} replays these cases)"
    if reporter is not None:
        reporter.write_line(replay)
    started = time.monotonic()
    yield
    lines = [
        replay,
        f"fuzz: {sum(CASES.values())} cases in {time.monotonic() - started:.0f} s, "
        f"{sum(ACCEPTED.values())} accepted",
    ]
    lines += [
        f"fuzz:   {n:5d} {target} ({ACCEPTED[target]} accepted)"
        for target, n in sorted(CASES.items())
    ]
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
    if os.environ.get("MLMESH_FUZZ_REPORT"):
        Path(os.environ["MLMESH_FUZZ_REPORT"]).write_text("\n".join(lines) + "\n")
    cancel_live_jobs(mesh, auth)


def _gateway(mesh: Mesh) -> str:
    return f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"


def _ident(b: bytes) -> bytes:
    return b


_BY_PATH = {m.path: m for m in METHODS}

# Submit RPCs that record data and start no work: there is nothing to cancel.
RECORDS_ONLY = {"/mlmesh.inference.v1.InferenceService/SubmitFeedback"}


def _ids_in(message: object) -> dict[str, str]:
    """Every non-empty string field named *_id in a message, nested ones included."""
    found: dict[str, str] = {}
    for field, value in message.ListFields():  # type: ignore[attr-defined]
        if field.type == _F.TYPE_MESSAGE and not field.is_repeated:
            found.update(_ids_in(value))
        elif field.type == _F.TYPE_STRING and field.name.endswith("_id") and value:
            found.setdefault(field.name, value)
    return found


def cancel_accepted(
    channel: grpc.Channel, method: Method, response: bytes, auth: list[tuple[str, str]]
) -> None:
    """An accepted Submit<Thing> is cancelled at once with Cancel<Thing>: no real work piles up."""
    service, name = method.path.rsplit("/", 1)
    if not name.startswith("Submit"):
        return
    reply = message_factory.GetMessageClass(_output_descriptor(method)).FromString(response)
    if method.path in RECORDS_ONLY:
        recorded = reply.recorded  # type: ignore[attr-defined]
        assert recorded == 0, f"{method.path} recorded a fuzzed id: {reply}"
        return
    cancel = _BY_PATH.get(f"{service}/Cancel{name.removeprefix('Submit')}")
    assert cancel is not None, f"{method.path} has no Cancel RPC to undo it"
    request_type = message_factory.GetMessageClass(_input_descriptor(cancel))
    ids = _ids_in(reply)
    fields = {f.name for f in request_type.DESCRIPTOR.fields}
    args = {k: v for k, v in ids.items() if k in fields}
    assert args, f"cannot tell what {method.path} created from {reply}"
    try:
        channel.unary_unary(cancel.path, request_serializer=_ident, response_deserializer=_ident)(
            request_type(**args).SerializeToString(), metadata=auth, timeout=TIMEOUT_S
        )
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err  # it ended already


# -- gRPC ---------------------------------------------------------------------------------------


def call(
    channel: grpc.Channel, method: Method, messages: list[bytes], auth: list[tuple[str, str]]
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send the messages (the first only, for a unary request); at most 5 responses are read,
    so that watching something that runs does not wait for it to end."""
    kw = {"request_serializer": _ident, "response_deserializer": _ident}
    responses: list[bytes] = []
    try:
        if method.client_streaming:
            if method.server_streaming:
                stream = channel.stream_stream(method.path, **kw)(
                    iter(messages), metadata=auth, timeout=TIMEOUT_S
                )
            else:
                responses.append(
                    channel.stream_unary(method.path, **kw)(
                        iter(messages), metadata=auth, timeout=TIMEOUT_S
                    )
                )
                return grpc.StatusCode.OK, "", responses
        elif method.server_streaming:
            stream = channel.unary_stream(method.path, **kw)(
                messages[0], metadata=auth, timeout=TIMEOUT_S
            )
        else:
            responses.append(
                channel.unary_unary(method.path, **kw)(
                    messages[0], metadata=auth, timeout=TIMEOUT_S
                )
            )
            return grpc.StatusCode.OK, "", responses
        for response in stream:
            responses.append(response)
            if len(responses) >= 5:
                stream.cancel()
                return grpc.StatusCode.OK, "", responses
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and len(responses) >= 5:
            return grpc.StatusCode.OK, "", responses
        return err.code(), err.details() or "", responses
    return grpc.StatusCode.OK, "", responses


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path)
def test_grpc_requests(
    mesh: Mesh, gateway_channel: grpc.Channel, auth: list[tuple[str, str]], method: Method
) -> None:
    target = f"grpc {method.path}"
    count = 3 if method.client_streaming else 1

    @_SETTINGS
    @seed(SEED)
    @given(st.lists(request_bytes(method), min_size=1, max_size=count))
    def run(messages: list[bytes]) -> None:
        CASES[target] += 1
        code, details, responses = call(gateway_channel, method, messages, auth)
        assert code not in BAD_CODES, f"{method.path}: {code.name}: {details}"
        if code == grpc.StatusCode.OK:
            ACCEPTED[target] += 1
            if responses and not method.server_streaming:
                cancel_accepted(gateway_channel, method, responses[0], auth)
        else:
            assert details.strip(), f"{method.path}: {code.name} without a message"

    run()
    _assert_healthy(mesh)


# -- REST ---------------------------------------------------------------------------------------


def _rest_id(call: tuple[Method, str, str, str]) -> str:
    method, verb, template, _ = call
    return f"{method.path.rsplit('/', 1)[-1]}:{verb} {template}"


@pytest.mark.parametrize("call", REST_CALLS, ids=_rest_id)
def test_rest_requests(
    mesh: Mesh,
    rest: httpx.Client,
    gateway_channel: grpc.Channel,
    auth: list[tuple[str, str]],
    call: tuple[Method, str, str, str],
) -> None:
    method, verb, template, body = call
    target = f"rest {verb} {template}"
    headers = {API_KEY_HEADER: auth[0][1], "content-type": "application/json"}

    @_SETTINGS
    @seed(SEED)
    @given(rest_request(method, template, bool(body)))
    def run(case: tuple[str, dict[str, str], str | None]) -> None:
        path, query, content = case
        CASES[target] += 1
        try:
            resp = rest.request(
                verb,
                path,
                params=query,
                content=content.encode() if content is not None else None,
                headers=headers,
                timeout=TIMEOUT_S,
            )
        except httpx.TimeoutException:
            pytest.fail(f"{verb} {path}: no answer in {TIMEOUT_S:.0f} s")
        where = f"{verb} {path} {query} {content[:300] if content else content!r}"
        assert resp.status_code < 500, f"{where}: {resp.status_code} {resp.text[:500]}"
        assert resp.status_code not in (401, 403), f"{where}: {resp.text[:300]}"
        if resp.status_code < 300:
            ACCEPTED[target] += 1
            _cancel_rest(gateway_channel, method, resp, auth)
            return
        assert resp.text.strip(), f"{where}: {resp.status_code} without a message"
        if resp.headers.get("content-type", "").startswith("application/json"):
            message = resp.json().get("message", "")
            assert message.strip(), f"{where}: {resp.status_code} {resp.text[:300]}"

    run()
    _assert_healthy(mesh)


def _cancel_rest(
    channel: grpc.Channel, method: Method, resp: httpx.Response, auth: list[tuple[str, str]]
) -> None:
    if not method.path.rsplit("/", 1)[1].startswith("Submit"):
        return
    reply_type = message_factory.GetMessageClass(_output_descriptor(method))
    reply = reply_type()
    payload = resp.json()
    # The seed's /train answers the job itself (response_body "job").
    field = next(iter(reply_type.DESCRIPTOR.fields))
    if field.name not in payload and field.message_type is not None:
        payload = {field.name: payload}
    json_format.ParseDict(payload, reply, ignore_unknown_fields=True)
    cancel_accepted(channel, method, reply.SerializeToString(), auth)


def _assert_healthy(mesh: Mesh) -> None:
    """Every gRPC service still answers SERVING, directly (not through the gateway)."""
    s = mesh.settings
    for address in (s.registry_address, s.training_address, s.inference_address):
        with service_channel(s, address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, address


# -- message sizes --------------------------------------------------------------------------------


def _pixels(n: int) -> list[float]:
    return [0.5] * n


def test_oversize_grpc_message_is_resource_exhausted(
    mesh: Mesh, auth: list[tuple[str, str]]
) -> None:
    limit = mesh.settings.grpc_max_message_bytes
    big = inference_pb2.PredictRequest(image=_pixels(limit // 4 + 1000))
    assert big.ByteSize() > limit
    options = [("grpc.max_send_message_length", 4 * limit)]
    stream_request = inference_pb2.PredictStreamRequest(image=inference_pb2.Image(pixels=big.image))
    s = mesh.settings
    for address in (_gateway(mesh), s.inference_address, s.registry_address):
        with (
            grpc.insecure_channel(address, options=options)
            if address == _gateway(mesh)
            else service_channel(s, address, options)
        ) as channel:
            errors = []
            if address != s.inference_address:
                list_experiments = channel.unary_unary(
                    "/mlmesh.registry.v1.RegistryService/ListExperiments",
                    request_serializer=_ident,
                    response_deserializer=_ident,
                )
                errors.append(_error_of(list_experiments, big.SerializeToString(), auth))
            if address != s.registry_address:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                errors.append(_error_of(stub.Predict, big, auth))
                errors.append(_error_of(stub.PredictStream, iter([stream_request]), auth))
            for err in errors:
                assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert "larger than max" in err.details(), err.details()
                assert str(limit) in err.details()


def _error_of(
    rpc: grpc.UnaryUnaryMultiCallable, request: object, auth: list[tuple[str, str]]
) -> grpc.RpcError | None:
    try:
        reply = rpc(request, metadata=auth, timeout=TIMEOUT_S)
        if not isinstance(reply, bytes) and hasattr(reply, "__iter__"):
            list(reply)
    except grpc.RpcError as err:
        return err
    return None


def test_oversize_rest_body_is_413(
    rest: httpx.Client, auth: list[tuple[str, str]], mesh: Mesh
) -> None:
    headers = {API_KEY_HEADER: auth[0][1], "content-type": "application/json"}
    limit = mesh.settings.grpc_max_message_bytes
    # Within the gateway's JSON limit, but more than the service takes once transcoded.
    body = '{"image":[' + ",".join(["0"] * (limit // 4)) + "]}"
    assert len(body) < 4 * limit
    resp = rest.post("/v1/predict", content=body, headers=headers)
    assert resp.status_code == 413, resp.text[:300]
    assert "larger than max" in resp.json()["message"]
    # Over the gateway's own limit: refused before it is transcoded.
    body = '{"image":[' + ",".join(["0.000001"] * (limit // 2)) + "]}"
    assert len(body) > 4 * limit
    resp = rest.post("/v1/predict", content=body, headers=headers)
    assert resp.status_code == 413, resp.text[:300]
    assert resp.headers["content-type"] == "application/json"
    assert f"{4 * limit} bytes" in resp.json()["message"]
    # An ordinary body is not refused for its size.
    ok = rest.post("/v1/predict", json={"image": _pixels(784)}, headers=headers)
    assert ok.status_code < 500 and ok.status_code != 413, ok.text[:300]
