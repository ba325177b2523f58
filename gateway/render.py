"""Build the gateway's descriptor set and render its Envoy configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from gateway.keys import ApiKeyError, load_api_keys
from gateway.policy import RPC_ACCESS, SERVICE_CLUSTERS
from services.common.interceptors import CLIENT_HEADER
from services.common.settings import Settings, split_address

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("envoy.yaml.j2")
# Envoy turns an api_key_auth-disabled route into a public one.
_PUBLIC = (
    '{"envoy.filters.http.api_key_auth": '
    '{"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}}'
)


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


@dataclass(frozen=True)
class Rpc:
    """One RPC of the contract, as the gateway sees it."""

    service: str
    method: str
    streaming: bool
    bindings: tuple[Binding, ...]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


def _bindings(rule: annotations_pb2.http_pb2.HttpRule) -> list[Binding]:
    verb = rule.WhichOneof("pattern")
    found = [Binding(verb.upper(), getattr(rule, verb))] if verb and verb != "custom" else []
    for extra in rule.additional_bindings:
        found += _bindings(extra)
    return found


def mesh_rpcs(descriptor_path: Path) -> list[Rpc]:
    """Every RPC of every mlmesh service in a descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    rpcs = []
    for file in fds.file:
        if not file.package.startswith("mlmesh."):
            continue
        for service in file.service:
            full = f"{file.package}.{service.name}"
            for m in service.method:
                streaming = m.client_streaming or m.server_streaming
                rule = m.options.Extensions[annotations_pb2.http]
                rpcs.append(Rpc(full, m.name, streaming, tuple(_bindings(rule))))
    return rpcs


def render_envoy_config(settings: Settings, descriptor_path: Path, out_path: Path) -> Path:
    """Write Envoy's config for ``settings`` to ``out_path`` (mode 0600: it holds the keys)."""
    rpcs = mesh_rpcs(descriptor_path)
    unclassified = [r.path for r in rpcs if r.path not in RPC_ACCESS]
    if unclassified:
        raise ValueError(
            "RPCs missing from gateway/policy.py RPC_ACCESS: " + ", ".join(unclassified)
        )
    keys = load_api_keys(settings)
    if not keys:
        raise ApiKeyError("no API keys configured: set MLMESH_API_KEYS or MLMESH_API_KEYS_FILE")
    addresses = {
        "registry": settings.registry_address,
        "training": settings.training_address,
        "inference": settings.inference_address,
    }
    clusters = []
    for service, cluster in SERVICE_CLUSTERS.items():
        host, port = split_address(addresses[cluster])
        clusters.append({"name": cluster, "service": service, "host": host, "port": port})
    # Native gRPC requests match a route by RPC path. REST requests meet api_key_auth before
    # the transcoder, on their REST path: public RPCs get a route per REST binding, and the
    # rest fall to the protected catch-all, so an unlisted REST path fails closed.
    routes = []
    for r in rpcs:
        cluster = SERVICE_CLUSTERS[r.service]
        public = RPC_ACCESS[r.path] == "public"
        timeout = "0s" if r.streaming else "60s"
        name = f"{cluster}.{r.method}"
        routes.append(
            {
                "name": name,
                "path": r.path,
                "cluster": cluster,
                "timeout": timeout,
                "public": public,
                "verb": None,
            }
        )
        if public:
            routes += [
                {
                    "name": f"{name}.rest{i}",
                    "regex": template_regex(b.template),
                    "verb": b.verb,
                    "cluster": cluster,
                    "timeout": timeout,
                    "public": True,
                }
                for i, b in enumerate(r.bindings)
            ]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    text = env.get_template(TEMPLATE.name).render(
        admin_port=settings.gateway_admin_port,
        listen_host=settings.gateway_host,
        listen_port=settings.gateway_port,
        client_header=CLIENT_HEADER,
        public=_PUBLIC,
        routes=routes,
        services=list(SERVICE_CLUSTERS),
        descriptor=descriptor_path.resolve(),
        credentials=sorted(keys.items()),
        grpc_clusters=clusters,
        ops_host=split_address(settings.registry_address)[0],
        ops_port=settings.registry_ops_port,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return out_path
