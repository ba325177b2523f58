"""Stops the mesh's process groups when the launcher dies without stopping them (SIGKILL, crash).

PR_SET_PDEATHSIG reaches only a child itself, and not every child passes the signal on:
`mlflow server` forwards SIGTERM to uvicorn but leaves its job consumers running. So the
launcher also tells this small process, over a pipe, which groups it runs; when the pipe
closes with groups still registered, this process signals every one of them.

Protocol on stdin, one line per event: ``+<pgid> <signal> <group:0|1>`` when a child starts,
``-<pgid>`` once the launcher has stopped it. EOF ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from services.launcher.process import Child, group_members

log = logging.getLogger(__name__)

_GRACE_S = 10.0


class Watchdog:
    """The launcher's end: starts the watchdog process and keeps it told."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "services.launcher.watchdog"],
            stdin=subprocess.PIPE,
            env=dict(env),
            # Its own session: a terminal's Ctrl-C must not take it down with the launcher.
            start_new_session=True,
        )

    def watch(self, child: Child) -> None:
        spec = child.spec
        self._send(f"+{child.pid} {int(spec.stop_signal)} {int(spec.stop_group)}")

    def forget(self, child: Child) -> None:
        self._send(f"-{child.pid}")

    def close(self) -> None:
        """EOF: the watchdog exits, signalling whatever is still registered."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            log.warning("the watchdog is gone; a launcher crash could now leave processes behind")


def _signal(pgid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pgid, sig)
        else:
            os.kill(pgid, sig)
    except ProcessLookupError:
        pass


def main() -> None:
    groups: dict[int, tuple[int, bool]] = {}  # pgid -> (stop signal, whole group?)
    for line in sys.stdin:
        if line.startswith("+"):
            pgid, sig, group = line[1:].split()
            groups[int(pgid)] = (int(sig), group == "1")
        elif line.startswith("-"):
            groups.pop(int(line[1:]), None)
    if not groups:
        return
    # Last started first, as the launcher would have done.
    for pgid, (sig, group) in reversed(groups.items()):
        _signal(pgid, sig, group)
    deadline = time.monotonic() + _GRACE_S
    while (alive := [g for g in groups if group_members(g)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pgid in alive:
        _signal(pgid, signal.SIGKILL, True)


if __name__ == "__main__":
    main()
