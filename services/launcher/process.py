"""Child processes of the launcher: what to run, how to start it, how to stop it for good."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """A component did not come up (or went away); the message says which and why."""


class LaunchAborted(LaunchError):
    """A stop was requested (Ctrl-C, SIGTERM) while the mesh was still starting."""


@dataclass(frozen=True)
class Command:
    """How to run one child, decided only once the launcher knows it must start it."""

    argv: Sequence[str | os.PathLike[str]]
    # Run as this system user: PostgreSQL refuses to run as root.
    user: str | None = None
    cwd: Path | None = None


@dataclass(frozen=True)
class ChildSpec:
    """One component of the mesh; the launcher brings specs up in order, down in reverse."""

    name: str  # log file name: state_dir/logs/<name>.log
    what: str  # for messages, e.g. "PostgreSQL at 127.0.0.1:5432"
    command: Callable[[], Command]  # prepares (installs, initdb, renders) and says what to run
    ready: Callable[[], bool]  # True once the component serves; must not raise
    timeout_s: float = 60.0
    # Backing stores and MLflow: if one already answers, use it instead of starting one.
    reuse_existing: bool = False
    # Runs only when the launcher must start the child, before ready is asked again: an
    # install can itself start a server (Debian's postgresql package starts its cluster).
    install: Callable[[], None] | None = None
    # Runs after the component is ready, whether started or reused (e.g. create databases).
    after_ready: Callable[[], None] | None = None
    # host:port pairs the child binds; they must be free before it starts.
    ports: Sequence[tuple[str, int]] = field(default_factory=tuple)
    # Environment of this child only, over the mesh's (an Inference process's own ports).
    env: Mapping[str, str] = field(default_factory=dict)
    # Children of one group, next to each other in the start order, start at once (the
    # Inference processes); what comes after waits until all of them are ready.
    group: str = ""
    stop_signal: signal.Signals = signal.SIGTERM
    # PostgreSQL wants its shutdown signal on the postmaster only; its backends treat
    # SIGINT as "cancel query". Everything else gets it on the whole group.
    stop_group: bool = True


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class Child:
    """One running child: its own session, its log file, and a stop that leaves nothing behind."""

    def __init__(
        self, spec: ChildSpec, command: Command, log_path: Path, env: Mapping[str, str]
    ) -> None:
        self.spec = spec
        self.command = command
        self.argv = [os.fspath(a) for a in command.argv]
        self.log_path = log_path
        self._env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        user_kwargs: dict[str, object] = {}
        if self.command.user is not None:
            pw = pwd.getpwnam(self.command.user)
            # Drop root's supplementary groups too, not just the uid.
            user_kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # The child gets the stop signal if the launcher dies (PR_SET_PDEATHSIG), set by
        # util-linux's setpriv just before it execs the command: a preexec_fn would make
        # Python fork() instead of vfork(), and a fork() runs gRPC's fork handlers in the
        # child, which abort it when the launcher has gRPC channels open (grpc/grpc#43055).
        argv = self.argv
        if shutil.which("setpriv"):
            argv = ["setpriv", f"--pdeathsig={self.spec.stop_signal.name[3:]}", *argv]
        with self.log_path.open("ab") as out:
            self._log_offset = out.tell()
            out.write(f"---- {time.strftime('%F %T')} {' '.join(self.argv)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self.command.cwd,
                # Own session: a terminal's Ctrl-C reaches only the launcher, which then
                # stops children in order; and the group lets stop() reach grandchildren.
                start_new_session=True,
                **user_kwargs,  # type: ignore[arg-type]
            )
        log.info("started %s (pid %d), log %s", self.spec.name, self._proc.pid, self.log_path)

    def exit_code(self) -> int | None:
        """The exit code once the child has exited, else None."""
        return self._proc.poll() if self._proc else None

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last lines this run of the child wrote."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, problem: str) -> LaunchError:
        """An error naming the child, the problem and the end of its log."""
        return LaunchError(
            f"{self.spec.what}: {problem}; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float) -> None:
        """Signal the child (SIGKILL after timeout_s) and wait until its whole group is gone."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made the child its group's leader
        deadline = time.monotonic() + timeout_s
        if proc.poll() is None:
            log.info("stopping %s (pid %d)", self.spec.name, proc.pid)
            self._signal(pgid, self.spec.stop_signal, group=self.spec.stop_group)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.spec.name, timeout_s)
                self._signal(pgid, signal.SIGKILL, group=True)
                proc.wait()
        # Grandchildren (uvicorn under `mlflow server`) can outlive their parent; they are
        # not our children, so there is nothing to wait on but /proc.
        killed = False
        while members := group_members(pgid):
            if time.monotonic() > deadline:
                if killed:
                    log.error("%s: processes %s survive SIGKILL", self.spec.name, members)
                    break
                log.warning("killing what is left of %s: %s", self.spec.name, members)
                self._signal(pgid, signal.SIGKILL, group=True)
                killed, deadline = True, time.monotonic() + 5.0
            time.sleep(0.05)
        log.info("%s stopped (exit code %s)", self.spec.name, proc.returncode)

    @staticmethod
    def _signal(pgid: int, sig: signal.Signals, *, group: bool) -> None:
        try:
            if group:
                os.killpg(pgid, sig)
            else:
                os.kill(pgid, sig)
        except ProcessLookupError:
            pass
