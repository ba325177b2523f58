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
    env = {**os.environ, "POSTGRES_PASSWORD": "ci", "API_KEYS_FILE": str(keys)}
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
