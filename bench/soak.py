"""Soak: a bounded mixed load through the gateway for minutes, watching errors, latency over
time and every process's memory.

    .venv/bin/python -m bench.soak [--minutes 5] [--predictions-per-s 80] [--reads-per-s 10]
        [--submit-every-s 30] [--window-s 30]
    make soak

One run starts a private mesh (free ports, databases of its own, as the tests do), trains a
first model version through the gateway and promotes it, then for ``--minutes`` keeps an
open-loop mix going through Envoy, each at a fixed rate whatever the answers take:

* predictions, REST ``POST /v1/predict``: MNIST test images, so that about half repeat
  (cached) and half are new;
* registry reads, REST: ``GET /v1/models``, ``GET /v1/models/<m>/versions``, ``GET /v1/runs``;
* training submissions, REST ``POST /v1/training/jobs``: a small job (500 images, 1 epoch)
  every ``--submit-every-s``, each registering a new version of the soak's model.

Every ``--window-s`` it records each class's requests, errors and p50/p99 latency, and the
resident memory of every process of the mesh (from /proc; a server with its worker
processes, the training worker without the process each job attempt runs in). At the end:
the errors, every job's end state (all must succeed), and each process's memory trend over
the run's second half (a least-squares slope, MB per minute) against its level. Results:
``bench/results/soak.md``. The verdict is reported, never enforced (the script exits 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.predict import BENCH_DIR, ROOT, bench_settings, drop_databases, machine, percentile
from services.common.settings import Settings
from services.launcher.mesh import Mesh
from services.launcher.process import LaunchError
from services.training.ml.data import load_dataset

CLASSES = ("predictions", "registry reads", "training submissions")
LIVE_STATES = ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING")
# A process grows "by a trend" when its second-half slope would add this share of its level
# over an hour.
GROWTH_LIMIT_PER_HOUR = 0.10


@dataclass
class Window:
    """One window of the run: per class, latencies (ms) and errors; per process, RSS (MB)."""

    start_s: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    errors: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    rss_mb: dict[str, float] = field(default_factory=dict)


def rss_mb(pid: int, descendants: bool) -> float | None:
    """Resident memory of a process, with its descendants or not, in MB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmRSS:"))  # fmt: skip
        if descendants:
            todo += [int(c) for c in children]
    return total / 1024 if total else None


class Soak:
    def __init__(self, args: argparse.Namespace, mesh: Mesh, key: str, model: str) -> None:
        self.args = args
        self.mesh = mesh
        self.model = model
        self.headers = {"x-api-key": key}
        self.windows: list[Window] = []
        self.jobs: list[str] = []
        images = load_dataset("mnist").test.images[:2000].numpy()
        self.images = [json_image(image) for image in images]
        self.started = time.monotonic()

    @property
    def window(self) -> Window:
        return self.windows[-1]

    async def timed(
        self, cls: str, call: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response | None:
        began = time.monotonic()
        window = self.window  # the window it started in
        try:
            resp = await call()
        except httpx.HTTPError as exc:
            window.errors[cls].append(f"{type(exc).__name__}: {exc}")
            return None
        window.latencies[cls].append((time.monotonic() - began) * 1e3)
        if resp.status_code != 200:
            window.errors[cls].append(f"{resp.status_code}: {resp.text[:200]}")
        return resp

    async def at_rate(self, per_s: float, one: Callable[[], Awaitable[None]]) -> None:
        """Start ``one()`` ``per_s`` times a second (open loop) until the run ends."""
        if per_s <= 0:
            return
        tasks: set[asyncio.Task] = set()
        next_at = time.monotonic()
        while time.monotonic() < self.ends:
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += 1 / per_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=self.mesh.settings.gateway_url, headers=self.headers, timeout=60,
            limits=limits,
        ) as client:  # fmt: skip
            reads = [
                "/v1/models",
                f"/v1/models/{self.model}/versions",
                "/v1/runs?experiment_ids=0&page_size=20",
            ]

            async def predict() -> None:
                # half of the images come back (cached), half are new to the cache
                image = random.choice(self.images[:50] if random.random() < 0.5 else self.images)
                body = f'{{"model_name":"{self.model}","image":{image}}}'
                await self.timed("predictions", lambda: client.post("/v1/predict", content=body))

            async def read() -> None:
                await self.timed("registry reads", lambda: client.get(random.choice(reads)))

            async def submit() -> None:
                resp = await self.timed(
                    "training submissions",
                    lambda: client.post("/v1/training/jobs", json=job_body(self.model)),
                )
                if resp is not None and resp.status_code == 200:
                    self.jobs.append(resp.json()["job"]["job_id"])

            self.ends = time.monotonic() + self.args.minutes * 60
            self.windows.append(Window(0.0))
            sampler = asyncio.create_task(self.sample())
            await asyncio.gather(
                self.at_rate(self.args.predictions_per_s, predict),
                self.at_rate(self.args.reads_per_s, read),
                self.at_rate(1 / self.args.submit_every_s, submit),
            )
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            self.record_memory()

    def record_memory(self) -> None:
        for name, pid in self.mesh.pids().items():
            # A server's worker processes are part of it; a training worker's job processes
            # come and go with the jobs (one per attempt), so the worker is measured alone.
            mb = rss_mb(pid, descendants=name != "worker")
            if mb is not None:
                self.window.rss_mb[name] = mb

    async def sample(self) -> None:
        while True:
            await asyncio.sleep(self.args.window_s)
            self.record_memory()
            self.windows.append(Window(time.monotonic() - self.started))
            w = self.windows[-2]
            counts = "  ".join(
                f"{c}: {len(w.latencies[c])} ({len(w.errors[c])} errors)" for c in CLASSES
            )
            memory = ", ".join(f"{n} {mb:.0f}" for n, mb in sorted(w.rss_mb.items()))
            print(f"[{w.start_s:5.0f} s] {counts}  RSS MB {memory}", flush=True)


def json_image(image: np.ndarray) -> str:
    return "[" + ",".join(f"{v:.3g}" for v in image.tolist()) + "]"


def job_body(model: str) -> dict:
    return {"epochs": 1, "train_subset": 500, "model_name": model, "experiment_name": model}


def wait_for_jobs(
    settings: Settings, headers: dict, jobs: list[str], timeout_s: float
) -> dict[str, str]:
    """job id -> end state, waiting up to ``timeout_s`` for the last ones."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    with httpx.Client(base_url=settings.gateway_url, headers=headers, timeout=30) as client:
        while True:
            for job in jobs:
                states[job] = client.get(f"/v1/training/jobs/{job}").json()["job"]["state"]
            pending = [j for j, s in states.items() if s in LIVE_STATES]
            if not pending or time.monotonic() > deadline:
                return states
            time.sleep(2)


def first_model(settings: Settings, headers: dict, model: str) -> None:
    """Train the soak's first version through the gateway and promote it."""
    with httpx.Client(base_url=settings.gateway_url, headers=headers, timeout=30) as client:
        job = client.post("/v1/training/jobs", json=job_body(model)).json()["job"]["job_id"]
    states = wait_for_jobs(settings, headers, [job], 600)
    if states[job] != "JOB_STATE_SUCCEEDED":
        raise RuntimeError(f"the first training job ended {states[job]}")
    with httpx.Client(base_url=settings.gateway_url, headers=headers, timeout=30) as client:
        resp = client.post(
            "/models/transition", json={"model_name": model, "version": 1, "stage": "production"}
        )
        resp.raise_for_status()
    print(f"trained and promoted {model} v1", flush=True)


def trend(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope in MB per minute, mean MB) of the least-squares line through (seconds, MB)."""
    t = np.array([p[0] for p in points]) / 60
    mb = np.array([p[1] for p in points])
    if len(points) < 3:
        return 0.0, float(mb.mean()) if len(mb) else 0.0
    return float(np.polyfit(t, mb, 1)[0]), float(mb.mean())


def report(soak: Soak, states: dict[str, str], command: str, wall_s: float) -> tuple[str, bool]:
    a = soak.args
    windows = [w for w in soak.windows if any(w.latencies[c] or w.errors[c] for c in CLASSES)]
    lines = [
        "# Soak: a mixed load through the gateway",
        "",
        f"`{command}`; {wall_s / 60:.1f} min in all; {machine()}.",
        "",
        f"Load for {a.minutes:g} min, open loop through Envoy (REST, one API key): predictions "
        f"{a.predictions_per_s:g}/s, registry reads {a.reads_per_s:g}/s, a training submission "
        f"every {a.submit_every_s:g} s (500 images, 1 epoch). Windows of {a.window_s:g} s.",
        "",
        "## Requests per window",
        "",
        "| window (s) | " + " | ".join(f"{c}: n / errors / p50 / p99 ms" for c in CLASSES) + " |",
        "|---|" + "---|" * len(CLASSES),
    ]
    errors = 0
    for w in windows:
        cells = []
        for c in CLASSES:
            lat = sorted(w.latencies[c])
            errors += len(w.errors[c])
            cells.append(
                f"{len(lat)} / {len(w.errors[c])} / "
                + (f"{percentile(lat, 50):.1f} / {percentile(lat, 99):.1f}" if lat else "- / -")
            )
        lines.append(f"| {w.start_s:.0f} | " + " | ".join(cells) + " |")
    totals = {c: sum(len(w.latencies[c]) for w in windows) for c in CLASSES}
    samples = [e for w in windows for c in CLASSES for e in w.errors[c]][:5]
    lines += ["", f"Requests: {totals}; errors: **{errors}**."]
    lines += [f"- {' '.join(e.split())}" for e in samples]
    ended = {s: list(states.values()).count(s) for s in sorted(set(states.values()))}
    jobs_ok = bool(states) and set(states.values()) == {"JOB_STATE_SUCCEEDED"}
    lines += ["", f"Training jobs submitted during the soak: {len(states)}; end states: {ended}."]
    lines += [
        "",
        "## Memory (resident, MB; servers with their worker processes, the training worker "
        "without its per-job processes)",
        "",
        "Trend: the least-squares slope over the second half of the run; growth is flagged "
        f"when it would add more than {GROWTH_LIMIT_PER_HOUR:.0%} of the level in an hour.",
        "",
        "| process | first | last | max | second-half slope MB/min | trend |",
        "|---|---|---|---|---|---|",
    ]
    grows = []
    names = sorted({n for w in soak.windows for n in w.rss_mb})
    half = soak.windows[len(soak.windows) // 2 :]
    for name in names:
        series = [w.rss_mb[name] for w in soak.windows if name in w.rss_mb]
        slope, level = trend([(w.start_s, w.rss_mb[name]) for w in half if name in w.rss_mb])
        growing = slope * 60 > GROWTH_LIMIT_PER_HOUR * level
        if growing:
            grows.append(name)
        lines.append(
            f"| {name} | {series[0]:.0f} | {series[-1]:.0f} | {max(series):.0f} | {slope:+.2f} "
            f"| {'GROWS' if growing else 'flat'} |"
        )
    ok = errors == 0 and jobs_ok and not grows
    lines += [
        "",
        f"**Verdict: {'held' if ok else 'did not hold'}**: {errors} errors; jobs "
        f"{'all succeeded' if jobs_ok else 'not all succeeded'}; memory "
        f"{'flat' if not grows else 'grows in ' + ', '.join(grows)}.",
    ]
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--predictions-per-s", type=float, default=80.0)
    parser.add_argument("--reads-per-s", type=float, default=10.0)
    parser.add_argument("--submit-every-s", type=float, default=30.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.md")
    args = parser.parse_args(argv)
    if min(args.minutes, args.window_s, args.submit_every_s) <= 0:
        parser.error("--minutes, --window-s and --submit-every-s must be above 0")
    state_dir = BENCH_DIR / "soak"
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(state_dir)
    # The load is one client; its limits must not be what the soak measures.
    off = "predictions=off,training_submissions=off,registry_writes=off"
    settings = settings.model_copy(update={"rate_limits": off})
    key = settings.api_keys.split("=", 1)[1]
    headers = {"x-api-key": key}
    model = f"soak-{secrets.token_hex(3)}"
    started = time.monotonic()
    try:
        with Mesh(settings) as mesh:
            first_model(mesh.settings, headers, model)
            soak = Soak(args, mesh, key, model)
            asyncio.run(soak.run())
            states = wait_for_jobs(mesh.settings, headers, soak.jobs, 600)
    except LaunchError as exc:
        print(f"error: the mesh did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        drop_databases(settings)
    command = "python -m bench.soak " + shlex.join(sys.argv[1:] if argv is None else argv)
    text, ok = report(soak, states, command.strip(), time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out} ({'held' if ok else 'did not hold'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
