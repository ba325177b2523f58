"""`make demo` as a user runs it (shortened training), twice on one state directory.

The second run finds the first run's mesh state: the same databases and artifacts (paired),
an earlier version in production. Its own version is promoted, with force if it scored lower.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.launcher.mesh import child_env
from tests.conftest import drop_databases, isolated_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_twice_on_one_state_directory(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path / "state")
    env = child_env(settings)
    env.pop("MLMESH_API_KEYS_FILE", None)
    try:
        outputs = []
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, "scripts/demo.py", "--epochs", "1", "--train-subset", "2000"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            outputs.append(done.stdout)
    finally:
        drop_databases(settings)
    for run, out in enumerate(outputs, start=1):
        assert f"demo finished: trained mnist-classifier v{run} " in out, out
        # A new image is computed, and its repeat comes from the cache.
        first = re.search(r"first : class \d .* cached: (\w+)", out)
        repeat = re.search(r"repeat: class \d .* cached: (\w+)", out)
        assert first and repeat, out
        assert (first.group(1), repeat.group(1)) == ("false", "true"), out
        assert "MLflow UI" in out
        # It ends by showing where the MLflow UI is: through the gateway.
        last = out.rstrip().splitlines()[-1]
        assert last.startswith("MLflow UI (through the gateway") and (
            f"http://127.0.0.1:{settings.gateway_mlflow_port}/#/experiments/" in last
        ), last
    assert "archived [1]" in outputs[1], outputs[1]
