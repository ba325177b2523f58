"""The gRPC server's own options for the answering path: grpc.aio against the sync server.

    python -m bench.grpc_server [--duration 10] [--concurrency 1,32]

Issue 19 asks whether the Inference service should serve on grpc.aio (what it does) or on the
sync server with a thread pool. This runs the floor's Predict (bench/floor.py: a fixed answer,
as large as an MNIST one) on each server in a process of its own, plain-text HTTP/2 on
loopback with no Envoy in front, and loads it with h2load (one stream per connection, a
784-float PredictRequest) at each concurrency:

- ``aio+uvloop``: grpc.aio on uvloop, as the services run (``MLMESH_EVENT_LOOP=uvloop``);
- ``aio+asyncio``: grpc.aio on Python's own event loop;
- ``sync+pool``: ``grpc.server`` with a ``ThreadPoolExecutor`` of ``--pool`` threads.

Reported per row: requests/s, p50 and p99, the server process's CPU per request, and
requests/s as a ratio to ``aio+uvloop`` at the same concurrency in the same run. The report
goes to bench/results/grpc-server.md. ``grpc.so_reuseport`` is not measured here: it lets
processes share one port, and the README's architecture section says why the Inference
processes are separate endpoints instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc

from bench.floor import FloorInference
from bench.predict import (
    GrpcTarget,
    H2load,
    LoadResult,
    add_load_arguments,
    child_server,
    free_port,
    process_cpu_s,
)
from mlmesh.inference.v1 import inference_pb2 as pb
from mlmesh.inference.v1 import inference_pb2_grpc
from services.common.server import run_on_event_loop
from services.launcher.process import port_open

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("aio+uvloop", "aio+asyncio", "sync+pool")
PATH = "/mlmesh.inference.v1.InferenceService/Predict"


class SyncFloor(inference_pb2_grpc.InferenceServiceServicer):
    """The floor's Predict on the sync server: the same fixed answer."""

    answer = FloorInference().predict_response

    def Predict(self, request: pb.PredictRequest, context: object) -> pb.PredictResponse:
        return self.answer


async def serve_aio(port: int) -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FloorInference(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve(kind: str, port: int, pool: int) -> None:
    if kind == "sync+pool":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=pool))
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(SyncFloor(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
    else:  # aio+uvloop or aio+asyncio
        run_on_event_loop(kind.removeprefix("aio+"), serve_aio(port))


@dataclass
class Measured:
    kind: str
    concurrency: int
    result: LoadResult
    cpu_ms: float


def measure(kind: str, args: argparse.Namespace, h2: H2load, message: bytes) -> list[Measured]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.grpc_server", "--serve", kind, "--port", str(port),
            "--pool", str(args.pool)]  # fmt: skip
    ready = partial(port_open, "127.0.0.1", port)
    with child_server(f"grpc-{kind}", argv, dict(os.environ), ready, args.work, 30.0) as child:
        answer = len(SyncFloor.answer.SerializeToString()) + 5
        target = GrpcTarget(kind, "127.0.0.1", port, PATH, message, answer)
        rows = []
        for c in args.concurrency:
            h2.run(target, c, args.warm_up)
            before = process_cpu_s(child.pid)
            result = h2.run(target, c, args.duration)
            cpu = process_cpu_s(child.pid) - before
            rows.append(Measured(kind, c, result, cpu * 1e3 / max(1, result.requests)))
            print(f"  {kind:<12} c={c:<3} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms "
                  f"server CPU {rows[-1].cpu_ms:.3f} ms/request", flush=True)  # fmt: skip
        return rows


def report(rows: list[Measured], args: argparse.Namespace, started: str) -> str:
    base = {m.concurrency: m.result.rps for m in rows if m.kind == KINDS[0]}
    lines = [
        "# gRPC server options on the answering path",
        "",
        "Written by `bench/grpc_server.py` (`python -m bench.grpc_server`); see its docstring.",
        "",
        f"Date: {started}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}, grpcio {grpc.__version__}; "
        f"h2load, plain-text HTTP/2 on loopback, {args.warm_up:g} s warm-up then "
        f"{args.duration:g} s per row; the sync server's pool: {args.pool} threads.",
        "",
        "| server | concurrency | requests/s | of aio+uvloop | p50 ms | p99 ms | server CPU "
        "ms/request | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        r = m.result
        ratio = r.rps / base[m.concurrency] if base.get(m.concurrency) else float("nan")
        lines.append(
            f"| {m.kind} | {m.concurrency} | {r.rps:.0f} | {ratio:.0%} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {m.cpu_ms:.3f} | {r.errors} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, (1, 32), "comma-separated concurrencies (default 1,32)")
    parser.add_argument("--pool", type=int, default=8, help="the sync server's threads")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpc-server.md")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.pool)
        return 0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.work = ROOT / ".bench" / "grpc-server"
    args.work.mkdir(parents=True, exist_ok=True)
    h2 = H2load(args.work, 1)
    image = pb.PredictRequest(image=[0.5] * 784).SerializeToString()
    rows = [m for kind in KINDS for m in measure(kind, args, h2, image)]
    args.out.write_text(report(rows, args, started))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
