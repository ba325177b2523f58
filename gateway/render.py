"""Build the gateway's descriptor set and render its Envoy configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import grpc
import jinja2
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from gateway.keys import (
    API_KEY_HEADER,
    ENVOY_KEYS_FILE,
    ENVOY_MLFLOW_KEYS_FILE,
    MLFLOW_FILTER_NAME,
    ApiKeyError,
    load_api_keys,
    write_envoy_keys,
)
from gateway.policy import (
    CONTRACT_PACKAGES,
    MLFLOW_PREFIXES,
    MLFLOW_ROUTES,
    OIP_REST_ROUTES,
    OIP_SERVICE,
    RPC_ACCESS,
    SERVICE_CLUSTERS,
    MlflowRule,
)
from services.common.headers import CLIENT_HEADER
from services.common.settings import MESH_SERVICE_NAME, Settings, split_address

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("envoy.yaml.j2")
STRICT_JSON = Path(__file__).with_name("strict_json.lua")
_SCHEMA_MARKER = "local SCHEMA = {} -- @SCHEMA@"
# Envoy turns an api_key_auth-disabled route into a public one.
_PUBLIC = (
    '{"envoy.filters.http.api_key_auth": '
    '{"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}}'
)
_MLFLOW_PUBLIC = _PUBLIC.replace("envoy.filters.http.api_key_auth", MLFLOW_FILTER_NAME)


def tool(name: str) -> str:
    """Path of a tool installed beside this interpreter (buf, envoy, grpcurl), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; run `make install`")
    return found


def build_descriptor_set(out_path: Path) -> Path:
    """Build a descriptor set of protos/ (imports included) with buf, as the transcoder needs."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [tool("buf"), "build", "--as-file-descriptor-set", "-o", str(out_path)],
        cwd=ROOT,
        check=True,
    )
    return out_path


_TEMPLATE_VAR = re.compile(r"\{([a-z_.]+)(?:=([^}]*))?\}")


def template_regex(template: str) -> str:
    """An RE2 regex for the paths a google.api.http template matches (query excluded)."""
    out, pos = [], 0
    for var in _TEMPLATE_VAR.finditer(template):
        out.append(re.escape(template[pos : var.start()]))
        segments = (var.group(2) or "*").split("/")
        out.append(
            "/".join("[^/]+" if p == "*" else ".+" if p == "**" else re.escape(p) for p in segments)
        )
        pos = var.end()
    out.append(re.escape(template[pos:]))
    return "^" + "".join(out) + "$"


@dataclass(frozen=True)
class Binding:
    """One REST binding of an RPC: an HTTP method and a google.api.http path template."""

    verb: str
    template: str
    body: str = ""  # the HttpRule's body: "*", a request field's name, or "" for none
    response_body: str = ""  # the response field sent as the whole JSON body, or ""


@dataclass(frozen=True)
class Rpc:
    """One RPC of the contract, as the gateway sees it."""

    service: str
    method: str
    streaming: bool
    bindings: tuple[Binding, ...]
    input_type: str = ""  # the request message's full name
    output_type: str = ""  # the response message's full name

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


def _bindings(rule: annotations_pb2.http_pb2.HttpRule) -> list[Binding]:
    verb = rule.WhichOneof("pattern")
    found = (
        [Binding(verb.upper(), getattr(rule, verb), rule.body, rule.response_body)]
        if verb and verb != "custom"
        else []
    )
    for extra in rule.additional_bindings:
        found += _bindings(extra)
    return found


def mesh_rpcs(descriptor_path: Path) -> list[Rpc]:
    """Every RPC of every service of the contract (CONTRACT_PACKAGES) in a descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    rpcs = []
    for file in fds.file:
        if not f"{file.package}.".startswith(CONTRACT_PACKAGES):
            continue
        for service in file.service:
            full = f"{file.package}.{service.name}"
            for m in service.method:
                streaming = m.client_streaming or m.server_streaming
                rule = m.options.Extensions[annotations_pb2.http]
                rpcs.append(
                    Rpc(
                        full,
                        m.name,
                        streaming,
                        tuple(_bindings(rule)),
                        m.input_type.lstrip("."),
                        m.output_type.lstrip("."),
                    )
                )
    return rpcs


# -- strict JSON bodies ---------------------------------------------------------------------
# The transcoder drops unknown JSON body fields (envoyproxy/envoy#46623); strict_json.lua, a
# Lua filter before it, rejects them. Its schema, generated here, lists the JSON keys of each
# mlmesh message a REST body can carry, nested messages included.

_FD = descriptor_pb2.FieldDescriptorProto


def _messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of a descriptor set, nested ones included, by full name."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, messages: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            found[f"{prefix}{m.name}"] = m
            add(f"{prefix}{m.name}.", list(m.nested_type))

    for file in fds.file:
        add(f"{file.package}." if file.package else "", list(file.message_type))
    return found


def _lower_camel(name: str) -> str:
    """The json_name protoc derives from a field name, for a descriptor that lacks it."""
    out, upper = [], False
    for c in name:
        if c == "_":
            upper = True
        else:
            out.append(c.upper() if upper else c)
            upper = False
    return "".join(out)


def _checked(type_name: str, messages: dict[str, descriptor_pb2.DescriptorProto]) -> bool:
    """Whether the keys of a message type are checked: mlmesh's own, not well-known types."""
    return type_name.startswith("mlmesh.") and type_name in messages


class FieldCheck(NamedTuple):
    """How a JSON key's value is checked, and the field the key names."""

    kind: str  # "-" not checked inside, "message" an object (or array of objects) of message
    # type_name, "map" an object whose values are messages type_name
    type_name: str
    field: str  # the field's proto name: "lr" and "learning_rate" are one field


def message_schemas(descriptor_path: Path, roots: list[str]) -> dict[str, dict[str, FieldCheck]]:
    """JSON key -> check of each mlmesh message reachable from ``roots`` (full names)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    messages = _messages(fds)
    schemas: dict[str, dict[str, FieldCheck]] = {}
    todo = [r for r in roots if _checked(r, messages)]
    while todo:
        name = todo.pop()
        if name in schemas:
            continue
        keys: dict[str, FieldCheck] = {}
        for field in messages[name].field:
            kind, type_name = "-", ""
            if field.type == _FD.TYPE_MESSAGE:
                field_type = field.type_name.lstrip(".")
                entry = messages.get(field_type)
                if entry is not None and entry.options.map_entry:
                    value = next(f for f in entry.field if f.number == 2)
                    value_type = value.type_name.lstrip(".")
                    if value.type == _FD.TYPE_MESSAGE and _checked(value_type, messages):
                        kind, type_name = "map", value_type
                elif _checked(field_type, messages):
                    kind, type_name = "message", field_type
            if kind != "-":
                todo.append(type_name)
            # The transcoder takes these two keys only: with json_name = "lr", "learningRate"
            # is dropped like any unknown key.
            for key in (field.name, field.json_name or _lower_camel(field.name)):
                keys[key] = FieldCheck(kind, type_name, field.name)
        schemas[name] = keys
    return dict(sorted(schemas.items()))


def body_message(rpc: Rpc, binding: Binding, descriptor_path: Path) -> str | None:
    """The message type a REST binding's JSON body maps to; "" for a body that is JSON but no
    message (it names a scalar or map field: its JSON is checked, no keys); None for no body,
    or a raw one (an HttpBody field)."""
    if not binding.body:
        return None
    if binding.body == "*":
        return rpc.input_type
    # body names one field of the request: its message, unless it is a scalar or a map.
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    messages = _messages(fds)
    field = next(f for f in messages[rpc.input_type].field if f.name == binding.body)
    type_name = field.type_name.lstrip(".")
    if type_name == "google.api.HttpBody":  # the raw body (a file upload): not JSON at all
        return None
    if field.type != _FD.TYPE_MESSAGE or messages[type_name].options.map_entry:
        return ""
    return type_name


def _lua_string(text: str) -> str:
    """A Lua string literal of text (printable ASCII kept, every other byte escaped)."""
    out = []
    for b in text.encode():
        c = chr(b)
        out.append(c if 32 <= b < 127 and c not in '"\\' else f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def strict_json_lua(schemas: dict[str, dict[str, FieldCheck]]) -> str:
    """strict_json.lua with its SCHEMA table generated from ``schemas``."""
    index = {name: i for i, name in enumerate(schemas, 1)}
    lines = ["local SCHEMA = (function()", "  local m = {}"]
    lines += [
        f"  m[{i}] = {{name = {_lua_string(n)}, keys = false, fields = false}}"
        for n, i in index.items()
    ]
    for name, keys in schemas.items():
        lines.append(f"  m[{index[name]}].keys = {{")
        for key, check in keys.items():
            value = {"-": "true", "message": f"m[{index.get(check.type_name)}]"}.get(
                check.kind, f"{{map = m[{index.get(check.type_name)}]}}"
            )
            lines.append(f"    [{_lua_string(key)}] = {value},")
        lines.append("  }")
        lines.append(f"  m[{index[name]}].fields = {{")
        lines += [f"    [{_lua_string(k)}] = {_lua_string(c.field)}," for k, c in keys.items()]
        lines.append("  }")
    lines.append("  return {")
    lines += [f"    [{_lua_string(n)}] = m[{i}]," for n, i in index.items()]
    lines += ["  }", "end)()"]
    source = STRICT_JSON.read_text()
    if source.count(_SCHEMA_MARKER) != 1:
        raise ValueError(f"{STRICT_JSON.name} must hold the line {_SCHEMA_MARKER!r} once")
    return source.replace(_SCHEMA_MARKER, "\n".join(lines))


def response_field(rpc: Rpc, binding: Binding, descriptor_path: Path) -> str | None:
    """The field a binding's response_body names, checked to be the response's only field.

    Envoy's transcoder ignores response_body for JSON (envoyproxy/envoy#11136); the Lua
    filter unwraps ``{"<field>": X}`` to ``X`` instead, which is exact only for a response
    message with that one field.
    """
    if not binding.response_body:
        return None
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    fields = [f.name for f in _messages(fds)[rpc.output_type].field]
    if fields != [binding.response_body]:
        raise ValueError(
            f"{rpc.path}: response_body {binding.response_body!r} needs a response message "
            f"whose only field it is; {rpc.output_type} has {fields}"
        )
    return binding.response_body


def _has_custom_verb(template: str) -> bool:
    """Whether a path template ends in a custom verb, as "/v1/jobs/{id}:cancel" does."""
    return ":" in template.rsplit("/", 1)[-1].rsplit("}", 1)[-1]


# The upstream cluster of the Open Inference Protocol's REST face.
OIP_HTTP_CLUSTER = "inference_http"


def route_stat_prefix(cluster: str, method: str) -> str:
    """A route's stat_prefix: ``<cluster>_<Method>``, with only [A-Za-z0-9_] so that Envoy's
    tag extraction turns it into the ``envoy_route`` label of the Prometheus output."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{cluster}_{method}")


# -- replies Envoy makes itself -------------------------------------------------------------
# A local reply (api_key_auth's 401, strict_json.lua's and the transcoder's 400, no route, no
# healthy service, a body over the limit) is text. The connection manager's local_reply_config
# rewrites it into the error shape the services answer with: over REST {"code": <gRPC code>,
# "message": ..., "details": []} (google.rpc.Status, as the transcoder prints the services'
# errors), on the Open Inference Protocol's REST face {"error": ...} (that protocol's shape,
# which its clients read). Envoy turns a local reply to a gRPC request into grpc-status and
# grpc-message itself, the message being the reply's text: those replies keep their text.

# The gRPC code of each HTTP status of a local reply, as google.rpc.Code maps codes to HTTP;
# any other status >= 400 is UNKNOWN.
LOCAL_REPLY_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
NOT_RUNNING = (
    "the service behind this route is not running or not healthy; start it (see the README) "
    "and retry"
)
NO_ROUTE = "no such route; see the README for the API"
# The paths (query included) of the Open Inference Protocol's REST face: OIP_REST_ROUTES.
OIP_PATHS = r"^/v2([/?].*)?$"


def _status_is(status: int, op: str = "EQ") -> dict:
    value = {"default_value": status, "runtime_key": f"mlmesh.local_reply.{op.lower()}_{status}"}
    return {"status_code_filter": {"comparison": {"op": op, "value": value}}}


def _header(name: str, **match: object) -> dict:
    return {"header_filter": {"header": {"name": name, **match}}}


def _all(*filters: dict) -> dict:
    return {"and_filter": {"filters": list(filters)}}


def _error_json(code: grpc.StatusCode) -> dict:
    return {"code": code.value[0], "message": "%LOCAL_REPLY_BODY%", "details": []}


def local_reply_mappers(body_limit: int) -> list[dict]:
    """local_reply_config's mappers, in order (Envoy applies the first whose filter matches):
    each a filter, and the text (body) and JSON format (json) it rewrites the reply to."""
    # A REST request transcoded to gRPC has content-type application/grpc by the time the
    # router answers, but also x-envoy-original-path (set by the transcoder), which a gRPC
    # request lacks.
    grpc_request = [
        _header("content-type", string_match={"prefix": "application/grpc"}),
        _header("x-envoy-original-path", present_match=True, invert_match=True),
    ]
    oip_request = _header(":path", string_match={"safe_regex": {"regex": OIP_PATHS}})
    not_running = {"response_flag_filter": {"flags": ["UH", "UF"]}}
    no_key = f"missing or invalid API key: send it in the {API_KEY_HEADER}"
    # Replies whose text says more than Envoy's: (filter, their status, text).
    texts = [
        (not_running, 503, NOT_RUNNING),
        (_status_is(401), 401, f"{no_key} header"),
        (_status_is(413), 413, f"request body is larger than the gateway accepts ({body_limit} "
         "bytes of JSON)"),
    ]  # fmt: skip
    oip_error = {"error": "%LOCAL_REPLY_BODY%"}
    return [
        {"filter": _all(*grpc_request, not_running), "body": NOT_RUNNING},
        {"filter": _all(*grpc_request, _status_is(401)), "body": f"{no_key} metadata"},
        {"filter": _all(*grpc_request)},  # anything else to a gRPC request: as it is
        *[
            {"filter": _all(oip_request, f), "body": text, "json": oip_error}
            for f, _, text in texts
        ],
        {"filter": _all(oip_request, _status_is(400, "GE")), "json": oip_error},
        *[
            {"filter": f, "body": text, "json": _error_json(LOCAL_REPLY_CODES[status])}
            for f, status, text in texts
        ],
        *[
            {"filter": _status_is(status), "json": _error_json(code)}
            for status, code in LOCAL_REPLY_CODES.items()
        ],
        {"filter": _status_is(400, "GE"), "json": _error_json(grpc.StatusCode.UNKNOWN)},
    ]


# -- MLflow's UI and API ---------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowRoute:
    """One route of the MLflow listener: a line of gateway/policy.py's MLFLOW_ROUTES."""

    key: str  # "VERB path", as MLFLOW_ROUTES writes it
    verb: str
    regex: str  # RE2, on the path without its query
    rule: MlflowRule


def mlflow_path_regex(template: str) -> str:
    """An RE2 regex for the paths an MLFLOW_ROUTES path matches ({api} and {artifacts} expanded)."""
    for macro, prefix in MLFLOW_PREFIXES.items():
        if template.startswith(macro):
            return "^" + prefix + template_regex(template[len(macro) :])[1:]
    return template_regex(template)


def mlflow_routes() -> list[MlflowRoute]:
    """MLFLOW_ROUTES in the order the listener tries them: paths without variables first, so
    that "GET {api}traces/get" is not taken by "GET {api}traces/{trace_id}"."""
    routes = []
    for key, rule in MLFLOW_ROUTES.items():
        verb, template = key.split(" ", 1)
        routes.append(MlflowRoute(key, verb, mlflow_path_regex(template), rule))

    def has_variables(route: MlflowRoute) -> bool:
        path = route.key.split(" ", 1)[1]
        for macro in MLFLOW_PREFIXES:
            path = path.removeprefix(macro)
        return _TEMPLATE_VAR.search(path) is not None

    return sorted(routes, key=has_variables)


def classify_mlflow(
    verb: str, path: str, routes: list[MlflowRoute] | None = None
) -> MlflowRoute | None:
    """The route the MLflow listener takes for ``verb`` ``path`` (first match, as Envoy's),
    or None: refused as unclassified."""
    for route in routes if routes is not None else mlflow_routes():
        if route.verb == verb and re.fullmatch(route.regex, path):
            return route
    return None


NOT_CLASSIFIED = (
    "this MLflow route is not offered through mlmesh's gateway: it is not in "
    "gateway/policy.py's MLflow table (deny by default)"
)
MLFLOW_NOT_RUNNING = "MLflow is not running or not reachable from the gateway; retry shortly"
MLFLOW_NO_KEY = (
    "missing or invalid API key: set MLFLOW_TRACKING_TOKEN to your mlmesh API key (MLflow sends "
    f"it as Authorization: Bearer), or send it in the {API_KEY_HEADER} header"
)
MLFLOW_BAD_REQUEST = (
    "the gateway refused a malformed request (a path with an escaped slash, %2F, is refused)"
)
# The error codes of MLflow's REST API (MLflow's clients raise them as MlflowException).
_MLFLOW_CODES = {
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "ENDPOINT_NOT_FOUND",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
}


def mlflow_local_reply_mappers() -> list[dict]:
    """The MLflow listener's replies of its own, in MLflow's error shape:
    {"error_code": ..., "message": ...}."""

    def error(code: str) -> dict:
        return {"error_code": code, "message": "%LOCAL_REPLY_BODY%"}

    not_running = {"response_flag_filter": {"flags": ["UH", "UF"]}}
    return [
        {
            "filter": not_running,
            "body": MLFLOW_NOT_RUNNING,
            "json": error("TEMPORARILY_UNAVAILABLE"),
        },
        {"filter": _status_is(401), "body": MLFLOW_NO_KEY, "json": error("UNAUTHENTICATED")},
        # Envoy's own 400s come without a text: a malformed request, or an escaped slash.
        {"filter": _status_is(400), "body": MLFLOW_BAD_REQUEST, "json": error("BAD_REQUEST")},
        *[
            {"filter": _status_is(status), "json": error(code)}
            for status, code in _MLFLOW_CODES.items()
            if status != 401
        ],
        {"filter": _status_is(500, "GE"), "json": error("INTERNAL_ERROR")},
        {"filter": _status_is(400, "GE"), "json": error("BAD_REQUEST")},
    ]


def mesh_tls_files(settings: Settings) -> dict[str, str]:
    """The certificate files the gateway's upstream mutual TLS uses, as absolute paths;
    ValueError naming what is missing and how to make it."""
    files = settings.mesh_tls
    wanted = {"ca": files.ca_cert, "cert": files.gateway_cert, "key": files.gateway_key}
    missing = files.missing(*wanted.values())
    if missing:
        raise ValueError(
            f"the mesh's certificates are missing ({', '.join(map(str, missing))}): the gateway "
            "talks to the services over mutual TLS. `make up` makes them; elsewhere run "
            "`python -m services.launcher mesh-certs --dir DIR` and set MLMESH_MTLS_DIR=DIR"
        )
    return {name: str(path.resolve()) for name, path in wanted.items()}


def render_envoy_config(settings: Settings, descriptor_path: Path, out_path: Path) -> Path:
    """Write Envoy's config for ``settings`` to ``out_path``, and beside it the API keys
    (``ENVOY_KEYS_FILE``, which Envoy watches); both mode 0600."""
    rpcs = mesh_rpcs(descriptor_path)
    unclassified = [r.path for r in rpcs if r.path not in RPC_ACCESS]
    if unclassified:
        raise ValueError(
            "RPCs missing from gateway/policy.py RPC_ACCESS: " + ", ".join(unclassified)
        )
    keys = load_api_keys(settings)
    if not keys:
        raise ApiKeyError("no API keys configured: set MLMESH_API_KEYS or MLMESH_API_KEYS_FILE")
    mesh_tls = mesh_tls_files(settings)
    # Each cluster's endpoints, as (host, port): one per Inference process of the launcher,
    # which Envoy balances per request (see the README's architecture section).
    inference = settings.inference_endpoints()
    endpoints = {
        "registry": [split_address(settings.registry_address)],
        "training": [split_address(settings.training_address)],
        "inference": [split_address(e.address) for e in inference],
    }
    clusters = []
    for service, cluster in SERVICE_CLUSTERS.items():
        if any(c["name"] == cluster for c in clusters):
            continue  # health-checked through the first service it serves
        clusters.append({"name": cluster, "service": service, "endpoints": endpoints[cluster]})
    # Native gRPC requests match a route by RPC path. REST requests meet api_key_auth and
    # strict_json.lua before the transcoder, on their REST path: every REST binding has a
    # route, public only where the RPC is, that names the message its body maps to; any other
    # path falls to the protected catch-all, so it fails closed. (After the transcoder the
    # router re-selects the route by RPC path.) Templates with a custom verb go first, so
    # "/v1/jobs/x:watch" takes its own route rather than that of "/v1/jobs/{id}".
    routes, rest = [], []
    for r in rpcs:
        cluster = SERVICE_CLUSTERS[r.service]
        public = RPC_ACCESS[r.path] == "public"
        timeout = "0s" if r.streaming else "60s"
        name = f"{cluster}.{r.method}"
        routes.append(
            {
                "name": name,
                # Per-route upstream stats (vhost.mesh.route.<stat_prefix>.*): the router
                # counts a request on the route it finally takes, this RPC-path one, for
                # native gRPC and transcoded REST alike; so the REST routes need none.
                "stat_prefix": route_stat_prefix(cluster, r.method),
                "path": r.path,
                "cluster": cluster,
                "timeout": timeout,
                "public": public,
                "verb": None,
                "message": None,
                "response_body": None,
            }
        )
        rest += [
            {
                "name": f"{name}.rest{i}",
                "regex": template_regex(b.template),
                "verb": b.verb,
                "stat_prefix": None,
                "cluster": cluster,
                "timeout": timeout,
                "public": public,
                "message": body_message(r, b, descriptor_path),
                "response_body": response_field(r, b, descriptor_path),
                "first": _has_custom_verb(b.template),
            }
            for i, b in enumerate(r.bindings)
        ]
    routes += sorted(rest, key=lambda route: not route["first"])
    # The Open Inference Protocol's REST face: forwarded as is (see gateway/policy.py).
    routes += [
        {
            "name": f"{OIP_HTTP_CLUSTER}.{method}.rest{i}",
            "regex": template_regex(template),
            "verb": verb,
            "stat_prefix": route_stat_prefix(OIP_HTTP_CLUSTER, method),
            "cluster": OIP_HTTP_CLUSTER,
            "timeout": "60s",
            "public": RPC_ACCESS[f"/{OIP_SERVICE}/{method}"] == "public",
            "message": None,
            "response_body": None,
        }
        for i, (verb, template, method) in enumerate(OIP_REST_ROUTES)
    ]
    schemas = message_schemas(descriptor_path, [r["message"] for r in rest if r["message"]])
    # JSON spells a message in up to about 4 times its protobuf bytes (floats as text).
    body_limit = 4 * settings.grpc_max_message_bytes
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    text = env.get_template(TEMPLATE.name).render(
        admin_port=settings.gateway_admin_port,
        metrics_port=settings.gateway_metrics_port,
        listen_host=settings.gateway_host,
        listen_port=settings.gateway_port,
        client_header=CLIENT_HEADER,
        public=_PUBLIC,
        routes=routes,
        # The transcoder needs only the services with REST bindings.
        services=sorted({r.service for r in rpcs if r.bindings}),
        descriptor=descriptor_path.resolve(),
        api_keys_config=write_envoy_keys(keys, out_path.parent / ENVOY_KEYS_FILE).resolve(),
        mlflow_keys_config=(out_path.parent / ENVOY_MLFLOW_KEYS_FILE).resolve(),
        mlflow_filter=MLFLOW_FILTER_NAME,
        mlflow_public=_MLFLOW_PUBLIC,
        mlflow_port=settings.gateway_mlflow_port,
        mlflow_routes=mlflow_routes(),
        mlflow_upstream={
            "host": urlsplit(settings.mlflow_tracking_uri).hostname or "127.0.0.1",
            "port": settings.mlflow_port,
            "netloc": urlsplit(settings.mlflow_tracking_uri).netloc,
        },
        mlflow_local_replies=mlflow_local_reply_mappers(),
        mlflow_not_classified=NOT_CLASSIFIED,
        mesh_tls=mesh_tls,
        mesh_service_name=MESH_SERVICE_NAME,
        grpc_clusters=clusters,
        oip_http={
            "name": OIP_HTTP_CLUSTER,
            "endpoints": [(e.host, e.http_port) for e in inference],
        },
        ops_host=split_address(settings.registry_address)[0],
        ops_port=settings.registry_ops_port,
        strict_json=strict_json_lua(schemas),
        body_limit=body_limit,
        local_replies=local_reply_mappers(body_limit),
        no_route=NO_ROUTE,
        tls=(
            {
                "cert": str(settings.gateway_tls_cert_file.resolve()),
                "key": str(settings.gateway_tls_key_file.resolve()),
            }
            if settings.gateway_tls
            else None
        ),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return out_path
