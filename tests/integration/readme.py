"""The README's walk-throughs, run as written: a section's first bash block, line by line."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def walk_through(heading: str) -> list[str]:
    """The lines of the first bash block under the README's ``heading`` (to the next ###)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading) :]
    section = section[: section.index("\n### ", 1)]
    (block,) = re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)[:1]
    return [line for line in block.splitlines() if line.strip()]


def run_line(
    line: str, *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """One line under bash; it must succeed (the assertion shows its output)."""
    done = subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    return done
