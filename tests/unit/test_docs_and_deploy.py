"""Docs that match the code, and deployment files that validate."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.render import tool
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"MLMESH_{name.upper()}"
        for name in Settings.model_fields
        if f"`MLMESH_{name.upper()}`" not in readme
    ]
    assert not missing, f"README's configuration table lacks {missing}"


def test_compose_envoy_matches_the_local_envoy() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["envoy"]["image"]
    local = subprocess.run([tool("envoy"), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"/(\d+\.\d+\.\d+)/", local).group(1)
    assert image == f"envoyproxy/envoy:v{version}"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (.ci/run installs it)",
)
def test_compose_file_validates(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text("ci=" + "k" * 24 + "\n")
    env = {
        **os.environ,
        "POSTGRES_PASSWORD": "ci",
        "GRAFANA_ADMIN_PASSWORD": "ci",
        "API_KEYS_FILE": str(keys),
    }
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_have_healthchecks_and_wait_for_health() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if service.get("restart") != "no":  # one-shot jobs (gateway-config) have none
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert how.get("condition") in {
                "service_healthy",
                "service_completed_successfully",
            }, f"{name} -> {dep}"


def test_compose_monitoring() -> None:
    compose = _compose()
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        image = service["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{image} is not pinned to a version"
        # published on loopback only
        assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), service["ports"]
        named = [v.split(":")[0] for v in service["volumes"] if not v.startswith(".")]
        assert named and all(v in compose["volumes"] for v in named)
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert (ROOT / "deploy/prometheus/prometheus.yml").exists()
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    # the password comes from .env, never from the compose file
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    mlflow = services["mlflow"]["command"]
    assert mlflow[mlflow.index("--expose-prometheus") + 1].startswith("/var/lib/mlmesh/")
    assert services["worker"]["environment"]["MLMESH_WORKER_OPS_HOST"] == "0.0.0.0"
    example = (ROOT / ".env.example").read_text()
    for variable in ("PROMETHEUS_PORT", "GRAFANA_PORT", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{variable}=", example, re.M), f".env.example lacks {variable}"


def test_compose_has_one_front_door_and_mounts_the_mesh_certificates() -> None:
    compose = _compose()
    services = compose["services"]
    directory = compose["x-mlmesh"]["environment"]["MLMESH_MTLS_DIR"]
    # Only the gateway publishes MLflow and the API; MLflow and the services publish nothing.
    for name in ("mlflow", "registry", "training", "inference", "worker"):
        assert "ports" not in services[name], name
    assert services["envoy"]["ports"] == ["${GATEWAY_PORT:-8000}:8000", "${MLFLOW_PORT:-5000}:5000"]
    assert services["gateway-config"]["environment"]["MLMESH_GATEWAY_MLFLOW_PORT"] == "5000"

    def mounted(name: str) -> dict[str, str]:
        return {
            s["target"]: compose["secrets"][s["source"]]["file"]
            for s in services[name]["secrets"]
            if isinstance(s, dict)
        }

    own = {"ca.crt", "service.crt", "service.key"}
    for name, health in (("registry", 50061), ("training", 50062), ("inference", 50063)):
        files = mounted(name)
        assert set(files) == {f"{directory}/{f}" for f in own}, name
        assert all(path.endswith(target.rsplit("/", 1)[1]) for target, path in files.items())
        # Their health checks ask the plain-text health port.
        assert f"127.0.0.1:{health}" in services[name]["healthcheck"]["test"][-1], name
    # One Inference process per container, and one gateway endpoint that Docker's DNS
    # resolves to every container: compose scales with --scale inference=N.
    for name in ("inference", "gateway-config"):
        assert services[name]["environment"]["MLMESH_INFERENCE_PROCESSES"] == "1", name
    gateway = {"ca.crt", "gateway.crt", "gateway.key"}
    for name in ("gateway-config", "envoy"):
        assert set(mounted(name)) == {f"{directory}/{f}" for f in gateway}, name
    assert not any("ca.key" in s["file"] for s in compose["secrets"].values())
