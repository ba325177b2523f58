"""The layers point one way (README, "Layers"): every module's imports, read with ast, against
what its layer may import.

- the client (clients/python: the generated ``mlmesh`` and ``mlmesh_client``) imports only
  itself, the standard library and the dependencies its own pyproject.toml declares;
- ``services.common``, the kit, imports no service and no launcher;
- Registry, Training and Inference import the kit and the generated package, never each
  other; the datasets domain imports none of them, and only Training imports it;
- the gateway takes from the kit only its leaves (the settings, the header names, the grammar
  of the rate limits the settings check), which import nothing of the project but each other;
- no service imports the gateway;
- nothing imports the launcher (the composition root) but the launcher, the scripts, the
  benchmarks and the tests.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
SERVICES = ("registry", "training", "inference", "datasets")
# service -> the other services it may import
SERVICE_MAY_IMPORT = {"training": {"datasets"}}
# The kit's leaves: configuration and names, with no gRPC server, Redis or database behind
# them. The gateway takes only these from the kit, and they import only each other.
KIT_LEAVES = {"services.common.settings", "services.common.headers", "services.common.limits"}
LAUNCHER_USERS = ("services.launcher", "scripts", "bench", "tests")


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. services.training.jobs
    path: Path
    source: str


def _module_name(path: Path) -> str:
    base = CLIENT if path.is_relative_to(CLIENT) else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> list[Module]:
    """Every Python module of the project (the client's, the server's, scripts, bench, tests)."""
    roots = [CLIENT / "mlmesh", CLIENT / "mlmesh_client"]
    roots += [ROOT / d for d in ("services", "gateway", "scripts", "bench", "tests")]
    return [
        Module(_module_name(p), p, p.read_text())
        for root in roots
        for p in sorted(root.rglob("*.py"))
    ]


def imports(module: Module) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything ``module`` imports, at any depth of its code."""
    for node in ast.walk(ast.parse(module.source, str(module.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = module.name.split(".")
                if not module.path.name == "__init__.py":
                    package = package[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                yield node.lineno, f"{base}.{node.module}" if node.module else base
            else:
                yield node.lineno, node.module or ""


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def client_distributions() -> set[str]:
    """The client's declared dependencies, normalised distribution names."""
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    return {_normal(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in project["dependencies"]}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions_of(top: str) -> set[str]:
    return {_normal(d) for d in _installed().get(top, [])}


def violations(modules: list[Module], client_deps: set[str]) -> list[str]:
    """What breaks the layer rules, as "path:line: module imports name (why)"."""
    found = []
    for module in modules:
        for line, name in imports(module):
            why = _rule_broken(module.name, name, client_deps)
            if why:
                found.append(f"{module.path.relative_to(ROOT)}:{line}: imports {name} ({why})")
    return found


def _rule_broken(importer: str, name: str, client_deps: set[str]) -> str:
    top = name.split(".")[0]
    if _under(importer, "mlmesh", "mlmesh_client"):
        if top in sys.stdlib_module_names or top in ("mlmesh", "mlmesh_client"):
            return ""
        if _distributions_of(top) & client_deps:
            return ""
        return "the client imports only itself, the standard library and its declared deps"
    if _under(name, "services.launcher") and not _under(importer, *LAUNCHER_USERS):
        return "only the launcher, scripts, bench and tests import the launcher"
    if (
        _under(importer, "services.common")
        and _under(name, "services")
        and not _under(name, "services.common")
    ):
        return "the kit imports no service"
    for service in SERVICES:
        if not _under(importer, f"services.{service}"):
            continue
        for other in SERVICES:
            if other != service and _under(name, f"services.{other}"):
                if other not in SERVICE_MAY_IMPORT.get(service, set()):
                    return f"services.{service} may not import services.{other}"
    if (
        _under(name, "gateway")
        and _under(importer, "services")
        and not _under(importer, "services.launcher")
    ):
        return "no service imports the gateway: the launcher composes the two"
    if _under(importer, "gateway") and _under(name, "services") and name not in KIT_LEAVES:
        return "the gateway takes only the kit's leaves (settings, header names) from it"
    if importer in KIT_LEAVES and _under(name, "services", "gateway", "mlmesh"):
        if name not in KIT_LEAVES:
            return "the kit's leaves import nothing of the project but each other"
    return ""


def test_the_layers_point_one_way() -> None:
    modules = project_modules()
    assert len(modules) > 100 and any(m.name == "mlmesh_client.cli" for m in modules)
    assert violations(modules, client_distributions()) == []


def test_the_client_declares_only_small_dependencies() -> None:
    deps = client_distributions()
    assert deps == {"grpcio", "protobuf", "googleapis-common-protos", "numpy", "pillow"}


PLANTED = [
    ("mlmesh_client.cli", "from services.launcher.cli import main", "the client imports only"),
    ("mlmesh_client.client", "import torch", "the client imports only"),
    ("mlmesh_client.api", "from gateway.keys import API_KEY_HEADER", "the client imports only"),
    ("services.common.process", "from services.training.jobs import Jobs", "the kit imports"),
    ("services.inference.repository", "from services.registry import store", "may not import"),
    ("services.registry.serving", "from services.inference import runtime", "may not import"),
    ("services.datasets.service", "from services.training import params", "may not import"),
    ("services.inference.servicer", "from . import runtime\nfrom ..training import jobs", "may"),
    ("gateway.render", "from services.common.interceptors import X", "the gateway takes only"),
    ("services.training.server", "import services.launcher.mesh", "only the launcher"),
    ("services.common.headers", "from services.common import server", "import nothing of"),
    ("services.registry.server", "from gateway.keys import load_api_keys", "no service imports"),
]


@pytest.mark.parametrize(("importer", "source", "why"), PLANTED)
def test_a_planted_import_against_the_rules_is_found(importer: str, source: str, why: str) -> None:
    path = ROOT / (importer.replace(".", "/") + ".py")
    if importer.startswith("mlmesh"):
        path = CLIENT / (importer.replace(".", "/") + ".py")
    (found,) = violations([Module(importer, path, source)], client_distributions())[-1:]
    assert why in found, found


def test_imports_the_rules_allow_are_not_found() -> None:
    allowed = [
        ("services.training.worker", "from services.datasets.store import DatasetStore"),
        ("gateway.keys", "from services.common.headers import CLIENT_HEADER"),
        ("tests.integration.test_x", "from services.launcher.mesh import Mesh"),
        ("mlmesh_client.images", "import numpy as np\nfrom PIL import Image\nimport grpc"),
        ("mlmesh.registry.v1.registry_pb2", "from google.api import annotations_pb2"),
    ]
    modules = [Module(n, ROOT / "x.py", s) for n, s in allowed]
    assert violations(modules, client_distributions()) == []
