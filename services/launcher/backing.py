"""PostgreSQL and Redis: use the configured server if one answers, else start a private one."""

from __future__ import annotations

import asyncio
import glob
import hashlib
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import redis

from services.common.db import database_name, ensure_database
from services.launcher.process import ChildSpec, Command, LaunchError

log = logging.getLogger(__name__)

T = TypeVar("T")

_PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# Where a root launcher puts a private cluster when the postgres user cannot reach state_dir
# (a repository under /root, pytest's 0700 temp dirs); state_dir/postgres links to it.
_PG_FALLBACK_ROOT = Path("/var/lib/mlmesh")
_UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes, less ".s.PGSQL.<port>"


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even under a running event loop.

    The launcher is sync, but Mesh may be started from an async test or fixture, where
    asyncio.run() refuses to run; a short-lived thread gets a loop of its own then.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the only places the launcher starts servers."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _running_as_root() -> bool:
    return os.geteuid() == 0


def apt_install(package: str, log_path: Path) -> bool:
    """Install a Debian package when running as root with apt; False when that is not possible."""
    if not _running_as_root() or shutil.which("apt-get") is None:
        return False
    log.info("installing %s with apt-get (output in %s)", package, log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log_path.open("ab") as out:
        for argv in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", package],
        ):
            try:
                subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    check=True,
                    timeout=900,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise LaunchError(f"`{' '.join(argv)}` failed ({exc}); see {log_path}") from exc
    return True


# -- PostgreSQL -------------------------------------------------------------------------------


def postgres_answers(url: str) -> bool:
    """True when a PostgreSQL server answers at the URL's host and port.

    A refusal (wrong password, missing database) still means a server is there; creating
    the databases afterwards then reports the real problem.
    """

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=2.0)
        except asyncpg.CannotConnectNowError:  # starting up or shutting down
            return False
        except asyncpg.PostgresError:
            return True
        except Exception:  # refused, timed out, or not PostgreSQL at all
            return False
        await conn.close()
        return True

    return run_async(probe)


def find_pg_bindir() -> Path | None:
    """Directory of the newest installed PostgreSQL's initdb/postgres, Debian layout first."""
    candidates = [
        Path(p)
        for p in glob.glob(_PG_BIN_GLOB)
        if Path(p, "initdb").exists() and Path(p, "postgres").exists()
    ]
    if candidates:
        return max(candidates, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        log.info("creating system user %s to run PostgreSQL", name)
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/sh", name],
            check=True,
        )


def _reachable_by(user: str, path: Path) -> bool:
    """Whether ``user`` can traverse to ``path`` (root's own access check says nothing)."""
    pw = pwd.getpwnam(user)
    probe = subprocess.run(
        ["test", "-x", str(path)], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], check=False
    )
    return probe.returncode == 0


def _server_key(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


class PrivatePostgres:
    """A private PostgreSQL cluster under the state dir, started only where none answers."""

    def __init__(self, urls: Sequence[str], data_dir: Path, log_dir: Path) -> None:
        self.urls = list(urls)
        self.host, self.port = _server_key(self.urls[0])
        self.superuser = urlsplit(self.urls[0]).username or "postgres"
        self.data_dir = data_dir
        self.log_dir = log_dir
        # PostgreSQL refuses to run as root; as root, run it as the usual system user.
        self.os_user = "postgres" if _running_as_root() else None
        self._bindir: Path | None = None

    def spec(self, name: str) -> ChildSpec:
        return ChildSpec(
            name=name,
            what=f"PostgreSQL at {self.host}:{self.port}",
            install=self.install,
            command=self.command,
            ready=partial(postgres_answers, self.urls[0]),
            timeout_s=60.0,
            reuse_existing=True,
            after_ready=self.create_databases,
            ports=[(self.host, self.port)],
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
            stop_group=False,
        )

    def install(self) -> None:
        if not is_loopback(self.host):
            raise LaunchError(
                f"PostgreSQL at {self.host}:{self.port} does not answer, and the launcher "
                "starts a private one only on a loopback address"
            )
        self._bindir = find_pg_bindir()
        if self._bindir is None and apt_install("postgresql", self.log_dir / "apt.log"):
            self._bindir = find_pg_bindir()
        if self._bindir is None:
            raise LaunchError(
                f"no PostgreSQL answers at {self.host}:{self.port} and initdb is not installed; "
                "install PostgreSQL (Debian: apt-get install postgresql) or point "
                "MLMESH_DATABASE_URL at a server"
            )

    def command(self) -> Command:
        assert self._bindir is not None, "install() runs first"
        if self.os_user is not None:
            _ensure_system_user(self.os_user)
        data_dir = self._locate_data_dir()
        if not (data_dir / "PG_VERSION").exists():
            self._initdb(data_dir)
        # The socket lives with the cluster: the system's /var/run/postgresql may be missing,
        # not ours to write, or already hold this port's socket. Too long a path: TCP only.
        sockets = str(data_dir) if len(str(data_dir)) <= _UNIX_SOCKET_PATH_MAX else ""
        return Command(
            argv=[
                self._bindir / "postgres",
                "-D",
                data_dir,
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                f"unix_socket_directories={sockets}",
            ],
            user=self.os_user,
            cwd=data_dir,
        )

    def _locate_data_dir(self) -> Path:
        if self.os_user is None or self.data_dir.is_symlink():
            return self.data_dir.resolve()
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        if _reachable_by(self.os_user, parent):
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        elsewhere = _PG_FALLBACK_ROOT / f"postgres-{digest}"
        log.warning(
            "user %s cannot reach %s; keeping the private cluster in %s (linked from %s)",
            self.os_user,
            parent,
            elsewhere,
            self.data_dir,
        )
        _PG_FALLBACK_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not self.data_dir.exists():
            self.data_dir.symlink_to(elsewhere, target_is_directory=True)
        return elsewhere

    def _initdb(self, data_dir: Path) -> None:
        assert self._bindir is not None
        log.info("creating a private PostgreSQL cluster in %s", data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.os_user is not None:
            pw = pwd.getpwnam(self.os_user)
            os.chown(data_dir, pw.pw_uid, pw.pw_gid)
            user_kwargs: dict[str, object] = {
                "user": pw.pw_uid,
                "group": pw.pw_gid,
                "extra_groups": [],
            }
        else:
            user_kwargs = {}
        log_path = self.log_dir / "initdb.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self._bindir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        ]
        with log_path.open("ab") as out:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                timeout=120,
                check=False,
                **user_kwargs,  # type: ignore[arg-type]
            )
        if done.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise LaunchError(f"initdb failed (exit {done.returncode}); {log_path}:\n{tail}")

    def create_databases(self) -> None:
        for url in self.urls:
            try:
                if run_async(partial(ensure_database, url)):
                    log.info("created database %s", database_name(url))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise LaunchError(
                    f"cannot create database {database_name(url)!r} at "
                    f"{self.host}:{self.port}: {exc}"
                ) from exc


def postgres_specs(urls: Sequence[str], state_dir: Path, log_dir: Path) -> list[ChildSpec]:
    """One spec per PostgreSQL server the URLs name (usually one for both databases)."""
    servers: dict[tuple[str, int], list[str]] = {}
    for url in urls:
        servers.setdefault(_server_key(url), []).append(url)
    specs = []
    for n, ((_, port), server_urls) in enumerate(servers.items()):
        name = "postgres" if n == 0 else f"postgres-{port}"
        specs.append(PrivatePostgres(server_urls, state_dir / name, log_dir).spec(name))
    return specs


# -- Redis ------------------------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    """True when a Redis server answers at the URL (a refused AUTH still means one is there)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.AuthenticationError, redis.ResponseError):
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


class PrivateRedis:
    """A private, non-persistent redis-server, started only where none answers."""

    def __init__(self, url: str, data_dir: Path, log_dir: Path) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or parts.hostname is None:
            raise LaunchError(f"MLMESH_REDIS_URL {parts.scheme}://... is not a TCP Redis URL")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 6379
        self.password = parts.password
        self.data_dir = data_dir
        self.log_dir = log_dir
        self._binary: str | None = None

    def spec(self) -> ChildSpec:
        return ChildSpec(
            name="redis",
            what=f"Redis at {self.host}:{self.port}",
            install=self.install,
            command=self.command,
            ready=partial(redis_answers, self.url),
            timeout_s=30.0,
            reuse_existing=True,
            ports=[(self.host, self.port)],
        )

    def install(self) -> None:
        if not is_loopback(self.host):
            raise LaunchError(
                f"Redis at {self.host}:{self.port} does not answer, and the launcher "
                "starts a private one only on a loopback address"
            )
        self._binary = shutil.which("redis-server")
        if self._binary is None and apt_install("redis-server", self.log_dir / "apt.log"):
            self._binary = shutil.which("redis-server")
        if self._binary is None:
            raise LaunchError(
                f"no Redis answers at {self.host}:{self.port} and redis-server is not "
                "installed; install it (Debian: apt-get install redis-server) or point "
                "MLMESH_REDIS_URL at a server"
            )

    def command(self) -> Command:
        assert self._binary is not None, "install() runs first"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        bind = "127.0.0.1" if self.host == "localhost" else self.host
        argv = [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            bind,
            # A cache and a queue for one developer's session: nothing to persist.
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        return Command(argv=argv)
