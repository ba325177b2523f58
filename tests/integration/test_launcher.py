"""`python -m services.launcher up` run as a user would: real processes, SIGTERM, no leftovers."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from services.common.db import drop_database
from services.launcher.backing import find_pg_bindir, postgres_answers, redis_answers
from services.launcher.process import port_open

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
SHARED_PG = "postgresql://postgres@127.0.0.1:5432"
SHARED_REDIS = "redis://127.0.0.1:6379"
READY_TIMEOUT_S = 300  # a new MLflow database runs every migration first
STOP_TIMEOUT_S = 60


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (all held at once, so no repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields resume after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[3])


def mesh_processes(state_dir: Path, sessions: Collection[int] = ()) -> dict[int, str]:
    """pid -> command line of every live process started for this state dir.

    The launcher hands its settings (MLMESH_STATE_DIR included) to every child and
    grandchildren inherit them, so the environment finds most of the tree; redis-server
    rewrites its environment block with its process title, so ``sessions`` (each child runs
    in its own session) finds the rest.
    """
    marker = f"MLMESH_STATE_DIR={state_dir}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = proc_stat(pid)
        try:
            environ = Path(entry.path, "environ").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if stat is None or stat[0] in ("Z", "X"):
            continue
        if marker in environ.split(b"\0") or stat[2] in sessions:
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def child_sessions(launcher_pid: int) -> set[int]:
    """Session ids of the launcher's children (each is its own session's leader)."""
    own = proc_stat(os.getpid())
    sessions = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            if stat[1] == launcher_pid and own is not None and stat[2] != own[2]:
                sessions.add(stat[2])
    return sessions


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def base_env(state_dir: Path) -> dict[str, str]:
    gateway, admin, mlflow, registry, ops, gateway_mlflow = free_ports(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLMESH_")}
    env.update(
        MLMESH_STATE_DIR=str(state_dir),
        MLMESH_GATEWAY_HOST="127.0.0.1",
        MLMESH_GATEWAY_PORT=str(gateway),
        MLMESH_GATEWAY_ADMIN_PORT=str(admin),
        MLMESH_GATEWAY_MLFLOW_PORT=str(gateway_mlflow),
        MLMESH_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow}",
        MLMESH_REGISTRY_ADDRESS=f"127.0.0.1:{registry}",
        MLMESH_REGISTRY_OPS_PORT=str(ops),
        MLMESH_LOG_LEVEL="INFO",
    )
    return env


def run_up_and_stop(env: dict[str, str], state_dir: Path) -> tuple[dict[int, str], str]:
    """Start the launcher, wait for /ready through the gateway, SIGTERM it, check it all ends.

    Returns the processes the mesh had while up and the launcher's stdout.
    """
    out_path, err_path = state_dir.parent / "launcher.out", state_dir.parent / "launcher.err"
    gateway = f"http://127.0.0.1:{env['MLMESH_GATEWAY_PORT']}"
    sessions: set[int] = set()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "services.launcher", "up"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            code = launcher.poll()
            assert code is None, f"launcher exited with {code}:\n{tail(err_path)}"
            try:
                if httpx.get(f"{gateway}/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /ready 200 in time:\n{tail(err_path)}"
            time.sleep(0.5)
        # /ready can answer a moment before the launcher's own check prints the summary.
        while "Press Ctrl-C" not in out_path.read_text():
            assert time.monotonic() < deadline, f"no summary printed:\n{tail(err_path)}"
            time.sleep(0.2)
        sessions = child_sessions(launcher.pid)
        running = mesh_processes(state_dir, sessions)

        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=STOP_TIMEOUT_S)
        assert code == 0, tail(err_path)
    finally:
        if launcher.poll() is None:  # a failed assertion above: do not leak the mesh
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                launcher.kill()

    deadline = time.monotonic() + 5
    while (left := mesh_processes(state_dir, sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == {}, f"processes left behind: {left}"
    return running, out_path.read_text()


def assert_common(running: dict[int, str], stdout: str, env: dict[str, str]) -> None:
    commands = list(running.values())
    for needle in ("mlflow server", "services.registry", "envoy -c"):
        assert any(needle in c for c in commands), f"{needle!r} not among {commands}"
    assert f"http://127.0.0.1:{env['MLMESH_GATEWAY_PORT']}" in stdout
    assert env["MLMESH_MLFLOW_TRACKING_URI"] in stdout
    # The MLflow UI a user opens: the gateway's, not MLflow's own address.
    assert f"open the MLflow UI: http://127.0.0.1:{env['MLMESH_GATEWAY_MLFLOW_PORT']}" in stdout
    assert env["MLMESH_REGISTRY_ADDRESS"] in stdout
    # The mesh's certificates, made on first start.
    assert {p.name for p in (Path(env["MLMESH_STATE_DIR"]) / "mtls").iterdir()} == {
        "ca.crt", "ca.key", "service.crt", "service.key", "gateway.crt", "gateway.key",
    }  # fmt: skip
    # The generated key is printed, and it is the one in the key file the gateway uses.
    client, key = (Path(env["MLMESH_STATE_DIR"]) / "api-keys").read_text().strip().split("=", 1)
    assert client == "dev"
    assert key in stdout


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are 0700, and a root launcher runs a private
    # PostgreSQL as the postgres user, which must be able to reach state_dir/postgres.
    base = Path(tempfile.mkdtemp(prefix="mlmesh-launcher-"))
    base.chmod(0o755)
    yield base / "state"
    shutil.rmtree(base, ignore_errors=True)


def test_up_uses_running_postgres_and_redis(state_dir: Path) -> None:
    if not postgres_answers(f"{SHARED_PG}/postgres") or not redis_answers(f"{SHARED_REDIS}/0"):
        pytest.skip("needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379")
    run_id = secrets.token_hex(4)
    database_url = f"{SHARED_PG}/mlmesh_t_{run_id}"
    mlflow_url = f"{SHARED_PG}/mlflow_t_{run_id}"
    env = base_env(state_dir)
    env.update(
        MLMESH_DATABASE_URL=database_url,
        MLMESH_MLFLOW_BACKEND_STORE_URI=mlflow_url,
        MLMESH_REDIS_URL=f"{SHARED_REDIS}/7",  # not db 0: that one is the developer's
    )
    try:
        running, stdout = run_up_and_stop(env, state_dir)
        # Another state directory (a second checkout) on the same databases: their model
        # versions' artifacts are not there, so the launcher refuses to start MLflow.
        other = {**env, "MLMESH_STATE_DIR": str(state_dir.parent / "other")}
        refused = subprocess.run(
            [sys.executable, "-m", "services.launcher", "up"],
            cwd=ROOT,
            env=other,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
        )
    finally:
        for url in (database_url, mlflow_url):
            asyncio.run(drop_database(url))
    assert_common(running, stdout, env)
    commands = list(running.values())
    assert not any("postgres -D" in c or "redis-server" in c for c in commands), commands
    assert refused.returncode == 1, refused.stderr
    assert f"artifacts are in {state_dir}/mlartifacts" in refused.stderr
    assert "mlmesh-server reset --yes" in refused.stderr


def test_up_starts_private_postgres_and_redis(state_dir: Path) -> None:
    if (find_pg_bindir() is None or shutil.which("redis-server") is None) and os.geteuid() != 0:
        pytest.skip("needs PostgreSQL's initdb and redis-server, or root to install them")
    pg_port, redis_port = free_ports(2)
    env = base_env(state_dir)
    env.update(
        MLMESH_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg_port}/mlmesh",
        MLMESH_MLFLOW_BACKEND_STORE_URI=f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow",
        MLMESH_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
    )
    running, stdout = run_up_and_stop(env, state_dir)
    assert_common(running, stdout, env)
    commands = list(running.values())
    assert any(f"postgres -D {state_dir}/postgres" in c for c in commands), commands
    assert any(f"redis-server 127.0.0.1:{redis_port}" in c for c in commands), commands
    assert (state_dir / "postgres" / "PG_VERSION").exists()
    assert not port_open("127.0.0.1", pg_port), "private PostgreSQL still listens"
    assert not port_open("127.0.0.1", redis_port), "private Redis still listens"
