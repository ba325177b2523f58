"""Processes a test starts beside the session's mesh: a private Redis, an extra Inference
or Registry replica, a second gateway."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.render import render_envoy_config, tool
from services.common.settings import Settings
from services.launcher.mesh import child_env, grpc_serving, http_ok
from tests.conftest import free_port


class PrivateRedisServer:
    """A redis-server of this test's own, on a free port; stop() and start() at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


@contextlib.contextmanager
def service_replica(
    settings: Settings, service: str, address: str, log_path: Path
) -> Iterator[None]:
    """A process of ``services.<service>`` with ``settings`` (give it ports of its own),
    serving at ``address``, until the block ends."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            env=child_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not grpc_serving(settings.health_address(address)):
                assert process.poll() is None, f"the replica exited; see {log_path}"
                assert time.monotonic() < deadline, f"the replica did not start; see {log_path}"
                time.sleep(0.25)
            yield
        finally:
            process.terminate()
            process.wait(30)


def inference_replica(settings: Settings, log_path: Path) -> contextlib.AbstractContextManager:
    """An Inference process of ``settings`` (give it ports of its own), until the block ends."""
    return service_replica(settings, "inference", settings.inference_address, log_path)


@contextlib.contextmanager
def second_gateway(
    settings: Settings, descriptor: Path, state_dir: Path, **updates: object
) -> Iterator[Settings]:
    """Another Envoy in front of the services of ``settings``, on ports of its own, with
    ``updates`` to its settings; its settings, once /ready through it answers."""
    own = settings.model_copy(
        update={
            "gateway_port": free_port(),
            "gateway_admin_port": free_port(),
            "gateway_metrics_port": free_port(),
            "gateway_mlflow_port": free_port(),
            "state_dir": state_dir,
            **updates,
        }
    )
    config = render_envoy_config(own, descriptor, state_dir / "envoy.yaml")
    log_path = state_dir / "envoy.log"
    with log_path.open("wb") as log:
        envoy = subprocess.Popen(
            [tool("envoy"), "-c", str(config), "--log-level", "warn", "--use-dynamic-base-id"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not http_ok(f"{own.gateway_url}/ready"):
                assert envoy.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "the second gateway did not become ready"
                time.sleep(0.2)
            yield own
        finally:
            envoy.terminate()
            envoy.wait(10)
