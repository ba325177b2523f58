"""The local mesh: every component as a child process, started in order and stopped in reverse."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from itertools import groupby
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.keys import (
    API_KEY_HEADER,
    ENVOY_KEYS_FILE,
    ApiKeyError,
    ApiKeysWatcher,
    load_api_keys,
    write_dev_key,
)
from gateway.render import build_descriptor_set, render_envoy_config, tool
from gateway.tls import ensure_mesh_certificates
from services.common.db import database_name
from services.common.settings import Settings, split_address
from services.launcher.backing import PrivateRedis, postgres_specs
from services.launcher.process import (
    Child,
    ChildSpec,
    Command,
    LaunchAborted,
    LaunchError,
    port_open,
)
from services.launcher.state import artifact_root, check_state
from services.launcher.watchdog import Watchdog

log = logging.getLogger(__name__)


# -- readiness probes: each answers True/False and never raises ---------------------------------


def http_ok(url: str) -> bool:
    """True when GET url answers 200 (over https, the certificate is not checked: the
    launcher asks its own children, on this machine)."""
    try:
        return httpx.get(url, timeout=2.0, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def grpc_serving(address: str) -> bool:
    """True when the server at address (a service's plain-text health port,
    Settings.health_address) says SERVING for the whole server (service "")."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# -- child specs --------------------------------------------------------------------------------


def python_service(
    settings: Settings, name: str, module: str, address: str, *ops_ports: int
) -> ChildSpec:
    """An mlmesh gRPC service run as `python -m <module>`, ready once its health port says
    SERVING."""
    host, port = split_address(address)
    health = settings.health_address(address)
    return ChildSpec(
        name=name,
        what=f"{name} service at {address}",
        command=lambda: Command([sys.executable, "-m", module]),
        ready=partial(grpc_serving, health),
        timeout_s=60.0,
        ports=[(host, port), split_address(health), *((host, p) for p in ops_ports)],
    )


def inference_specs(settings: Settings) -> list[ChildSpec]:
    """The Inference processes (Settings.inference_endpoints), started together: each gets
    its own ports as MLMESH_INFERENCE_* variables, and the gateway balances over them."""
    specs = []
    for endpoint in settings.inference_endpoints():
        own = settings.for_inference_process(endpoint)
        spec = python_service(
            own,
            endpoint.name,
            "services.inference",
            endpoint.address,
            endpoint.ops_port,
            endpoint.http_port,
        )
        env = {f"MLMESH_{k.upper()}": str(v) for k, v in endpoint.settings_update().items()}
        specs.append(replace(spec, env=env, group="inference"))
    return specs


def worker_spec(settings: Settings) -> ChildSpec:
    """One ARQ training worker; `make up` starts one, scale by running more (any machine)."""
    ops = f"http://127.0.0.1:{settings.worker_ops_port}/health"
    return ChildSpec(
        name="worker",
        what=f"training worker on queue {settings.training_queue}",
        command=lambda: Command([sys.executable, "-m", "services.training.worker"]),
        ready=partial(http_ok, ops),
        timeout_s=60.0,
        ports=[("127.0.0.1", settings.worker_ops_port)],
    )


def mlflow_spec(settings: Settings) -> ChildSpec:
    """`mlflow server` over the PostgreSQL backend store, artifacts under the state dir."""
    uri = settings.mlflow_tracking_uri.rstrip("/")
    host = urlsplit(uri).hostname or "127.0.0.1"

    def command() -> Command:
        # The database must describe the artifacts this server will serve (state.py).
        check_state(settings)
        return Command(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                settings.mlflow_backend_sqlalchemy_uri,
                "--artifacts-destination",
                str(artifact_root(settings)),
                "--host",
                host,
                "--port",
                str(settings.mlflow_port),
                "--workers",
                "1",
                # Prometheus metrics on /metrics (kept between runs with the artifacts).
                "--expose-prometheus",
                str(settings.state_dir / "mlflow-metrics"),
            ]
        )

    return ChildSpec(
        name="mlflow",
        what=f"MLflow server at {uri}",
        command=command,
        ready=partial(http_ok, f"{uri}/health"),
        # The first start on a new database runs all of MLflow's migrations.
        timeout_s=180.0,
        reuse_existing=True,
        ports=[(host, settings.mlflow_port)],
    )


def envoy_spec(settings: Settings) -> ChildSpec:
    """The Envoy gateway, ready once /ready through it answers 200 (the services' backends up)."""

    def command() -> Command:
        descriptor = build_descriptor_set(settings.state_dir / "mlmesh.binpb")
        config = render_envoy_config(settings, descriptor, settings.state_dir / "envoy.yaml")
        # A dynamic base id lets several Envoys (other meshes, tests) share one machine.
        argv = [tool("envoy"), "-c", config, "--log-level", "warn", "--use-dynamic-base-id"]
        return Command(argv)

    return ChildSpec(
        name="envoy",
        what=f"Envoy gateway at {settings.gateway_url}",
        command=command,
        ready=partial(http_ok, f"{settings.gateway_url}/ready"),
        timeout_s=60.0,
        ports=[
            (settings.gateway_host, settings.gateway_port),
            (settings.gateway_host, settings.gateway_mlflow_port),
            ("127.0.0.1", settings.gateway_admin_port),
            (settings.gateway_host, settings.gateway_metrics_port),
        ],
    )


def mesh_specs(settings: Settings) -> list[ChildSpec]:
    """Every component, in start order; a new service is one more python_service line."""
    s, logs = settings, settings.state_dir / "logs"
    return [
        *postgres_specs([s.database_url, s.mlflow_backend_store_uri], s.state_dir, logs),
        PrivateRedis(s.redis_url, s.state_dir / "redis", logs).spec(),
        mlflow_spec(s),
        python_service(s, "registry", "services.registry", s.registry_address, s.registry_ops_port),
        python_service(s, "training", "services.training", s.training_address, s.training_ops_port),
        worker_spec(s),
        *inference_specs(s),
        envoy_spec(s),
    ]


def stages(specs: Sequence[ChildSpec]) -> list[list[ChildSpec]]:
    """``specs`` in start order, those of one group (ChildSpec.group) in one stage."""
    return [list(stage) for _, stage in groupby(specs, key=lambda spec: spec.group or spec.name)]


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus every setting as MLMESH_*, so children share one config."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        key = f"MLMESH_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value if isinstance(value, str) else json.dumps(value)
    env["PYTHONUNBUFFERED"] = "1"  # so a child's log tail is current when it fails
    # MLflow 3's server would start its job runner (GenAI scorers, trace roll-ups: nothing
    # mlmesh uses): eight more processes and about 2 GB of memory per MLflow server.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


# -- the mesh -----------------------------------------------------------------------------------


class Mesh:
    """Starts the local mesh, waits for each part to be ready, and stops it all cleanly.

    ``start()`` returns once the gateway's /ready answers 200, or raises LaunchError (after
    stopping what it started) naming what did not come up. ``stop()`` stops the children in
    reverse order and is safe to call twice. ``with Mesh(settings) as mesh:`` does both.
    """

    def __init__(self, settings: Settings, *, stop_timeout_s: float | None = None) -> None:
        state_dir = Path(settings.state_dir).resolve()
        # Children may run elsewhere (PostgreSQL's cwd is its data dir): paths are absolute.
        self.settings = settings.model_copy(update={"state_dir": state_dir})
        self.log_dir = state_dir / "logs"
        # Services drain in-flight RPCs for shutdown_grace_s after SIGTERM; give them that.
        self.stop_timeout_s = stop_timeout_s or max(10.0, settings.shutdown_grace_s + 5.0)
        self.api_key: tuple[str, str] | None = None  # (client, key) printed for the developer
        self._children: list[Child] = []
        self._watchdog: Watchdog | None = None
        self._stop_requested = False
        self._keys_watcher: ApiKeysWatcher | None = None
        self._reload_keys_requested = False
        # Self-pipe: a signal handler may only write a byte; every wait selects on it.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bring every component up in order; raises LaunchError naming the one that failed."""
        if self._watchdog is not None:
            raise RuntimeError("the mesh is already started")
        try:
            self.settings, self.api_key = self._with_api_keys(self.settings)
            self.settings = self._with_mesh_certificates(self.settings)
            self._keys_watcher = ApiKeysWatcher(
                self.settings, self.settings.state_dir / ENVOY_KEYS_FILE
            )
            env = child_env(self.settings)
            self._watchdog = Watchdog(env)
            for stage in stages(mesh_specs(self.settings)):
                started = [self._bring_up(spec, env) for spec in stage]
                for child in started:
                    if child is not None:
                        self._wait_ready(*child)
                for spec in stage:
                    if spec.after_ready is not None:
                        spec.after_ready()
        except BaseException:
            self.stop()
            raise
        log.info("the mesh is ready")

    def stop(self) -> None:
        """Stop every child this mesh started, last started first."""
        while self._children:
            child = self._children.pop()
            try:
                child.stop(self.stop_timeout_s)
            except Exception:  # keep going: the rest must still be stopped
                log.exception("stopping %s failed", child.spec.name)
            else:
                if self._watchdog is not None:
                    self._watchdog.forget(child)
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def request_stop(self) -> None:
        """Ask start() or wait() to return; safe to call from a signal handler."""
        self._stop_requested = True
        self.wake()

    def wake(self) -> None:
        """Make a pending wait look again (SIGCHLD: a child may have exited)."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full (a wake-up is pending already) or closed

    def request_key_reload(self) -> None:
        """Ask wait() to hand the API keys to Envoy again; safe to call from a signal handler."""
        self._reload_keys_requested = True
        self.wake()

    def install_signal_handlers(self) -> None:
        """Route SIGINT/SIGTERM to request_stop(), SIGHUP to request_key_reload() and SIGCHLD
        to wake(); call from main only."""
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_key_reload())
        signal.signal(signal.SIGCHLD, lambda *_: self.wake())

    def wait(self) -> None:
        """Block until request_stop(); raises LaunchError if a child exits meanwhile.

        A child's exit is noticed when something calls wake(), which
        install_signal_handlers() wires to SIGCHLD. Meanwhile the API keys file is looked at
        every second, and a changed one (or SIGHUP) rotates the gateway's keys in place.
        """
        watch_keys = self.settings.api_keys_file is not None
        while not self._stop_requested:
            for child in self._children:
                code = child.exit_code()
                if code is not None:
                    raise child.failure(f"exited unexpectedly with code {code}")
            if self._keys_watcher is not None:
                if self._reload_keys_requested:
                    self._reload_keys_requested = False
                    self._keys_watcher.reload()
                else:
                    self._keys_watcher.poll()
            self._sleep(1.0 if watch_keys else None)

    def pids(self) -> dict[str, int]:
        """Process ids of the running children, by name."""
        return {c.spec.name: c.pid for c in self._children if c.pid is not None}

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        for fd in (getattr(self, "_wake_r", -1), getattr(self, "_wake_w", -1)):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- output ------------------------------------------------------------------------------

    def summary(self) -> str:
        """What a developer needs once the mesh is up: URLs and the API key."""
        s = self.settings
        client, key = self.api_key or ("?", "?")
        inference = s.inference_endpoints()
        inference_grpc = ", ".join(e.address for e in inference)
        processes = f"{len(inference)} process" + ("es" if len(inference) > 1 else "")
        inference_ops = ", ".join(f":{e.ops_port}" for e in inference)
        rows = [
            ("gateway (REST + gRPC)", s.gateway_url),
            ("MLflow UI and API", f"{s.gateway_mlflow_url} (through the gateway)"),
            (
                "state",
                f"{s.state_dir} (databases {database_name(s.database_url)}, "
                f"{database_name(s.mlflow_backend_store_uri)}; artifacts {artifact_root(s)})",
            ),
            ("Envoy admin", f"http://127.0.0.1:{s.gateway_admin_port}"),
            (
                "services",
                f"registry {s.registry_address}, training {s.training_address}, inference "
                f"{inference_grpc} ({processes}; gRPC, mutual TLS: certificates in "
                f"{s.mesh_tls.directory}); MLflow {s.mlflow_tracking_uri} (services' side)",
            ),
            ("Open Inference Protocol", f"{s.gateway_url}/v2 (REST), the gateway (gRPC)"),
            (
                "metrics",
                f"registry :{s.registry_ops_port}, training :{s.training_ops_port}, "
                f"worker :{s.worker_ops_port}, inference {inference_ops} (GET /metrics); "
                f"MLflow {s.mlflow_tracking_uri.rstrip('/')}/metrics; "
                f"Envoy http://{s.gateway_host}:{s.gateway_metrics_port}/stats/prometheus",
            ),
            ("API key", f"{key}  (client {client!r}; send it as {API_KEY_HEADER})"),
            ("logs", str(self.log_dir)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = ["mlmesh is up:", *(f"  {name:<{width}}  {value}" for name, value in rows)]
        cacert = f"--cacert {s.gateway_tls_cert_file} " if s.gateway_tls else ""
        lines.append(f"  try: curl {cacert}-H '{API_KEY_HEADER}: {key}' {s.gateway_url}/ready")
        lines.append(f"  open the MLflow UI: {s.gateway_mlflow_url}")
        lines.append("Press Ctrl-C to stop.")
        return "\n".join(lines)

    # -- internals ---------------------------------------------------------------------------

    def _with_api_keys(self, settings: Settings) -> tuple[Settings, tuple[str, str]]:
        if not settings.api_keys and settings.api_keys_file is None:
            path = settings.state_dir / "api-keys"
            # Keep an earlier run's key, so scripts and notes keep working across restarts.
            if not path.exists():
                write_dev_key(path)
                log.info("generated a development API key in %s", path)
            settings = settings.model_copy(update={"api_keys_file": path})
        elif settings.api_keys_file is not None:
            path = Path(settings.api_keys_file).resolve()
            settings = settings.model_copy(update={"api_keys_file": path})
        try:
            keys = load_api_keys(settings)
        except ApiKeyError as exc:
            raise LaunchError(f"API keys: {exc}") from exc
        if not keys:
            raise LaunchError("no API keys configured: set MLMESH_API_KEYS or MLMESH_API_KEYS_FILE")
        client = "dev" if "dev" in keys else next(iter(keys))
        return settings, (client, keys[client])

    def _with_mesh_certificates(self, settings: Settings) -> Settings:
        """The mesh's CA and certificates in MLMESH_MTLS_DIR (default STATE_DIR/mtls), made
        on first start and issued again before they expire; the directory made absolute, so
        that every child reads the same files."""
        files = settings.mesh_tls
        try:
            written = ensure_mesh_certificates(files)
        except (OSError, ValueError) as exc:
            raise LaunchError(f"the mesh's certificates in {files.directory}: {exc}") from exc
        if written:
            log.info("wrote the mesh's %s in %s", ", ".join(written), files.directory)
        return settings.model_copy(update={"mtls_dir": files.directory.resolve()})

    def _bring_up(self, spec: ChildSpec, env: dict[str, str]) -> tuple[Child, float] | None:
        """Start ``spec``'s child unless it may reuse what answers already; the child and
        when it started, for _wait_ready (None: nothing started)."""
        self._check_abort()
        if spec.ready():
            if not spec.reuse_existing:
                raise LaunchError(
                    f"{spec.what}: something already answers there; stop it or configure "
                    "other ports (MLMESH_* settings)"
                )
            log.info("%s already answers; using it", spec.what)
            return None
        if spec.install is not None:
            spec.install()
        if spec.reuse_existing and spec.ready():
            log.info("%s answers after installing it; using it", spec.what)
            return None
        return self._start(spec, env)

    def _start(self, spec: ChildSpec, env: dict[str, str]) -> tuple[Child, float]:
        busy = [f"{host}:{port}" for host, port in spec.ports if port_open(host, port)]
        if busy:
            raise LaunchError(
                f"{spec.what} does not answer, and {', '.join(busy)} is taken by something "
                "else; stop it or configure other ports (MLMESH_* settings)"
            )
        try:
            command = spec.command()
        except LaunchError:
            raise
        except Exception as exc:
            raise LaunchError(f"{spec.what}: cannot prepare it: {exc}") from exc
        child = Child(spec, command, self.log_dir / f"{spec.name}.log", {**env, **spec.env})
        child.start()
        self._children.append(child)
        if self._watchdog is not None:
            self._watchdog.watch(child)
        return child, time.monotonic()

    def _wait_ready(self, child: Child, started: float) -> None:
        spec = child.spec
        while not spec.ready():
            self._check_abort()
            code = child.exit_code()
            if code is not None:
                raise child.failure(f"exited with code {code} before it was ready")
            if time.monotonic() - started > spec.timeout_s:
                raise child.failure(f"not ready after {spec.timeout_s:.0f} s")
            self._sleep(0.25)
        log.info("%s is ready (%.1f s)", spec.what, time.monotonic() - started)

    def _check_abort(self) -> None:
        if self._stop_requested:
            raise LaunchAborted("stop requested while the mesh was starting")

    def _sleep(self, timeout_s: float | None) -> None:
        """Sleep up to timeout_s (None: for ever), returning early on wake()."""
        readable, _, _ = select.select([self._wake_r], [], [], timeout_s)
        if readable:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
