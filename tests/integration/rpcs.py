"""The RPCs of the gateway's descriptor set, read from the set itself, for the tests that
must cover every RPC (tests/integration/test_auth_matrix.py, test_fuzz.py)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from gateway.render import build_descriptor_set

DESCRIPTOR = build_descriptor_set(Path(tempfile.mkdtemp(prefix="mlmesh-auth-")) / "mlmesh.binpb")
# Packages of the imports the descriptor set carries, not services of ours.
_NOT_OURS = ("google.", "grpc.")


@dataclass(frozen=True)
class Method:
    """One RPC as the descriptor set declares it."""

    path: str  # /package.Service/Method
    client_streaming: bool
    server_streaming: bool
    rest: tuple[tuple[str, str, str], ...]  # (verb, path template, body) of each HTTP binding


def _http_bindings(rule: annotations_pb2.http_pb2.HttpRule) -> list[tuple[str, str, str]]:
    verb = rule.WhichOneof("pattern")
    found = []
    if verb == "custom":
        found.append((rule.custom.kind, rule.custom.path, rule.body))
    elif verb:
        found.append((verb.upper(), getattr(rule, verb), rule.body))
    for extra in rule.additional_bindings:
        found += _http_bindings(extra)
    return found


def descriptor_methods(path: Path) -> list[Method]:
    """Every RPC of every service in a descriptor set, imports' own services aside."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    methods = []
    for file in fds.file:
        if file.package.startswith(_NOT_OURS):
            continue
        prefix = f"{file.package}." if file.package else ""
        for service in file.service:
            for m in service.method:
                rule = m.options.Extensions[annotations_pb2.http]
                methods.append(
                    Method(
                        f"/{prefix}{service.name}/{m.name}",
                        m.client_streaming,
                        m.server_streaming,
                        tuple(_http_bindings(rule)),
                    )
                )
    return methods
