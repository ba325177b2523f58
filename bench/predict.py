"""Prediction serving: mlmesh against the servers a user would otherwise pick, for three kinds
of model, and the in-process forward pass as the ceiling.

    .venv/bin/python -m bench.predict [--models mnist,resnet,sklearn] [--skip PART,...]
        [--duration S] [--warm-up S] [--concurrency 1,8,32] [--inference-threads N]
    make bench

One run starts a private mesh (free ports, databases of its own, as the tests do), registers
and promotes three models in it the way a user would (``mnist``: a CNN trained by the jobs'
code; ``resnet``: torchvision's ResNet-18 exported to ONNX and logged with
``mlflow.onnx.log_model``; ``sklearn``: a wine pipeline logged with ``mlflow.sklearn``), and
puts the same closed-loop load, one input per request, on each server of each version: mlmesh
over the Open Inference Protocol (gRPC ``ModelInfer`` straight to the Inference service, REST
``/v2/models/NAME/infer`` through Envoy; MNIST also over its own ``Predict`` and ``/predict``),
``mlflow models serve`` and Seldon MLServer; and times the forward pass in this process, with
interleaved checks of mlmesh against it. The method, what is fair and how, and the targets
(reported, never enforced: the script exits 0) are in ``bench/README.md``. Results:
``bench/results/predict.md``; ``.bench/predict/`` keeps the last run's logs and load scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import httpx
import numpy as np

from gateway.keys import new_api_key
from services.common import db
from services.common.settings import Settings
from services.launcher.mesh import API_KEY_HEADER, Mesh, child_env, http_ok
from services.launcher.process import Child, ChildSpec, Command, LaunchError, port_open

log = logging.getLogger("bench.predict")

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"  # ignored: the MLServer venv, the last run's state and logs
PREDICT_PATH = "/mlmesh.inference.v1.InferenceService/Predict"
PREDICT_BATCH_PATH = "/mlmesh.inference.v1.InferenceService/PredictBatch"
MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
CONCURRENCY = (1, 8, 32)
PIXELS = 784
MODELS = ("mnist", "resnet", "sklearn")
RESNET_BATCHES = (1, 4, 8, 16, 32)
RESNET_CLASSES = 1000

# Targets of issue 4 (MNIST), reported (never enforced).
TARGET_VS_MLFLOW = 5.0
TARGET_P99_MS = 50.0
TARGET_CACHED_P50_MS = 2.0
TARGET_SCALING = 3.0
# Targets of issue 19 (serving near the transport floor), reported (never enforced).
TARGET_OF_FLOOR = 0.60  # uncached REST /predict at the highest concurrency, of the floor's
TARGET_P50_OVER_FLOOR_MS = 0.5  # uncached REST p50 at c=1 - floor p50 - forward pass p50
TARGET_CACHED_P50_19_MS = 1.5  # cached REST p50 at c=1
TARGET_BATCH_OF_FORWARD = 0.70  # batches of 32 at c=8, images/s of the in-process batch 32
BATCH_IMAGES = 32
BATCH_CONCURRENCY = 8
# Targets of "Serve any model", reported (never enforced).
TARGET_VS_PEERS = 2.0  # MNIST and sklearn: mlmesh req/s at the highest concurrency
TARGET_OF_CEILING = 0.90  # ResNet: mlmesh images/s vs the in-process best batch
TARGET_P50_OVER_FORWARD_MS = 1.5  # every model: p50 at c=1 minus the batch-1 forward pass

# MLServer 1.7's inference workers need uvloop 0.21 (later ones break its worker start-up).
MLSERVER = "Seldon MLServer 1.7.1"
MLSERVER_PACKAGES = ("mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop==0.21.0")
MLSERVER_INSTALL_TIMEOUT_S = 300.0
MLFLOW_SERVE = "mlflow models serve"
# Requests of one row's counter range: far more than any row sends (uncached inputs unique).
# Four input values spell a counter in base 255 (255**4 inputs): MNIST's four top-row pixels
# (0 in every image), the ResNet's first four values, the first four wine columns.
VARIED = 4
COUNTER_SPACE = 255**VARIED
ROW_RANGE = 10_000_000
THREAD_RANGE = 1_000_000
MAX_LOADGEN_THREADS = ROW_RANGE // THREAD_RANGE

# mlmesh's row paths (the MNIST ones keep the names earlier results used).
# The services take only mutual TLS from the gateway (the front door): gRPC rows go through
# Envoy too, h2c with the key, as clients call.
PREDICT_GRPC = "gRPC through Envoy"
OIP_GRPC = "gRPC through Envoy, OIP ModelInfer raw"
PREDICT_REST = "REST through Envoy"
OIP_REST = "REST through Envoy, /v2 infer JSON"
OIP_REST_BINARY = "REST through Envoy, /v2 infer binary"
PREDICT_BATCH_GRPC = f"gRPC through Envoy, PredictBatch of {BATCH_IMAGES}"
OIP_BATCH_GRPC = f"gRPC through Envoy, OIP ModelInfer raw, {BATCH_IMAGES} rows"
# The transport floor (bench/floor.py): the same RPCs answered with fixed responses, behind an
# Envoy rendered from the mesh's gateway configuration.
FLOOR = "floor (fixed answers)"
MLSERVER_REST = "REST /v2 infer JSON"
MLSERVER_GRPC = "gRPC OIP ModelInfer raw"
INVOCATIONS = "REST /invocations"


# -- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of already sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def digits(counter: int) -> list[int]:
    """``counter`` in base 255, ``VARIED`` digits, least significant first (the Lua script
    computes the same)."""
    return [counter // 255**i % 255 for i in range(VARIED)]


def fmt_number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")  # valid JSON: "1", "0", "0.5", "-0.25"


def load_average() -> float:
    return os.getloadavg()[0]


# -- requests -----------------------------------------------------------------------------------


@dataclass
class Tensor:
    """One input tensor of a request, as the Open Inference Protocol names it."""

    name: str
    datatype: str  # FP32 or FP64
    array: np.ndarray  # with the request's shape (a batch of one)


HOLE = "\x00"  # where a varied value goes in a body's text (JSON never holds a NUL)


def array_json(array: np.ndarray, holes: Sequence[int] = ()) -> str:
    """``array`` as JSON nested lists (its shape), HOLE at the flat indices ``holes``."""
    items = [fmt_number(v) for v in array.ravel().tolist()]
    for i in holes:
        items[i] = HOLE
    for size in reversed(array.shape[1:]):
        items = ["[" + ",".join(items[i : i + size]) + "]" for i in range(0, len(items), size)]
    return "[" + ",".join(items) + "]"


def json_with(document: dict, arrays: dict[str, str]) -> str:
    """Compact JSON of ``document`` whose string values named in ``arrays`` are replaced by
    that JSON text (arrays written by array_json)."""
    text = json.dumps(document, separators=(",", ":"))
    for placeholder, value in arrays.items():
        quoted = json.dumps(placeholder)
        if text.count(quoted) != 1:
            raise ValueError(f"placeholder {placeholder} is not in the document once")
        text = text.replace(quoted, value)
    return text


@dataclass
class Body:
    """An HTTP request body around ``VARIED`` varied values: parts[0] v0 parts[1] ... v3
    parts[4]. JSON bodies write each value as its base plus digit/255 ("%.6f"); binary bodies
    (the binary tensor extension) write the digit as the lowest byte of a little-endian float,
    so the value moves in its last bits and stays finite."""

    parts: list[bytes]
    bases: list[float]
    binary: bool = False
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # e.g. the binary JSON's length

    @classmethod
    def from_json(cls, text: str, bases: Sequence[float]) -> Body:
        parts = [p.encode() for p in text.split(HOLE)]
        if len(parts) != VARIED + 1 or len(bases) != VARIED:
            raise ValueError(f"a body varies {VARIED} values; this one has {len(parts) - 1}")
        return cls(parts, list(bases))

    def render(self, counter: int) -> bytes:
        out = [self.parts[0]]
        for base, digit, part in zip(self.bases, digits(counter), self.parts[1:], strict=True):
            out.append(bytes([digit]) if self.binary else f"{base + digit / 255:.6f}".encode())
            out.append(part)
        return b"".join(out)


def vary(
    tensors: Sequence[Tensor], varied: Sequence[tuple[int, int]], counter: int
) -> list[Tensor]:
    """The tensors with their varied values (tensor index, flat index) set from ``counter``
    as a JSON body would carry them (base + digit/255)."""
    out = [Tensor(t.name, t.datatype, t.array.copy()) for t in tensors]
    for (t, i), digit in zip(varied, digits(counter), strict=True):
        flat = out[t].array.reshape(-1)
        flat[i] = float(f"{float(tensors[t].array.reshape(-1)[i]) + digit / 255:.6f}")
    return out


def oip_json_body(tensors: Sequence[Tensor], varied: Sequence[tuple[int, int]]) -> Body:
    """``POST /v2/models/NAME/infer`` in JSON: each tensor's data flat, row-major."""
    holes: dict[int, list[int]] = {}
    for t, i in varied:
        holes.setdefault(t, []).append(i)
    arrays = {
        f"@data{k}@": array_json(t.array.ravel(), holes.get(k, ())) for k, t in enumerate(tensors)
    }
    document = {
        "inputs": [
            {
                "name": t.name,
                "shape": list(t.array.shape),
                "datatype": t.datatype,
                "data": f"@data{k}@",
            }
            for k, t in enumerate(tensors)
        ]
    }
    bases = [float(tensors[t].array.reshape(-1)[i]) for t, i in varied]
    return Body.from_json(json_with(document, arrays), bases)


def oip_binary_body(tensors: Sequence[Tensor], varied: Sequence[tuple[int, int]]) -> Body:
    """``POST /v2/models/NAME/infer`` with the binary tensor extension (as tritonclient.http
    sends it): the JSON names each tensor and its byte size, the raw little-endian elements
    follow, and the answer's outputs come back binary too."""
    raws = [t.array.astype(t.array.dtype.newbyteorder("<")).tobytes() for t in tensors]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": t.name,
                    "shape": list(t.array.shape),
                    "datatype": t.datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
                for t, raw in zip(tensors, raws, strict=True)
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    data = header + b"".join(raws)
    starts = np.cumsum([len(header)] + [len(r) for r in raws])
    offsets = [int(starts[t]) + i * tensors[t].array.itemsize for t, i in varied]
    parts, at = [], 0
    for offset in offsets:  # the lowest byte of each varied value (little-endian: the first)
        parts.append(data[at:offset])
        at = offset + 1
    parts.append(data[at:])
    return Body(
        parts,
        [0.0] * VARIED,
        binary=True,
        content_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def model_infer_raw(model_name: str, tensors: Sequence[Tensor]) -> bytes:
    """A serialized Open Inference Protocol ModelInferRequest, raw little-endian contents."""
    from mlmesh.oip.v2 import grpc_predict_v2_pb2 as oip

    request = oip.ModelInferRequest(model_name=model_name)
    for t in tensors:
        request.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.array.shape))
        request.raw_input_contents.append(t.array.astype(t.array.dtype.newbyteorder("<")).tobytes())
    return request.SerializeToString()


# -- the load generators ------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One measured run: throughput and per-request latency of what answered."""

    requests: int  # answered requests (any status)
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # failed requests: transport errors, non-2xx, gRPC errors
    cached: int | None = None  # answers that said cached (wrk rows of mlmesh), None: unknown
    loadgen_cpu: float = 0.0  # load generator CPU seconds / wall seconds (1.0 = one core)
    machine_busy: float = math.nan  # share of all CPUs' time busy during the run
    detail: str = ""
    latencies: list[float] = field(default_factory=list, repr=False)  # ms, sorted (h2load)
    server_cpu_ms: float = math.nan  # the server processes' CPU time per request answered

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; (0, 0) elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def run_measured(
    argv: list[str], out_path: Path, timeout_s: float
) -> tuple[int, str, float, float]:
    """Run a load generator; return (exit code, its output, its CPU seconds / wall seconds,
    the share of the machine's CPU time that was busy meanwhile, all processes)."""
    busy0, total0 = cpu_ticks()
    with out_path.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    cpu = (usage.ru_utime + usage.ru_stime) / wall if wall else 0.0
    busy1, total1 = cpu_ticks()
    machine = (busy1 - busy0) / (total1 - total0) if total1 > total0 else math.nan
    return proc.returncode, out_path.read_text(errors="replace"), cpu, machine


WRK_LUA = r"""-- Written by bench/predict.py: POST one request body per request.
-- The body is parts[1] v1 parts[2] ... v4 parts[5] (the parts are files beside this script);
-- mode "vary": the four values spell a per-request counter (every input is new);
-- mode "fixed": the same body every time.
local dir = [==[%(dir)s]==]
local binary = %(binary)s
local bases = {%(bases)s}
local mode = "%(mode)s"
local first = %(first)d
local parts = {}
for i = 1, %(nparts)d do
  local f = assert(io.open(dir .. "/part-" .. i, "rb"))
  parts[i] = f:read("*a")
  f:close()
end
local threads = {}
answers, cached = 0, 0

local function body(c)
  local t = {parts[1]}
  for i = 1, #parts - 1 do
    local d = math.floor(c / 255 ^ (i - 1)) %% 255
    if binary then
      t[2 * i] = string.char(d)
    else
      t[2 * i] = string.format("%%.6f", bases[i] + d / 255)
    end
    t[2 * i + 1] = parts[i + 1]
  end
  return table.concat(t)
end

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  counter = first + tid * %(thread_range)d
  wrk.method = "POST"
%(headers)s  if mode == "fixed" then
    wrk.body = body(first)
  end
end

if mode == "vary" then
  function request()
    counter = counter + 1
    return wrk.format(nil, nil, nil, body(counter))
  end
end

function response(status, headers, body)
  answers = answers + 1
  if status == 200 and string.find(body, '"cached":%%s*true') then
    cached = cached + 1
  end
end

function done(summary, latency, requests)
  local a, c = 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("answers")
    c = c + t:get("cached")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"answers":%%d,"cached":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50.0), latency:percentile(99.0),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout, a, c))
end
"""


@dataclass
class HttpTarget:
    """An endpoint wrk loads with ``body`` (its varied values from a counter)."""

    name: str
    url: str
    body: Body
    headers: dict[str, str] = field(default_factory=dict)
    says_cached: bool = False  # its answers carry mlmesh's "cached" flag

    def all_headers(self) -> dict[str, str]:
        return {"content-type": self.body.content_type, **self.body.headers, **self.headers}

    def post(self, counter: int, timeout_s: float = 60.0) -> httpx.Response:
        """One request, as wrk sends it (the pre-flight)."""
        return httpx.post(
            self.url,
            content=self.body.render(counter),
            headers=self.all_headers(),
            timeout=timeout_s,
        )


class LoadGenerator:
    """A load generator binary: where it writes its files, its threads, its version."""

    tool = ""
    version_argv: tuple[str, ...] = ()
    version_pattern = ""

    def __init__(self, work_dir: Path, threads: int) -> None:
        self.work_dir = work_dir
        self.threads = threads

    @classmethod
    def version(cls) -> str:
        text = subprocess.run(cls.version_argv, capture_output=True, text=True).stdout
        match = re.search(cls.version_pattern, text)
        return match.group(1) if match else "?"


class Wrk(LoadGenerator):
    """wrk (HTTP/1.1): one process, ``threads`` threads, ``c`` connections."""

    tool = "wrk"
    version_argv = ("wrk", "-v")
    version_pattern = r"wrk\s+(\S+)"

    def script(self, target: HttpTarget, mode: str, first: int) -> Path:
        stem = f"wrk-{target.name}-{mode}-{first}"
        parts_dir = self.work_dir / stem
        parts_dir.mkdir(exist_ok=True)
        for i, part in enumerate(target.body.parts, start=1):
            (parts_dir / f"part-{i}").write_bytes(part)
        headers = "".join(
            f'  wrk.headers["{k}"] = "{v}"\n' for k, v in target.all_headers().items()
        )
        text = WRK_LUA % {
            "dir": parts_dir,
            "binary": "true" if target.body.binary else "false",
            "bases": ", ".join(repr(float(b)) for b in target.body.bases),
            "nparts": len(target.body.parts),
            "mode": mode,
            "first": first,
            "thread_range": THREAD_RANGE,
            "headers": headers,
        }
        path = self.work_dir / f"{stem}.lua"
        path.write_text(text)
        return path

    def run(
        self, target: HttpTarget, concurrency: int, seconds: float, mode: str, first: int
    ) -> LoadResult:
        script = self.script(target, mode, first)
        threads = max(1, min(self.threads, concurrency))
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            target.url,
        ]
        out = self.work_dir / f"{script.stem}-c{concurrency}.out"
        code, text, cpu, busy = run_measured(argv, out, seconds + 60)
        match = re.search(r"^WRK_RESULT (\{.*\})$", text, re.M)
        if code != 0 or match is None:
            raise RuntimeError(f"wrk failed (exit {code}): {text[-2000:]}")
        r = json.loads(match.group(1))
        errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
        return LoadResult(
            requests=r["requests"],
            seconds=r["duration_us"] / 1e6,
            p50_ms=r["p50_us"] / 1e3,
            p99_ms=r["p99_us"] / 1e3,
            errors=errors,
            cached=r["cached"] if target.says_cached else None,
            loadgen_cpu=cpu,
            machine_busy=busy,
            detail=f"max {r['max_us'] / 1e3:.1f} ms",
        )


@dataclass
class GrpcTarget:
    """A unary gRPC method h2load loads with one fixed, framed request message."""

    name: str
    host: str
    port: int
    path: str
    message: bytes
    response_bytes: int  # length of one framed OK answer (to count gRPC errors from bytes)
    headers: dict[str, str] = field(default_factory=dict)


class H2load(LoadGenerator):
    """h2load (nghttp2): h2c, one stream per connection, so ``c`` requests in flight."""

    tool = "h2load"
    version_argv = ("h2load", "--version")
    version_pattern = r"nghttp2/(\S+)"

    def run(
        self, target: GrpcTarget, concurrency: int, seconds: float, warm_up: float = 0.0
    ) -> LoadResult:
        """Load ``target`` for ``seconds`` (after ``warm_up`` seconds on the same connections,
        not counted: h2load's --warm-up-time)."""
        tag = f"{target.name}-c{concurrency}-{secrets.token_hex(3)}"
        body = self.work_dir / f"h2load-{tag}.bin"
        body.write_bytes(b"\x00" + struct.pack(">I", len(target.message)) + target.message)
        log_file = self.work_dir / f"h2load-{tag}.tsv"
        threads = max(1, min(self.threads, concurrency))
        while concurrency % threads:
            threads -= 1
        headers = {"content-type": "application/grpc", "te": "trailers", **target.headers}
        argv = ["h2load", f"-c{concurrency}", f"-t{threads}", "-m1", f"-D{max(1, round(seconds))}"]
        for k, v in headers.items():
            argv += ["-H", f"{k}: {v}"]
        if warm_up > 0:
            argv.append(f"--warm-up-time={warm_up:g}s")
        argv += ["-d", str(body), "--log-file", str(log_file)]
        argv.append(f"http://{target.host}:{target.port}{target.path}")
        out = self.work_dir / f"h2load-{tag}.out"
        code, text, cpu, busy = run_measured(argv, out, seconds + warm_up + 60)
        finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
        counts = re.search(
            r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
            r"(\d+) errored, (\d+) timeout",
            text,
        )
        traffic = re.search(r"\((\d+)\) data", text)
        if code != 0 or not (finished and counts and traffic):
            raise RuntimeError(f"h2load failed (exit {code}): {text[-2000:]}")
        latencies = []
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":  # the measured requests only
                latencies.append(int(parts[2]) / 1e3)
        latencies.sort()
        done, succeeded = int(counts.group(3)), int(counts.group(4))
        # HTTP 200 is not gRPC OK: an error answer is trailers-only, no DATA. Count OK answers
        # by the bytes received, each OK answer being as long as the pre-flight's.
        ok = min(succeeded, round(int(traffic.group(1)) / target.response_bytes))
        return LoadResult(
            requests=done,
            # Its counts are the measured requests', its "finished in" the warm-up's time too.
            seconds=float(finished.group(1)) - warm_up,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            errors=done - ok,
            loadgen_cpu=cpu,
            machine_busy=busy,
            detail=f"max {latencies[-1]:.1f} ms" if latencies else "",
            latencies=latencies,
        )


# -- rows ---------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str  # mnist, resnet, sklearn
    system: str
    path: str
    tool: str
    cache: str
    concurrency: int
    result: LoadResult | None
    note: str = ""
    load: float = math.nan  # the machine's 1-min load average when the row began


@dataclass
class ForwardRow:
    model: str
    runtime: str
    batch: int
    passes: int
    seconds: float
    p50_ms: float
    p99_ms: float
    service: bool = False  # the runtime the Inference service runs for this model
    cpu_s: float = 0.0  # this process's CPU time meanwhile (every thread)
    latencies: list[float] = field(default_factory=list, repr=False)  # ms per pass, sorted

    @property
    def images_per_s(self) -> float:
        return self.passes * self.batch / self.seconds


@dataclass
class Bench:
    """What one run measured and what it could not."""

    args: argparse.Namespace
    rows: list[Row] = field(default_factory=list)
    forward: list[ForwardRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)  # by key, in run order
    counter: int = 0  # next unused counter range (each uncached row gets its own)
    loads: list[float] = field(default_factory=list)  # 1-min load average before each row
    checks: list[Check] = field(default_factory=list)
    rollouts: list[RolloutSlice] = field(default_factory=list)
    processes: int = 1  # mlmesh's Inference processes (and the floor's)

    def next_range(self) -> int:
        first = self.counter
        self.counter += ROW_RANGE
        return first

    def skip(self, what: str, why: str) -> None:
        message = f"{what}: skipped, {' '.join(why.split())}"
        print(f"SKIPPED {message}", flush=True)
        self.notes.append(message)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        r = row.result
        if r is None:
            print(
                f"  {row.model} {row.system} {row.path} {row.cache} c={row.concurrency}: {row.note}"
            )
            return
        hits = "" if r.cached is None else f", cached answers {r.cached}/{r.requests}"
        print(
            f"  {row.model:<7} {row.system:<22} {row.path:<36} {row.cache:<8} "
            f"c={row.concurrency:<3} {r.rps:8.1f} req/s  p50 {r.p50_ms:7.2f} ms  "
            f"p99 {r.p99_ms:7.2f} ms  errors {r.errors}{hits}  load-gen CPU "
            f"{r.loadgen_cpu:.0%}  machine CPU busy {r.machine_busy:.0%}",
            flush=True,
        )

    def find(
        self, model: str, system: str, path: str, cache: str, concurrency: int
    ) -> LoadResult | None:
        for row in self.rows:
            if (row.model, row.system, row.path, row.cache, row.concurrency) == (
                model,
                system,
                path,
                cache,
                concurrency,
            ) and row.result is not None:
                return row.result
        return None

    def concurrencies(self, model: str) -> list[int]:
        """MNIST at every --concurrency, the other models at the lowest and highest."""
        levels = self.args.concurrency
        return list(levels) if model == "mnist" else sorted({min(levels), max(levels)})


def load_rows(
    bench: Bench,
    model: str,
    system: str,
    path: str,
    cache: str,
    run: Callable[[int, float], LoadResult],
    note: str = "",
    probe: Callable[[], dict[str, float]] | None = None,
    levels: Sequence[int] = (),
) -> None:
    """Warm up, then measure, at each concurrency (``levels``, or the model's); a failure
    becomes a row that says so. ``probe`` (mlmesh's rows) reads the service's own timings
    before and after the measured run, which the row's notes then give."""
    tool = "h2load" if path.startswith("gRPC") else "wrk"
    for c in levels or bench.concurrencies(model):
        load = load_average()
        bench.loads.append(load)
        try:
            warm = run(c, bench.args.warm_up)
            # The warm-up's load generator leaves requests in flight when it stops; a server
            # may still compute them (the peers do; mlmesh drops requests whose caller went).
            # Let it drain, so the measured run does not pay for them.
            settle = 0.0 if math.isnan(warm.p99_ms) else warm.p99_ms / 1e3
            time.sleep(min(10.0, settle))
            before = probe() if probe else {}
            result = run(c, bench.args.duration)
            if probe:
                delta = metrics_delta(before, probe())
                if result.requests and not math.isnan(delta.get("cpu_s", math.nan)):
                    result.server_cpu_ms = delta["cpu_s"] * 1e3 / result.requests
                itself = server_side(delta)
                result.detail = "; ".join(x for x in (itself, result.detail) if x)
        except Exception as exc:  # keep going: one broken row must not lose the others
            log.warning("%s %s %s c=%d failed: %s", model, system, path, c, exc)
            why = " ".join(str(exc).split()).replace("|", "/")[:300]
            bench.add(Row(model, system, path, tool, cache, c, None, f"failed: {why}", load))
            continue
        bench.add(Row(model, system, path, tool, cache, c, result, note, load))


# The Inference service's own timings (its /metrics), summed over what a row sent.
SERVER_METRICS = {
    "handler": "model_prediction_duration_seconds",  # a request in the service, per method
    "forward": "inference_forward_duration_seconds",  # one forward pass
    "batch": "inference_batch_size",  # rows per forward pass
}
ROWS_ANSWERED = "model_predictions_total"


def scrape(*urls: str) -> dict[str, float]:
    """The sums and counts of SERVER_METRICS' histograms and the rows answered (all labels
    and all ``urls``, the Inference processes, added up), and when they were read ("wall",
    monotonic seconds)."""
    from prometheus_client.parser import text_string_to_metric_families

    texts = [httpx.get(url, timeout=10).text for url in urls]
    found: dict[str, float] = {"wall": time.monotonic()}
    for family in (f for text in texts for f in text_string_to_metric_families(text)):
        for sample in family.samples:
            if sample.name == ROWS_ANSWERED:
                found["rows"] = found.get("rows", 0.0) + sample.value
            for key, metric in SERVER_METRICS.items():
                for suffix in ("_sum", "_count"):
                    if sample.name == metric + suffix:
                        found[key + suffix] = found.get(key + suffix, 0.0) + sample.value
    return found


def probe_of(urls: Sequence[str], pids: Sequence[int]) -> Callable[[], dict[str, float]]:
    """What a row reads of the server before and after it: the Inference processes' metrics
    (``urls``; none for the floor) and the CPU time the server's processes (``pids``) used
    ("cpu_s")."""

    def probe() -> dict[str, float]:
        found = scrape(*urls) if urls else {"wall": time.monotonic()}
        found["cpu_s"] = process_cpu_s(*pids)
        return found

    return probe


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What happened between two scrapes (the wall time between them included)."""
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}


def server_side(delta: dict[str, float]) -> str:
    """What the service measured of itself (a metrics_delta): mean time in the service per
    request, mean forward pass and rows per pass, and the share of the wall time the forward
    thread was busy (near 100%: the model is the limit)."""

    def mean(key: str, scale: float) -> float:
        count = delta.get(key + "_count", 0)
        return delta.get(key + "_sum", 0) / count * scale if count else math.nan

    handler, forward, rows = mean("handler", 1e3), mean("forward", 1e3), mean("batch", 1)
    if math.isnan(handler):
        return ""
    if math.isnan(forward):
        return f"in the service {handler:.2f} ms/request, no forward pass (all from the cache)"
    busy = delta.get("forward_sum", 0) / delta["wall"] if delta.get("wall") else math.nan
    return (
        f"in the service {handler:.2f} ms/request, forward {forward:.2f} ms/pass of "
        f"{rows:.1f} rows, forward thread busy {busy:.0%}"
    )


# -- the mesh and the models --------------------------------------------------------------------


def bench_settings(
    state_dir: Path, rate_limits: str = "predictions=1000000/s:1000000", threads: int = 1
) -> Settings:
    """Settings for a private mesh: free ports, databases and a model name of its own.

    PostgreSQL and Redis are the configured servers (MLMESH_* or the defaults; the launcher
    starts private ones when none answers), with databases unique to this run.
    """
    base = Settings()
    tag = secrets.token_hex(4)
    pg_server = base.database_url.rsplit("/", 1)[0]
    redis_server = base.redis_url.rsplit("/", 1)[0]
    values: dict[str, object] = {
        "database_url": f"{pg_server}/mlmesh_bench_{tag}",
        "mlflow_backend_store_uri": f"{pg_server}/mlflow_bench_{tag}",
        "redis_url": f"{redis_server}/{9 + secrets.randbelow(6)}",
        "mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}",
        "training_queue": f"arq:mlmesh-bench-{tag}",
        "state_dir": state_dir,
        "api_keys": f"bench={new_api_key(24)}",
        "api_keys_file": None,
        "default_model_name": f"bench-mnist-{tag}",
        "shutdown_grace_s": 3.0,
        # Limits are checked (a Redis call per request, as in production) but never reached:
        # the load generators are one client each.
        "rate_limits": rate_limits,
        "inference_threads": threads,
    }
    # Every port and address setting, including those of services added later.
    for name in Settings.model_fields:
        if name.endswith("_address"):
            values[name] = f"127.0.0.1:{free_port()}"
        elif name.endswith("_port") and name != "mlflow_port":
            values[name] = free_port()
    return Settings(**values)


def drop_databases(settings: Settings) -> None:
    for url in (settings.database_url, settings.mlflow_backend_store_uri):
        try:
            asyncio.run(db.drop_database(url))
        except Exception as exc:
            log.warning("could not drop %s: %s", url, exc)


@dataclass
class Model:
    """A registered, promoted model version and the requests every server gets for it."""

    key: str  # mnist, resnet, sklearn (MLServer's name for it too)
    title: str
    name: str  # the registered model
    version: int
    local_dir: Path  # the downloaded MLflow model directory
    about: str  # what it is, for the report
    tensors: list[Tensor]  # one request's inputs (a batch of one)
    varied: list[tuple[int, int]]  # (tensor, flat index) of the VARIED values per request
    invocations: Body  # mlflow models serve's body
    binary_rest: bool = False  # mlmesh's REST rows also with the binary tensor extension

    def inputs(self, counter: int) -> list[Tensor]:
        return vary(self.tensors, self.varied, counter)

    def batch(self, size: int) -> dict[str, np.ndarray]:
        """``size`` different requests stacked, as the batcher stacks them."""
        requests = [self.inputs(i) for i in range(size)]
        return {
            t.name: np.concatenate([r[k].array for r in requests])
            for k, t in enumerate(self.tensors)
        }


def api_key(settings: Settings) -> str:
    """The key of the first client in a private mesh's settings (bench_settings makes one)."""
    return settings.api_keys.split(",")[0].split("=", 1)[1]


def predict_body(image: np.ndarray) -> Body:
    """``POST /predict``'s JSON for one image, its first VARIED pixels varied per request."""
    return Body.from_json(
        json_with({"image": "@data@"}, {"@data@": array_json(image.ravel(), range(VARIED))}),
        [0.0] * VARIED,
    )


def sdk_client(settings: Settings):
    from mlmesh_client.client import Client

    key = api_key(settings)
    return Client(f"{settings.gateway_host}:{settings.gateway_port}", api_key=key)


def promote_and_download(settings: Settings, name: str, version: int, work_dir: Path) -> Path:
    """Promote the version through mlmesh (the Inference service loads it first) and
    download its MLflow model, as the peers and the in-process rows load it."""
    import mlflow

    started = time.monotonic()
    with sdk_client(settings) as sdk:
        sdk.promote(name, version)
    print(
        f"promoted {name} v{version} to Production ({time.monotonic() - started:.0f} s, "
        "the Inference service loaded it)",
        flush=True,
    )
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{name}/{version}", dst_path=str(work_dir / name)
        )
    )


def invocations_body(document: dict, array: np.ndarray, holes: Sequence[int]) -> Body:
    """mlflow serve's body: ``document`` with "@data@" for ``array`` as nested lists."""
    bases = [float(array.reshape(-1)[i]) for i in holes]
    return Body.from_json(json_with(document, {"@data@": array_json(array, holes)}), bases)


def register_mnist(settings: Settings, train_images: int, work_dir: Path) -> Model:
    """Train a CNN for one epoch with the jobs' own code, register it, promote to Production."""
    from services.training.ml.data import load_dataset
    from services.training.ml.train import TrainSpec, train
    from services.training.params import validate

    spec = TrainSpec(
        job_id=f"bench-{secrets.token_hex(4)}",
        # The defaults (the CNN on MNIST, adam, seed 42) but for what is named, as a job's.
        params=validate(
            {
                "epochs": 1,
                "train_subset": train_images,
                "experiment_name": "bench-predict",
                "model_name": settings.default_model_name,
            }
        ),
        tracking_uri=settings.mlflow_tracking_uri,
        data_dir=str(settings.data_dir) if settings.data_dir else None,
        client="bench",
        attempt=1,
    )
    model_name = spec.params.model_name
    started = time.monotonic()
    result = train(spec, emit=lambda event: None, should_stop=lambda: False)
    accuracy = result.metrics["test_accuracy"]
    print(
        f"trained and registered {model_name} v{result.model_version} in "
        f"{time.monotonic() - started:.0f} s (test accuracy {accuracy:.4f})",
        flush=True,
    )
    local = promote_and_download(settings, model_name, result.model_version, work_dir)
    dataset = load_dataset("mnist", spec.data_dir)
    image = dataset.test.images[0].numpy().astype(np.float32).reshape(1, PIXELS).copy()
    image[0, :VARIED] = 0.0  # the pixels the load varies; 0 in every MNIST image anyway
    holes = range(VARIED)
    return Model(
        key="mnist",
        title="MNIST CNN",
        name=model_name,
        version=result.model_version,
        local_dir=local,
        about=(
            f"`{model_name}` v{result.model_version}: the CNN trained 1 epoch on "
            f"{train_images} MNIST images with the jobs' code (test accuracy {accuracy:.4f}), "
            "logged in MLflow's pytorch flavor (pt2) with its ONNX export; input `input-0` "
            "FP32 [-1, 784], output `output-0` FP32 [-1, 10]. mlmesh runs the ONNX export on "
            "ONNX Runtime, mlflow serve and MLServer the pytorch flavor (torch eager)"
        ),
        tensors=[Tensor("input-0", "FP32", image)],
        varied=[(0, i) for i in holes],
        invocations=invocations_body({"inputs": "@data@"}, image, holes),
    )


def register_resnet(settings: Settings, threads: int, work_dir: Path) -> Model:
    """torchvision's ResNet-18 (random weights: nothing is downloaded) exported to ONNX and
    logged with mlflow.onnx.log_model, its ONNX session options set to the service's threads
    (mlflow serve and MLServer read them; mlmesh sets its own, the same)."""
    import mlflow
    import mlflow.onnx
    import onnx
    import torch
    import torchvision
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    name = settings.default_model_name.replace("bench-mnist-", "bench-resnet-")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=RESNET_CLASSES).eval()
    path = work_dir / "resnet18.onnx"
    started = time.monotonic()
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 224, 224), "input")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, RESNET_CLASSES), "logits")]),
    )
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("bench-predict")
    with mlflow.start_run(run_name="resnet18-onnx"):
        info = mlflow.onnx.log_model(
            onnx.load(str(path)),
            name="model",
            signature=signature,
            registered_model_name=name,
            onnx_session_options={"intra_op_num_threads": threads, "inter_op_num_threads": 1},
        )
    version = int(info.registered_model_version)
    print(
        f"exported and registered {name} v{version} in {time.monotonic() - started:.0f} s "
        f"({path.stat().st_size / 1e6:.0f} MB of ONNX)",
        flush=True,
    )
    local = promote_and_download(settings, name, version, work_dir)
    # An "image" as a normalised input looks: values around 0, three decimals.
    rng = np.random.default_rng(7)
    image = np.round(rng.standard_normal((1, 3, 224, 224)), 3).astype(np.float32)
    holes = range(VARIED)
    return Model(
        key="resnet",
        title="ResNet-18 (ONNX)",
        name=name,
        version=version,
        local_dir=local,
        about=(
            f"`{name}` v{version}: torchvision's `resnet18(weights=None)` (random weights, "
            f"{RESNET_CLASSES} classes, 11.7 M parameters) exported with "
            "`torch.onnx.export(dynamo=False)`, batch axis dynamic, logged with "
            "`mlflow.onnx.log_model` (`onnx_session_options` intra-op threads = "
            f"{threads}); input `input` FP32 [-1, 3, 224, 224] (602 KB raw, about 1 MB as "
            "JSON), output `logits` FP32 [-1, 1000]. Every server runs it on ONNX Runtime"
        ),
        tensors=[Tensor("input", "FP32", image)],
        varied=[(0, i) for i in holes],
        invocations=invocations_body({"inputs": "@data@"}, image, holes),
        binary_rest=True,
    )


def register_sklearn(settings: Settings, work_dir: Path) -> Model:
    """A scikit-learn pipeline on the bundled wine data, logged as a user would."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    name = settings.default_model_name.replace("bench-mnist-", "bench-wine-")
    wine = load_wine(as_frame=True)
    features = wine.data.rename(columns=lambda c: c.replace("/", "_"))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(features, wine.target)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("bench-predict")
    with mlflow.start_run(run_name="wine-sklearn"):
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(features, model.predict(features)),
            input_example=features.head(3),
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    print(f"registered {name} v{version}", flush=True)
    local = promote_and_download(settings, name, version, work_dir)
    row = features.iloc[0].to_numpy(dtype=np.float64)
    holes = range(VARIED)
    columns = list(features.columns)
    return Model(
        key="sklearn",
        title="scikit-learn pipeline (wine)",
        name=name,
        version=version,
        local_dir=local,
        about=(
            f"`{name}` v{version}: StandardScaler + LogisticRegression on scikit-learn's "
            "wine data, logged with `mlflow.sklearn.log_model` and "
            "`infer_signature(X, model.predict(X))`: 13 FP64 columns (each a tensor [-1] in "
            "the Open Inference Protocol), output INT64 [-1]. Every server runs it through "
            "`mlflow.pyfunc` (mlmesh's pyfunc runtime makes the DataFrame)"
        ),
        tensors=[Tensor(c, "FP64", row[i : i + 1].copy()) for i, c in enumerate(columns)],
        varied=[(i, 0) for i in holes],
        invocations=invocations_body(
            {"dataframe_split": {"columns": columns, "data": "@data@"}}, row.reshape(1, -1), holes
        ),
    )


# -- mlmesh rows --------------------------------------------------------------------------------


def grpc_call(host: str, port: int, path: str, message: bytes, headers: dict[str, str]) -> bytes:
    """One unary call of serialized ``message`` to ``path``; the serialized answer."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(path)  # no (de)serializers: bytes in, bytes out
        return call(message, metadata=tuple(headers.items()), timeout=30.0)


def wait_for_model(settings: Settings, model: Model, timeout_s: float) -> str | None:
    """None once the Inference service answers ModelInfer for the model's production version;
    else why not."""
    from mlmesh.oip.v2 import grpc_predict_v2_pb2 as oip

    host, port = settings.gateway_host, settings.gateway_port
    auth = {API_KEY_HEADER: api_key(settings)}
    if not (ROOT / "services" / "inference").is_dir():
        return "services/inference/ does not exist yet (no Inference service in this tree)"
    message = model_infer_raw(model.name, model.tensors)
    deadline = time.monotonic() + timeout_s
    last = "nothing answered"
    while time.monotonic() < deadline:
        if not port_open(host, port):
            last = f"nothing listens at {host}:{port} (the gateway)"
        else:
            try:
                reply = oip.ModelInferResponse.FromString(
                    grpc_call(host, port, MODEL_INFER_PATH, message, auth)
                )
            except grpc.RpcError as exc:
                last = f"ModelInfer answered {exc.code().name}: {exc.details()}"
            else:
                if reply.model_version == str(model.version):
                    return None
                last = f"ModelInfer answered with version {reply.model_version}"
        time.sleep(1.0)
    return f"the Inference service did not serve {model.name} v{model.version}: {last}"


def h2load_rows(
    bench: Bench,
    h2: H2load,
    model: Model,
    system: str,
    path: str,
    target: GrpcTarget,
    caches: Sequence[str],
    note: str = "",
    probe: Callable[[], dict[str, float]] | None = None,
    levels: Sequence[int] = (),
) -> None:
    """Pre-flight ``target`` (which stores the answer), then load it: per cache, "uncached"
    with ``cache-control: no-cache``, "cached" as it is, "none" for servers without a cache."""
    try:
        grpc_call(target.host, target.port, target.path, target.message, target.headers)
    except grpc.RpcError as exc:
        bench.skip(
            f"{model.key} {system} {path}", f"pre-flight failed: {exc.code().name}: {exc.details()}"
        )
        return
    for cache in caches:
        headers = {"cache-control": "no-cache"} if cache == "uncached" else {}
        sent = GrpcTarget(
            f"{model.key}-{target.name}-{cache}",
            target.host,
            target.port,
            target.path,
            target.message,
            0,
            {**target.headers, **headers},
        )
        answer = grpc_call(sent.host, sent.port, sent.path, sent.message, sent.headers)
        sent.response_bytes = 5 + len(answer)
        if target.path == PREDICT_PATH:
            from mlmesh.inference.v1 import inference_pb2

            if inference_pb2.PredictResponse.FromString(answer).cached != (cache == "cached"):
                bench.notes.append(
                    f"{path} {cache}: the pre-flight answer said the opposite of {cache}; the "
                    "rows are labelled as sent"
                )
        fixed = "`cache-control: no-cache` (fixed body)" if cache == "uncached" else ""
        load_rows(
            bench,
            model.key,
            system,
            path,
            cache,
            lambda c, s, t=sent: h2.run(t, c, s),
            "; ".join(x for x in (fixed, note) if x),
            probe,
            levels,
        )


def wrk_rows(
    bench: Bench,
    wrk: Wrk,
    model: Model,
    system: str,
    path: str,
    target: HttpTarget,
    caches: Sequence[str],
    note: str = "",
    probe: Callable[[], dict[str, float]] | None = None,
) -> None:
    """Pre-flight ``target``, then load it: "uncached" and "none" rows send a new input every
    request, "cached" rows repeat the pre-flight's."""
    first = bench.next_range()
    try:
        answer = target.post(first)
    except httpx.HTTPError as exc:
        bench.skip(f"{model.key} {system} {path}", f"pre-flight failed: {exc}")
        return
    if answer.status_code != 200:
        bench.skip(
            f"{model.key} {system} {path}",
            f"pre-flight answered {answer.status_code}: {answer.text[:300]}",
        )
        return
    for cache in caches:
        if cache == "cached":
            run = lambda c, s: wrk.run(target, c, s, "fixed", first)  # noqa: E731
            row_note = note
        else:
            run = lambda c, s: wrk.run(target, c, s, "vary", bench.next_range())  # noqa: E731
            row_note = "; ".join(x for x in ("a new input every request", note) if x)
        load_rows(bench, model.key, system, path, cache, run, row_note, probe)


def mlmesh_rows(
    bench: Bench,
    settings: Settings,
    model: Model,
    wrk: Wrk,
    h2: H2load,
    forward: Callable[[dict[str, np.ndarray]], object] | None,
    processes: list[tuple[int, str]],
) -> None:
    """mlmesh's rows of one model: the interleaved checks against the in-process ``forward``
    (the service's runtime; None: no checks), the Open Inference Protocol's rows, then MNIST's
    own routes."""
    why = wait_for_model(settings, model, timeout_s=120.0)
    if why:
        bench.skip(f"{model.key}: mlmesh rows", why)
        return
    host, port = settings.gateway_host, settings.gateway_port  # gRPC too goes through Envoy
    key = api_key(settings)
    pids = [pid for pid, _ in processes]
    probe = probe_of([url for _, url in processes], pids)
    # MNIST keeps its issue-4 rows (cached and uncached): ModelInfer, Predict, POST /predict.
    caches = ("uncached", "cached") if model.key == "mnist" else ("uncached",)
    if forward is not None:
        # gRPC, h2load: one fixed message, raw little-endian contents (as tritonclient).
        checked = GrpcTarget(
            f"{model.key}-check",
            host,
            port,
            MODEL_INFER_PATH,
            model_infer_raw(model.name, model.inputs(bench.next_range())),
            0,
            {API_KEY_HEADER: key, "cache-control": "no-cache"},
        )
        try:
            answer = grpc_call(host, port, MODEL_INFER_PATH, checked.message, checked.headers)
        except grpc.RpcError as exc:
            bench.skip(f"{model.key}: interleaved checks", f"pre-flight failed: {exc.details()}")
        else:
            checked.response_bytes = 5 + len(answer)
            levels = bench.concurrencies(model.key)
            pairs = [(min(levels), 1)]
            best = most_efficient(bench, model.key)
            if model.key == "resnet" and best is not None:
                pairs.append((max(levels), best.batch))  # compute-bound: the throughput target
            for concurrency, size in pairs:
                interleaved_check(
                    bench,
                    model,
                    partial(forward, model.batch(size)),
                    size,
                    h2,
                    checked,
                    concurrency,
                    pids,
                    probe,
                )
    serving_rows(bench, "mlmesh", settings, model, wrk, h2, caches, probe)


def serving_rows(
    bench: Bench,
    system: str,
    gateway: Settings,
    model: Model,
    wrk: Wrk,
    h2: H2load,
    caches: Sequence[str],
    probe: Callable[[], dict[str, float]] | None = None,
) -> None:
    """The rows of one model through the gateway ``gateway`` names, as ``system`` (mlmesh,
    or the floor): the Open Inference Protocol over gRPC and REST; for MNIST also its own
    Predict and /predict, and batches of BATCH_IMAGES over PredictBatch and ModelInfer."""
    from mlmesh.inference.v1 import inference_pb2

    host, port = gateway.gateway_host, gateway.gateway_port  # gRPC too goes through Envoy
    auth = {API_KEY_HEADER: api_key(gateway)}
    mnist = model.key == "mnist"
    fixed = model.inputs(bench.next_range())
    # gRPC, h2load: one fixed message, raw little-endian contents (as tritonclient).
    target = GrpcTarget(
        "infer", host, port, MODEL_INFER_PATH, model_infer_raw(model.name, fixed), 0, auth
    )
    h2load_rows(bench, h2, model, system, OIP_GRPC, target, caches, probe=probe)
    # REST through Envoy, wrk: every uncached request a new input.
    infer_url = f"{gateway.gateway_url}/v2/models/{model.name}/infer"
    oip = HttpTarget("oip", infer_url, oip_json_body(model.tensors, model.varied), auth)
    uncached = [c for c in caches if c != "cached"]
    wrk_rows(bench, wrk, model, system, OIP_REST, oip, uncached, probe=probe)
    if model.binary_rest:
        binary = HttpTarget(
            "oip-binary", infer_url, oip_binary_body(model.tensors, model.varied), auth
        )
        note = "binary tensor extension, binary output"
        wrk_rows(bench, wrk, model, system, OIP_REST_BINARY, binary, uncached, note, probe)
    if not mnist:
        return
    message = inference_pb2.PredictRequest(image=fixed[0].array.ravel().tolist())
    target = GrpcTarget("predict", host, port, PREDICT_PATH, message.SerializeToString(), 0, auth)
    h2load_rows(bench, h2, model, system, PREDICT_GRPC, target, caches, probe=probe)
    body = predict_body(fixed[0].array)
    rest = HttpTarget("rest", f"{gateway.gateway_url}/predict", body, auth, True)
    wrk_rows(bench, wrk, model, system, PREDICT_REST, rest, caches, probe=probe)
    # Batches: BATCH_IMAGES different images a request, computed afresh (no-cache), at
    # BATCH_CONCURRENCY; their target is the in-process pass at that batch, not the floor.
    images = model.batch(BATCH_IMAGES)
    batch = inference_pb2.PredictBatchRequest(
        images=[inference_pb2.Image(pixels=row.tolist()) for row in images[fixed[0].name]]
    )
    levels = [BATCH_CONCURRENCY]
    target = GrpcTarget("batch", host, port, PREDICT_BATCH_PATH, batch.SerializeToString(), 0, auth)
    h2load_rows(bench, h2, model, system, PREDICT_BATCH_GRPC, target, uncached, probe=probe,
                levels=levels)  # fmt: skip
    stacked = [Tensor(t.name, t.datatype, images[t.name]) for t in model.tensors]
    target = GrpcTarget(
        "infer-batch", host, port, MODEL_INFER_PATH, model_infer_raw(model.name, stacked), 0, auth
    )
    h2load_rows(bench, h2, model, system, OIP_BATCH_GRPC, target, uncached, probe=probe,
                levels=levels)  # fmt: skip


@contextmanager
def floor_gateway(settings: Settings, log_dir: Path) -> Iterator[tuple[Settings, list[int]]]:
    """bench/floor.py, as many processes as the mesh has Inference processes, and an Envoy
    in front of them rendered from the mesh's gateway configuration (its keys, policy, TLS to
    the upstream), with the floor in the Inference service's place: that gateway's settings,
    while they run, and the floor processes' pids."""
    from gateway.render import render_envoy_config
    from services.launcher.mesh import envoy_spec, grpc_serving

    floor = settings.model_copy(
        update={
            "inference_address": f"127.0.0.1:{free_port()}",
            "inference_health_port": free_port(),
            "inference_http_port": free_port(),
            "gateway_port": free_port(),
            "gateway_admin_port": free_port(),
            "gateway_metrics_port": free_port(),
            "gateway_mlflow_port": free_port(),
        }
    )
    config = render_envoy_config(
        floor, settings.state_dir / "mlmesh.binpb", log_dir.parent / "envoy-floor.yaml"
    )
    envoy = envoy_spec(floor).command()
    envoy_argv = [str(envoy.argv[0]), "-c", str(config), *map(str, envoy.argv[3:])]
    env = child_env(floor)
    with contextlib.ExitStack() as stack:
        pids = []
        for e in floor.inference_endpoints():
            ports = ["--health-port", str(e.health_port), "--http-port", str(e.http_port)]
            argv = [sys.executable, "-m", "bench.floor", "--address", e.address, *ports]
            ready = partial(grpc_serving, e.health_address)
            child = stack.enter_context(child_server(f"floor-{e.index}", argv, env, ready, log_dir))
            pids.append(child.pid)
        ready = partial(http_ok, f"{floor.gateway_url}/ready")
        stack.enter_context(child_server("envoy-floor", envoy_argv, env, ready, log_dir))
        yield floor, pids


def floor_rows(bench: Bench, settings: Settings, model: Model, wrk: Wrk, h2: H2load) -> None:
    """The floor's rows, as mlmesh's MNIST rows (its answers are fixed, so: no cache)."""
    try:
        with floor_gateway(settings, settings.state_dir / "logs") as (floor, pids):
            serving_rows(bench, FLOOR, floor, model, wrk, h2, ("none",), probe_of([], pids))
    except LaunchError as exc:
        bench.skip(PARTS["floor"], f"it did not start: {exc}")


# -- baseline servers ---------------------------------------------------------------------------


@contextmanager
def child_server(
    name: str,
    argv: list[str],
    env: dict[str, str],
    ready: Callable[[], bool],
    log_dir: Path,
    timeout_s: float = 180.0,
) -> Iterator[Child]:
    """Run a server as the launcher runs its children (own group, log file), until ready."""
    spec = ChildSpec(
        name=name, what=name, command=lambda: Command(argv), ready=ready, timeout_s=timeout_s
    )
    child = Child(spec, spec.command(), log_dir / f"{name}.log", env)
    child.start()
    try:
        started = time.monotonic()
        while not spec.ready():
            code = child.exit_code()
            if code is not None:
                raise child.failure(f"exited with code {code} before it was ready")
            if time.monotonic() - started > timeout_s:
                raise child.failure(f"not ready after {timeout_s:.0f} s")
            time.sleep(0.25)
        print(f"{name} is ready ({time.monotonic() - started:.0f} s)", flush=True)
        yield child
    finally:
        child.stop(15.0)


def peer_env(threads: int, bin_dir: Path) -> dict[str, str]:
    """A peer server's environment: as from an activated venv (its scripts on PATH), torch's
    and numpy's threads as many as the service's forward pass has."""
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def mlflow_serve_rows(bench: Bench, settings: Settings, wrk: Wrk, logs: Path) -> None:
    for model in bench.models.values():
        port = free_port()
        env = {
            **peer_env(bench.args.inference_threads, Path(sys.executable).parent),
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        }
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{model.name}/{model.version}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ]
        target = HttpTarget(
            f"mlflow-{model.key}", f"http://127.0.0.1:{port}/invocations", model.invocations
        )
        try:
            ready = partial(http_ok, f"http://127.0.0.1:{port}/ping")
            with child_server(f"mlflow-serve-{model.key}", argv, env, ready, logs):
                wrk_rows(
                    bench,
                    wrk,
                    model,
                    MLFLOW_SERVE,
                    INVOCATIONS,
                    target,
                    ("none",),
                    "1 uvicorn worker",
                )
        except Exception as exc:
            bench.skip(f"{model.key}: {MLFLOW_SERVE}", str(exc)[:500])


def mlserver_venv(force: bool) -> tuple[Path | None, str]:
    """MLServer and its MLflow runtime in .bench/mlserver-venv, layered over this venv (torch,
    mlflow and the rest come from it; MLServer's own pins win). (python, "") or (None, why)."""
    venv = BENCH_DIR / "mlserver-venv"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    wanted = " ".join(MLSERVER_PACKAGES)
    if not force and marker.exists() and marker.read_text() == wanted:
        return python, ""
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    log_path = BENCH_DIR / "mlserver-install.log"
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"installing {wanted} into {venv} (log {log_path}) ...", flush=True)
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
        site = next((venv / "lib").glob("python3*/site-packages"))
        ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
        (site / "zz-mlmesh-venv.pth").write_text("\n".join(ours) + "\n")
        import mlflow

        with log_path.open("w") as out:
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    *MLSERVER_PACKAGES,
                    f"mlflow=={mlflow.__version__}",
                ],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=MLSERVER_INSTALL_TIMEOUT_S,
            )
        subprocess.run(
            [str(python), "-c", "import mlserver, mlserver_mlflow, uvloop"], check=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return None, f"installing it took over {MLSERVER_INSTALL_TIMEOUT_S:.0f} s (see {log_path})"
    except (subprocess.CalledProcessError, StopIteration, OSError) as exc:
        tail = log_path.read_text()[-600:] if log_path.exists() else ""
        return None, f"it did not install ({exc}): {tail}"
    marker.write_text(wanted)
    print(f"installed MLServer in {time.monotonic() - started:.0f} s", flush=True)
    return python, ""


PARTS = {
    "mlmesh": "mlmesh (gRPC direct, REST through Envoy)",
    "mlflow": MLFLOW_SERVE,
    "mlserver": "Seldon MLServer",
    "forward": "the in-process forward pass",
    "rollout": "rollouts: canary and shadow against none (MNIST Predict, concurrency 32)",
    "floor": "the transport floor (bench/floor.py behind the same gateway configuration)",
}


def mlserver_rows(bench: Bench, wrk: Wrk, h2: H2load, work_dir: Path, logs: Path) -> None:
    """One MLServer for every model (each in its MLflow runtime), its defaults: one parallel
    inference worker, no adaptive batching; its ports free ones on loopback."""
    python, why = mlserver_venv(bench.args.reinstall_mlserver)
    if python is None:
        bench.skip("Seldon MLServer", why)
        return
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    repo = work_dir / "mlserver"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 1,  # its default, said out loud
            }
        )
    )
    for model in bench.models.values():
        (repo / model.key).mkdir(exist_ok=True)
        (repo / model.key / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model.key,
                    "implementation": "mlserver_mlflow.MLflowRuntime",
                    "parameters": {"uri": str(model.local_dir)},
                }
            )
        )
    base = f"http://127.0.0.1:{http_port}"
    argv = [str(python.parent / "mlserver"), "start", str(repo)]
    env = peer_env(bench.args.inference_threads, python.parent)
    try:
        with child_server("mlserver", argv, env, partial(http_ok, f"{base}/v2/health/live"), logs):
            for model in bench.models.values():
                ready = f"{base}/v2/models/{model.key}/ready"
                deadline = time.monotonic() + 120
                while not http_ok(ready) and time.monotonic() < deadline:
                    time.sleep(0.5)
                if not http_ok(ready):
                    bench.skip(f"{model.key}: {MLSERVER}", f"{ready} did not answer 200 in 120 s")
                    continue
                rest = HttpTarget(
                    f"mlserver-{model.key}",
                    f"{base}/v2/models/{model.key}/infer",
                    oip_json_body(model.tensors, model.varied),
                )
                wrk_rows(
                    bench,
                    wrk,
                    model,
                    MLSERVER,
                    MLSERVER_REST,
                    rest,
                    ("none",),
                    "the same body as mlmesh's JSON rows",
                )
                # Its gRPC face takes the very request mlmesh's OIP rows send (bar the name).
                target = GrpcTarget(
                    "mlserver-grpc",
                    "127.0.0.1",
                    grpc_port,
                    MODEL_INFER_PATH,
                    model_infer_raw(model.key, model.inputs(bench.next_range())),
                    0,
                )
                h2load_rows(
                    bench,
                    h2,
                    model,
                    MLSERVER,
                    MLSERVER_GRPC,
                    target,
                    ("none",),
                    "the same request as mlmesh's ModelInfer rows",
                )
    except Exception as exc:
        bench.skip(MLSERVER, str(exc)[:500])


# -- the forward pass in this process -----------------------------------------------------------

RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch eager", "pyfunc": "mlflow.pyfunc"}


def time_forward(
    model: str,
    name: str,
    forward: Callable[[], object],
    batch: int,
    seconds: float,
    service: bool = False,
    quiet: bool = False,
) -> ForwardRow:
    """Call ``forward()`` (one pass over ``batch`` inputs) back to back for ``seconds``, at
    least 5 times, after a warm-up of up to 20 calls or 1 s (2 calls at least); time each."""
    started = time.perf_counter()
    for n in range(20):
        forward()
        if n >= 1 and time.perf_counter() - started > 1.0:
            break
    latencies: list[float] = []
    cpu = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        t0 = time.perf_counter()
        forward()
        t1 = time.perf_counter()
        latencies.append((t1 - t0) * 1e3)
        if t1 >= deadline and len(latencies) >= 5:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    latencies.sort()
    row = ForwardRow(
        model,
        name,
        batch,
        len(latencies),
        elapsed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        service,
        cpu,
        latencies,
    )
    if not quiet:
        print(
            f"  in-process {model:<7} {name:<40} batch {row.batch:<3} {row.images_per_s:9.0f} "
            f"inputs/s  p50 {row.p50_ms:7.3f} ms  p99 {row.p99_ms:7.3f} ms  "
            f"{cpu / (row.passes * batch) * 1e3:.3f} CPU ms/input",
            flush=True,
        )
    return row


def in_process_rows(
    bench: Bench, model: Model, threads: int
) -> Callable[[dict[str, np.ndarray]], object]:
    """The model's forward pass with no server: the runtime the Inference service loads for
    it, through its own loader and with its answer checks (repository.forward_of), at the
    service's threads; and mlflow.pyfunc as mlflow serve and MLServer run it (MNIST: also its
    module in torch eager). Answers the service's forward pass, for the interleaved checks."""
    import mlflow.models
    import mlflow.pyfunc
    import pandas as pd
    import torch

    from services.common.model_contract import contract_of
    from services.inference.repository import forward_of
    from services.inference.runtime import FLAVORS, TorchRuntime, load_runtime

    torch.set_num_threads(threads)
    what = f"model {model.name!r} version {model.version}"
    contract = contract_of(mlflow.models.Model.load(str(model.local_dir)).signature, what)
    runtime = load_runtime(model.local_dir, contract, threads=threads, flavors=FLAVORS, what=what)
    pyfunc = mlflow.pyfunc.load_model(str(model.local_dir))
    service = f"{RUNTIME_NAMES.get(runtime.kind, runtime.kind)} (the service's)"
    runtimes: list[tuple[str, Callable[[dict[str, np.ndarray]], object], bool]] = [
        (service, forward_of(runtime, contract), True)
    ]
    batches: Sequence[int] = (1, 32)
    if model.key == "mnist":
        eager = TorchRuntime(mlflow.pytorch.load_model(str(model.local_dir)), contract)
        runtimes.append(("PyTorch eager (pytorch flavor)", eager, False))
        peers = (
            "mlflow.pyfunc (pt2; mlflow serve, MLServer)",
            lambda b: pyfunc.predict(b["input-0"]),
        )
    elif model.key == "resnet":
        peers = (
            "mlflow.pyfunc (onnx; mlflow serve, MLServer)",
            lambda b: pyfunc.predict(b["input"]),
        )
        batches = RESNET_BATCHES
    else:
        peers = (
            "mlflow.pyfunc (sklearn; mlflow serve, MLServer)",
            lambda b: pyfunc.predict(pd.DataFrame(b)),
        )
    runtimes.append((*peers, False))
    seconds = bench.args.forward_seconds
    for size in batches:
        inputs = model.batch(size)
        for name, forward, is_service in runtimes:
            if is_service or size in (1, 32):  # the ResNet's batch sweep: the service's only
                row = time_forward(
                    model.key, name, partial(forward, inputs), size, seconds, is_service
                )
                bench.forward.append(row)
    return runtimes[0][1]


def most_efficient(bench: Bench, model: str) -> ForwardRow | None:
    """The service's runtime in-process at the batch size that costs the least CPU per input:
    its throughput ceiling, picked by CPU time, which other users' load on the machine
    disturbs far less than wall-clock rates."""
    rows = [f for f in bench.forward if f.model == model and f.service and f.cpu_s > 0]
    return min(rows, key=lambda f: f.cpu_s / (f.passes * f.batch), default=None)


def ceiling(bench: Bench, model: str, batch: int | None = None) -> ForwardRow | None:
    """The service's runtime in-process: at ``batch``, or at its best batch size."""
    rows = [f for f in bench.forward if f.model == model and f.service]
    if batch is not None:
        rows = [f for f in rows if f.batch == batch]
    return max(rows, key=lambda f: f.images_per_s, default=None)


# -- the service against the in-process pass, interleaved --------------------------------------


def process_cpu_s(*pids: int) -> float:
    """CPU seconds (user + system, every thread) processes ``pids`` have used together; NaN
    where unknown."""
    try:
        stats = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() for pid in pids]
        return sum(int(f[11]) + int(f[12]) for f in stats) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def inference_processes(mesh: Mesh) -> list[tuple[int, str]]:
    """(pid, /metrics URL) of each of the mesh's Inference processes: mlmesh's CPU and its
    own timings are the sum over them."""
    pids = mesh.pids()
    return [
        (pids[e.name], f"http://127.0.0.1:{e.ops_port}/metrics")
        for e in mesh.settings.inference_endpoints()
    ]


@dataclass
class Check:
    """mlmesh's ModelInfer (gRPC direct) at ``concurrency`` against the service's runtime in
    this process at ``batch``, in alternating slices, so the machine's other load falls on both
    alike."""

    model: str
    concurrency: int
    batch: int
    rounds: int
    forward_per_s: float  # inputs/s
    forward_p50_ms: float  # per pass
    forward_cpu_ms: float  # this process's CPU per input
    served_rps: float
    served_p50_ms: float
    served_cpu_ms: float  # the Inference processes' CPU per row answered (warm-ups included)
    server: str  # what the service measured of itself (server_side)
    loads: list[float]  # 1-min load averages before each slice


def interleaved_check(
    bench: Bench,
    model: Model,
    forward: Callable[[], object],
    batch: int,
    h2: H2load,
    target: GrpcTarget,
    concurrency: int,
    pids: Sequence[int],
    probe: Callable[[], dict[str, float]],
) -> Check:
    """``--rounds`` rounds of one in-process slice and one served slice (``--slice-seconds``
    each; the served one after an uncounted warm-up on the same connections), in ABBA order."""
    a = bench.args
    passes: list[ForwardRow] = []
    served: list[LoadResult] = []
    served_cpu = 0.0
    served_metrics: dict[str, float] = {}
    loads = []
    for r in range(a.rounds):
        for step in ("forward", "served") if r % 2 == 0 else ("served", "forward"):
            loads.append(load_average())
            if step == "forward":
                passes.append(
                    time_forward(model.key, "check", forward, batch, a.slice_seconds, quiet=True)
                )
                continue
            before, cpu = probe(), process_cpu_s(*pids)
            served.append(h2.run(target, concurrency, a.slice_seconds, a.warm_up))
            served_cpu += process_cpu_s(*pids) - cpu
            for key, value in metrics_delta(before, probe()).items():
                served_metrics[key] = served_metrics.get(key, 0.0) + value
    served_rows = served_metrics.get("rows", 0.0)
    forward_lat = sorted(x for f in passes for x in f.latencies)
    served_lat = sorted(x for r in served for x in r.latencies)
    images = sum(f.passes * f.batch for f in passes)
    ok = sum(r.requests - r.errors for r in served)
    check = Check(
        model=model.key,
        concurrency=concurrency,
        batch=batch,
        rounds=a.rounds,
        forward_per_s=images / sum(f.seconds for f in passes),
        forward_p50_ms=percentile(forward_lat, 50),
        forward_cpu_ms=sum(f.cpu_s for f in passes) / images * 1e3,
        served_rps=ok / sum(r.seconds for r in served),
        served_p50_ms=percentile(served_lat, 50),
        served_cpu_ms=served_cpu / served_rows * 1e3 if served_rows else math.nan,
        server=server_side(served_metrics),
        loads=loads,
    )
    bench.checks.append(check)
    print(
        f"  check {model.key:<7} c={concurrency:<3} vs batch {batch:<3}: served "
        f"{check.served_rps:8.1f} req/s p50 {check.served_p50_ms:7.2f} ms "
        f"({check.served_cpu_ms:.2f} CPU ms/request); in-process {check.forward_per_s:8.1f} "
        f"inputs/s p50 {check.forward_p50_ms:7.2f} ms ({check.forward_cpu_ms:.2f} CPU ms/input); "
        f"{check.server}",
        flush=True,
    )
    return check


# -- report -------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{memory}, {platform.system()} {platform.release()}"


def versions() -> str:
    import mlflow
    import onnxruntime
    import sklearn
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, scikit-learn {sklearn.__version__}, mlflow "
        f"{mlflow.__version__}, {envoy_version()}"
    )


def envoy_version() -> str:
    try:
        from gateway.render import tool

        out = subprocess.run([tool("envoy"), "--version"], capture_output=True, text=True)
        match = re.search(r"version: \S+/(\d[\w.]*)", out.stdout)
        return f"Envoy {match.group(1)}" if match else "Envoy"
    except Exception:
        return "Envoy"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def cpu_ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**holds**" if ok else "**MISSES**")


Target = tuple[str, str, bool | None]  # (target, what was measured, holds)


def issue4_targets(bench: Bench) -> list[Target]:
    """The targets of issue 4, on the MNIST rows."""
    out: list[Target] = []
    cmax, cmin = max(bench.args.concurrency), min(bench.args.concurrency)
    rest = partial(bench.find, "mnist", "mlmesh", PREDICT_REST)
    grpc_path = partial(bench.find, "mnist", "mlmesh", PREDICT_GRPC)
    ours = rest("uncached", cmax)
    theirs = bench.find("mnist", MLFLOW_SERVE, INVOCATIONS, "none", cmax)
    if ours and theirs:
        ratio = ours.rps / theirs.rps if theirs.rps else math.inf
        out.append(
            (
                f"uncached REST through Envoy at c={cmax} ≥ {TARGET_VS_MLFLOW:g}x "
                f"`mlflow models serve` requests/s",
                f"{ours.rps:.0f} / {theirs.rps:.0f} req/s = **{ratio:.1f}x**",
                ratio >= TARGET_VS_MLFLOW,
            )
        )
    else:
        out.append((f"uncached REST at c={cmax} vs `mlflow models serve`", "not measured", None))
    if ours:
        out.append(
            (
                f"uncached REST through Envoy at c={cmax}: p99 < {TARGET_P99_MS:g} ms",
                f"p99 **{ms(ours.p99_ms)} ms**",
                ours.p99_ms < TARGET_P99_MS,
            )
        )
    cached = rest("cached", cmin)
    out.append(
        (
            f"cached REST through Envoy at c={cmin}: p50 < {TARGET_CACHED_P50_MS:g} ms",
            f"p50 **{ms(cached.p50_ms)} ms**" if cached else "not measured",
            cached.p50_ms < TARGET_CACHED_P50_MS if cached else None,
        )
    )
    for name, find in (("uncached REST through Envoy", rest), ("uncached gRPC direct", grpc_path)):
        high, low = find("uncached", cmax), find("uncached", cmin)
        if high and low and low.rps:
            ratio = high.rps / low.rps
            out.append(
                (
                    f"{name}: requests/s at c={cmax} ≥ {TARGET_SCALING:g}x c={cmin}",
                    f"{high.rps:.0f} / {low.rps:.0f} req/s = **{ratio:.1f}x**",
                    ratio >= TARGET_SCALING,
                )
            )
        else:
            out.append((f"{name}: c={cmax} vs c={cmin}", "not measured", None))
    return out


def floor_targets(bench: Bench) -> list[Target]:
    """The targets of issue 19, on the MNIST rows: mlmesh against the floor (the same
    gateway, a servicer answering fixed responses), the in-process pass and mlflow serve."""
    cmax, cmin = max(bench.args.concurrency), min(bench.args.concurrency)
    rest = partial(bench.find, "mnist", "mlmesh", PREDICT_REST)
    floor = partial(bench.find, "mnist", FLOOR, PREDICT_REST, "none")
    out: list[Target] = []
    ours, base = rest("uncached", cmax), floor(cmax)
    name = f"uncached REST through Envoy at c={cmax} ≥ {TARGET_OF_FLOOR:.0%} of the floor's"
    if ours and base and base.rps:
        share = ours.rps / base.rps
        measured = f"{ours.rps:.0f} / {base.rps:.0f} req/s = **{share:.0%}**"
        out.append((name, measured, share >= TARGET_OF_FLOOR))
    else:
        out.append((name, "not measured", None))
    ours, base, one = rest("uncached", cmin), floor(cmin), ceiling(bench, "mnist", 1)
    name = (
        f"uncached REST p50 at c={cmin} ≤ the floor's p50 + the in-process batch-1 pass's p50 "
        f"+ {TARGET_P50_OVER_FLOOR_MS:g} ms"
    )
    if ours and base and one:
        bound = base.p50_ms + one.p50_ms + TARGET_P50_OVER_FLOOR_MS
        measured = (
            f"{ms(ours.p50_ms)} ms against {ms(base.p50_ms)} + {one.p50_ms:.2f} + "
            f"{TARGET_P50_OVER_FLOOR_MS:g} = {bound:.2f} ms: **{ours.p50_ms - bound:+.2f} ms**"
        )
        out.append((name, measured, ours.p50_ms <= bound))
    else:
        out.append((name, "not measured", None))
    theirs = bench.find("mnist", MLFLOW_SERVE, INVOCATIONS, "none", cmin)
    name = f"uncached REST p50 at c={cmin} below `mlflow models serve`'s"
    if ours and theirs:
        measured = f"{ms(ours.p50_ms)} / {ms(theirs.p50_ms)} ms"
        out.append((name, measured, ours.p50_ms < theirs.p50_ms))
    else:
        out.append((name, "not measured", None))
    cached = rest("cached", cmin)
    out.append(
        (
            f"cached REST p50 at c={cmin} < {TARGET_CACHED_P50_19_MS:g} ms",
            f"p50 **{ms(cached.p50_ms)} ms**" if cached else "not measured",
            cached.p50_ms < TARGET_CACHED_P50_19_MS if cached else None,
        )
    )
    cached = rest("cached", cmax)
    out.append(
        (
            f"cached REST p99 at c={cmax} < {TARGET_P99_MS:g} ms",
            f"p99 **{ms(cached.p99_ms)} ms**" if cached else "not measured",
            cached.p99_ms < TARGET_P99_MS if cached else None,
        )
    )
    forward = ceiling(bench, "mnist", BATCH_IMAGES)
    for path in (PREDICT_BATCH_GRPC, OIP_BATCH_GRPC):
        ours = bench.find("mnist", "mlmesh", path, "uncached", BATCH_CONCURRENCY)
        name = (
            f"{path}, uncached, c={BATCH_CONCURRENCY}: images/s ≥ "
            f"{TARGET_BATCH_OF_FORWARD:.0%} of the in-process pass at batch {BATCH_IMAGES}"
        )
        if ours and forward:
            images = ours.rps * BATCH_IMAGES
            share = images / forward.images_per_s
            measured = f"{images:.0f} / {forward.images_per_s:.0f} images/s = **{share:.0%}**"
            out.append((name, measured, share >= TARGET_BATCH_OF_FORWARD))
        else:
            out.append((name, "not measured", None))
    return out


def find_check(bench: Bench, model: str, concurrency: int) -> Check | None:
    return next(
        (c for c in bench.checks if c.model == model and c.concurrency == concurrency), None
    )


def any_model_targets(bench: Bench) -> list[Target]:
    """The targets of "Serve any model": mlmesh against the peers over the same protocol
    (separately timed rows), against the in-process ceiling and its latency at concurrency 1
    (the interleaved checks: gRPC direct ModelInfer)."""
    out: list[Target] = []
    cmax, cmin = max(bench.args.concurrency), min(bench.args.concurrency)
    for key, model in bench.models.items():
        title = model.title
        if key == "resnet":
            check = find_check(bench, key, cmax)
            label = (
                f"{title}: mlmesh ModelInfer (gRPC direct) at c={cmax} ≥ "
                f"{TARGET_OF_CEILING:.0%} of the in-process pass at its best batch (interleaved)"
            )
            if check:
                share = check.served_rps / check.forward_per_s
                measured = (
                    f"{check.served_rps:.1f} / {check.forward_per_s:.1f} images/s (batch "
                    f"{check.batch}) = **{share:.0%}**"
                )
                out.append((label, measured, share >= TARGET_OF_CEILING))
            else:
                out.append((label, "not measured", None))
        # Like for like: the same protocol and body on both sides.
        pairs = (
            (OIP_REST, MLSERVER, MLSERVER_REST),
            (OIP_GRPC, MLSERVER, MLSERVER_GRPC),
            (OIP_REST, MLFLOW_SERVE, INVOCATIONS),
        )
        if key == "resnet":
            pairs += ((OIP_REST_BINARY, MLSERVER, MLSERVER_REST),)
        wanted = 1.0 if key == "resnet" else TARGET_VS_PEERS
        word = "above" if key == "resnet" else f"≥ {TARGET_VS_PEERS:g}x"
        for path, peer, peer_path in pairs:
            ours = bench.find(key, "mlmesh", path, "uncached", cmax)
            theirs = bench.find(key, peer, peer_path, "none", cmax)
            label = f"{title}: mlmesh {path} at c={cmax} {word} {peer} {peer_path}"
            if ours and theirs and not theirs.rps:
                measured = f"{ours.rps:.1f} req/s; the peer answered nothing within the row"
                out.append((label, measured, ours.rps > 0))
            elif ours and theirs:
                ratio = ours.rps / theirs.rps
                holds = ratio > wanted if key == "resnet" else ratio >= wanted
                measured = f"{ours.rps:.1f} / {theirs.rps:.1f} req/s = **{ratio:.2f}x**"
                out.append((label, measured, holds))
            else:
                out.append((label, "not measured", None))
        check = find_check(bench, key, cmin)
        label = (
            f"{title}: mlmesh ModelInfer (gRPC direct) p50 at c={cmin} within "
            f"{TARGET_P50_OVER_FORWARD_MS:g} ms of the in-process batch-1 p50 (interleaved)"
        )
        if check:
            over = check.served_p50_ms - check.forward_p50_ms
            measured = (
                f"{check.served_p50_ms:.2f} - {check.forward_p50_ms:.2f} ms = **{over:+.2f} ms**"
            )
            out.append((label, measured, over <= TARGET_P50_OVER_FORWARD_MS))
        else:
            out.append((label, "not measured", None))
    return out


def checks_section(bench: Bench) -> list[str]:
    if not bench.checks:
        return []
    a = bench.args
    lines = [
        "",
        "## mlmesh against the in-process pass, interleaved (the targets' measurements)",
        "",
        f"{a.rounds} rounds, each one slice of the service's runtime in this process and one "
        f"of mlmesh's ModelInfer over gRPC (h2load through Envoy, "
        f"`cache-control: no-cache`, one fixed input; {a.warm_up:g} s uncounted warm-up on "
        f"the same connections), {a.slice_seconds:g} s each, in ABBA order, so that load from "
        "the machine's other users falls on both alike. *CPU per input*: this process's CPU "
        "time per input in-process, the Inference processes' (summed) per row answered when served "
        "(every thread, warm-ups included); their difference is what serving costs beyond "
        "the model. *in the service* comes from the service's own metrics: time from the "
        "request's arrival in its handler to its answer, and the forward passes (of the "
        "batcher) with their rows; the rest of the served p50 is the transport (gRPC in "
        "Python, loopback, the load generator).",
        "",
        "| model | mlmesh c | in-process batch | in-process inputs/s | in-process p50 ms "
        "(per pass) | in-process CPU ms/input | mlmesh req/s | mlmesh p50 ms | mlmesh CPU "
        "ms/request | served / in-process | p50 gap ms | in the service | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in bench.checks:
        loads = f"{min(c.loads):.1f}-{max(c.loads):.1f}"
        lines.append(
            f"| {bench.models[c.model].title} | {c.concurrency} | {c.batch} "
            f"| {c.forward_per_s:.1f} | {c.forward_p50_ms:.2f} | {c.forward_cpu_ms:.2f} "
            f"| {c.served_rps:.1f} | {c.served_p50_ms:.2f} | {c.served_cpu_ms:.2f} "
            f"| {c.served_rps / c.forward_per_s:.0%} | {c.served_p50_ms - c.forward_p50_ms:+.2f} "
            f"| {c.server} | {loads} |"
        )
    return lines


ROWS_EXPLAINED = (
    "Uncached REST requests each carry a new input (four input values count up), so each is a "
    "true cache miss; uncached gRPC requests all carry one input with `cache-control: "
    "no-cache` (h2load cannot vary a body), which makes the service compute it without "
    "reading the cache (it still stores the answer); the peers have no cache (*none*) and get "
    "a new input per REST request too. Cached rows repeat one input whose answer the warm-up "
    "stored. *cached answers* counts responses that said `cached: true` (mlmesh's `/predict`; "
    "wrk reads every REST answer); *load-gen CPU* is the load generator's CPU time over wall "
    "time (100% = one core); *machine busy* is the share of all {cpus} CPUs' time that was "
    "busy during the row, every process counted (near 100%: the machine, not the server "
    "design, is the limit); *load avg* the machine's 1-minute load average when the row "
    "began (other users' work included). mlmesh's notes give what the service measured of "
    "itself during the row (its metrics): the mean time a request spent in it, and its "
    "forward passes with their mean rows (the dynamic batcher). *of the floor*: the row's "
    "requests/s as a share of the floor's on the same path and concurrency, and its p50 "
    "beyond the floor's; *server CPU ms/request*: the CPU time the server's processes (every "
    "Inference process, or the floor's) used during the measured run, per request (Envoy's "
    "and Redis's not included; n/a for the peers)."
)


def of_floor(bench: Bench, row: Row) -> str:
    """A row's requests/s as a share of the floor's on its path and concurrency, and its p50
    beyond the floor's; empty where the floor has no such row."""
    base = bench.find(row.model, FLOOR, row.path, "none", row.concurrency)
    if row.result is None or base is None or not base.rps:
        return ""
    return f"{row.result.rps / base.rps:.0%}, {row.result.p50_ms - base.p50_ms:+.2f} ms"


def model_table(bench: Bench, model: Model) -> list[str]:
    lines = [
        "| server | path | load generator | cache | concurrency | requests/s | p50 ms | p99 ms "
        "| of the floor (req/s, p50) | server CPU ms/request | errors | cached answers "
        "| load-gen CPU | machine busy | load avg | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in bench.rows if r.model == model.key):
        r = row.result
        if r is None:
            lines.append(
                f"| {row.system} | {row.path} | {row.tool} | {row.cache} | {row.concurrency} "
                f"| - | - | - | - | - | - | - | - | - | {row.load:.1f} | {row.note} |"
            )
            continue
        hits = "n/a" if r.cached is None else f"{r.cached}/{r.requests}"
        notes = "; ".join(x for x in (row.note, r.detail) if x)
        rps = f"{r.rps:.0f}" if r.rps >= 100 else f"{r.rps:.1f}"
        lines.append(
            f"| {row.system} | {row.path} | {row.tool} | {row.cache} | {row.concurrency} "
            f"| {rps} | {ms(r.p50_ms)} | {ms(r.p99_ms)} | {of_floor(bench, row)} "
            f"| {cpu_ms(r.server_cpu_ms)} | {r.errors} | {hits} "
            f"| {r.loadgen_cpu:.0%} | {r.machine_busy:.0%} | {row.load:.1f} | {notes} |"
        )
    return lines


def oip_section(bench: Bench) -> list[str]:
    """MNIST: the Open Inference Protocol's ModelInfer (raw) beside Predict, and MLServer's."""
    rows = []
    for cache in ("uncached", "cached"):
        for c in bench.args.concurrency:
            predict = bench.find("mnist", "mlmesh", PREDICT_GRPC, cache, c)
            infer = bench.find("mnist", "mlmesh", OIP_GRPC, cache, c)
            theirs = bench.find("mnist", MLSERVER, MLSERVER_GRPC, "none", c)
            if predict and infer:
                mlserver = f"{theirs.rps:.0f}" if theirs and cache == "uncached" else ""
                rows.append(
                    f"| {cache} | {c} | {predict.rps:.0f} | {infer.rps:.0f} "
                    f"| {infer.rps / predict.rps:.2f} | {ms(infer.p99_ms)} | {mlserver} |"
                )
    if not rows:
        return []
    return [
        "",
        "### The Open Inference Protocol beside Predict (MNIST, gRPC direct, h2load)",
        "",
        "One image per request; ModelInfer carries it as raw little-endian FP32 "
        "(`raw_input_contents`, as tritonclient sends it), Predict as 784 floats. MLServer's "
        "column is its gRPC ModelInfer with the same request (it has no cache).",
        "",
        "| cache | concurrency | Predict req/s | ModelInfer req/s | ratio | ModelInfer p99 ms "
        "| MLServer ModelInfer req/s |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def forward_section(bench: Bench) -> list[str]:
    a = bench.args
    lines = [
        "",
        "## The forward pass in-process (no server: the ceiling)",
        "",
        f"Back-to-back calls for {a.forward_seconds:g} s each (at least 5) on this process's "
        f"thread, {a.inference_threads} intra-op thread(s), as the Inference service's "
        "`MLMESH_INFERENCE_THREADS` in this run. *the service's* is the runtime the Inference "
        "service loads for the version, through its own loader and answer checks "
        "(`repository.forward_of`); mlflow.pyfunc is what mlflow serve and MLServer call. One "
        "input = one image or one row.",
        "",
        "| model | runtime | batch | inputs/s | passes/s | p50 ms per pass | p99 ms per pass "
        "| CPU ms per input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in bench.forward:
        per_s = f"{f.images_per_s:.0f}" if f.images_per_s >= 100 else f"{f.images_per_s:.1f}"
        lines.append(
            f"| {bench.models[f.model].title} | {f.runtime} | {f.batch} | {per_s} "
            f"| {f.passes / f.seconds:.1f} | {f.p50_ms:.3f} | {f.p99_ms:.3f} "
            f"| {f.cpu_s / (f.passes * f.batch) * 1e3:.3f} |"
        )
    cmax = max(a.concurrency)
    comparisons = []
    for key, model in bench.models.items():
        best = ceiling(bench, key)
        if best is None:
            continue
        for path in (PREDICT_GRPC, OIP_GRPC, PREDICT_REST, OIP_REST, OIP_REST_BINARY):
            r = bench.find(key, "mlmesh", path, "uncached", cmax)
            if r:
                comparisons.append(
                    f"{model.title}, mlmesh {path} uncached at c={cmax}: {r.rps:.1f} req/s, "
                    f"{r.rps / best.images_per_s:.0%} of the service's runtime at its best "
                    f"batch ({best.batch}: {best.images_per_s:.1f} inputs/s).  "
                )
    if comparisons:
        lines += ["", *comparisons]
    return lines


def report(bench: Bench, command: str, started: float, tools: str) -> str:
    a = bench.args
    loads = sorted(bench.loads) or [math.nan]
    lines = [
        "# Prediction serving benchmark",
        "",
        "Written by `bench/predict.py` (`make bench`); each run replaces this file. "
        "See `bench/README.md` and the script's docstring for the method.",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, "
        f"{(time.monotonic() - a.t0) / 60:.1f} minutes  ",
        f"Machine: {machine()}; {versions()}  ",
        f"Load on the machine (it is shared): `uptime` when the run began: `{a.uptime_start}`; "
        f"when it ended: `{uptime()}`; the 1-minute load average before each load row: min "
        f"{loads[0]:.2f}, median {loads[len(loads) // 2]:.2f}, max {loads[-1]:.2f}  ",
        f"Load generators: {tools}  ",
        f"Load: closed loop, concurrency = connections with one request in flight each, "
        f"{a.warm_up:g} s warm-up run then {a.duration:g} s measured, per row; everything on "
        "one machine over loopback (servers, Envoy, Redis, PostgreSQL and the load generator "
        "share its CPUs)  ",
        f"Threads: every forward pass runs {a.inference_threads} intra-op thread(s): mlmesh's "
        f"(`MLMESH_INFERENCE_THREADS={a.inference_threads}`, one forward-pass thread), the "
        "in-process ceiling's, the ResNet's ONNX session options (which mlflow serve and "
        "MLServer read), and `OMP_NUM_THREADS`/`MKL_NUM_THREADS` of the peers (torch, numpy). "
        "Each server at its defaults: mlflow serve one worker (`-w 1`), MLServer "
        "`parallel_workers: 1` (no adaptive batching), mlmesh one Inference process per core "
        f"({bench.processes} here, behind Envoy; its dynamic batching on: up to 32 per pass); "
        f"the floor as many processes as mlmesh",
        "",
        "Models:",
        "",
        *[f"- **{m.title}**: {m.about}." for m in bench.models.values()],
    ]
    if "mnist" in bench.models:
        lines += [
            "",
            "## Targets (issue 19: near the transport floor; MNIST)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in floor_targets(bench)]
        lines += [
            "",
            "## Targets (issue 4: MNIST, mlmesh's own routes)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in issue4_targets(bench)]
    lines += [
        "",
        "## Targets (Serve any model: the Open Inference Protocol)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in any_model_targets(bench)]
    lines += [
        "",
        "## Single predictions under load, per model",
        "",
        ROWS_EXPLAINED.format(cpus=os.cpu_count()),
    ]
    for model in bench.models.values():
        lines += ["", f"### {model.title}", "", *model_table(bench, model)]
        if model.key == "mnist":
            lines += oip_section(bench)
    lines += checks_section(bench)
    lines += rollout_section(bench)
    lines += forward_section(bench)
    if bench.notes:
        lines += ["", "## Notes", ""] + [f"- {' '.join(n.split())}" for n in bench.notes]
    return "\n".join(lines) + "\n"


def print_targets(bench: Bench) -> None:
    print("\nTargets (reported, not enforced):", flush=True)
    found = floor_targets(bench) + issue4_targets(bench) if "mnist" in bench.models else []
    for t, m, ok in found + any_model_targets(bench):
        mark = {None: "n/a   ", True: "HOLDS ", False: "MISSES"}[ok]
        print(f"  [{mark}] {t}: {m.replace('**', '')}", flush=True)


# -- rollouts: what a canary and a shadow cost on the answering path ----------------------------

ROLLOUT_MODES = ("none", "canary 20%", "shadow")
ROLLOUT_CONCURRENCY = 32
TARGET_CANARY_LOSS = 0.10  # a canary costs at most 10% of the requests/s without one


@dataclass
class RolloutSlice:
    mode: str
    result: LoadResult


def rollout_rows(bench: Bench, settings: Settings, model: Model, h2: H2load) -> None:
    """MNIST's Predict through the gateway at concurrency 32, uncached (``cache-control:
    no-cache``: every request is computed), with no rollout, a 20% canary and a shadow of a
    second version of the same model (so both versions cost the same), interleaved over
    ``--rounds`` rounds. The guards are set so that the rollouts never end on their own."""
    from mlflow import MlflowClient

    from mlmesh.inference.v1 import inference_pb2
    from mlmesh.registry.v1 import registry_pb2 as rpb
    from mlmesh.registry.v1 import registry_pb2_grpc

    why = wait_for_model(settings, model, timeout_s=120.0)
    if why:
        bench.skip("rollout rows", why)
        return
    client = MlflowClient(settings.mlflow_tracking_uri)
    production = client.get_model_version_by_alias(model.name, "production")
    # MLflow 3 registers a logged model ("models:/m-..."): the new version names it too.
    logged = production.source.removeprefix("models:/") if production.source.startswith(
        "models:/m-"
    ) else None  # fmt: skip
    candidate = client.create_model_version(
        model.name, production.source, run_id=production.run_id, model_id=logged
    )
    host, port = settings.gateway_host, settings.gateway_port
    key = api_key(settings)
    auth = [(API_KEY_HEADER, key)]
    message = inference_pb2.PredictRequest(image=model.inputs(0)[0].array.ravel().tolist())
    target = GrpcTarget(
        "rollout", host, port, PREDICT_PATH, message.SerializeToString(), 0,
        {API_KEY_HEADER: key, "cache-control": "no-cache"},
    )  # fmt: skip
    never = rpb.RolloutGuards(min_requests=10**15, max_error_rate=1.0)
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)

        def start(mode: str) -> str:
            if mode == "none":
                return ""
            fields: dict[str, object] = (
                {"mode": rpb.ROLLOUT_MODE_CANARY, "weight": 20, "guards": never}
                if mode.startswith("canary")
                else {"mode": rpb.ROLLOUT_MODE_SHADOW, "guards": never}
            )
            request = rpb.StartRolloutRequest(
                model_name=model.name, candidate_version=int(candidate.version), **fields
            )
            return registry.StartRollout(request, metadata=auth, timeout=120).rollout.rollout_id

        slices: list[RolloutSlice] = []
        for _ in range(bench.args.rounds):
            for mode in ROLLOUT_MODES:
                rollout_id = start(mode)
                time.sleep(1.0)  # every replica follows at once (a model event); be sure
                answer = grpc_call(host, port, PREDICT_PATH, target.message, target.headers)
                target.response_bytes = 5 + len(answer)
                try:
                    result = h2.run(
                        target, ROLLOUT_CONCURRENCY, bench.args.duration, bench.args.warm_up
                    )
                finally:
                    if rollout_id:
                        registry.AbortRollout(
                            rpb.AbortRolloutRequest(rollout_id=rollout_id, reason="bench"),
                            metadata=auth,
                        )
                slices.append(RolloutSlice(mode, result))
                print(f"  rollout {mode:<11} c={ROLLOUT_CONCURRENCY} {result.rps:8.1f} req/s  "
                      f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors "
                      f"{result.errors}", flush=True)  # fmt: skip
    bench.rollouts = slices


def rollout_section(bench: Bench) -> list[str]:
    if not bench.rollouts:
        return []
    lines = [
        "",
        "## Rollouts: what a canary and a shadow cost on the answering path",
        "",
        f"MNIST `Predict` over gRPC through Envoy (h2load), concurrency {ROLLOUT_CONCURRENCY}, "
        "`cache-control: no-cache` (every request computed); the candidate is a second "
        "version of the same model (the same cost), the guards never decide. The modes are "
        f"interleaved, {bench.args.rounds} rounds of {bench.args.duration:g} s each; req/s is "
        "the mean over rounds, p50/p99 over every measured request.",
        "",
        "| mode | req/s (each round) | req/s | vs none | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    means = {}
    for mode in ROLLOUT_MODES:
        mine = [s.result for s in bench.rollouts if s.mode == mode]
        means[mode] = sum(r.rps for r in mine) / len(mine)
        latencies = sorted(x for r in mine for x in r.latencies)
        ratio = means[mode] / means["none"] if means.get("none") else math.nan
        lines.append(
            f"| {mode} | {', '.join(f'{r.rps:.0f}' for r in mine)} | {means[mode]:.0f} | "
            f"{ratio:.1%} | {percentile(latencies, 50):.2f} | {percentile(latencies, 99):.2f} "
            f"| {sum(r.errors for r in mine)} |"
        )
    loss = 1 - means["canary 20%"] / means["none"]
    lines += [
        "",
        f"Target: a canary costs at most {TARGET_CANARY_LOSS:.0%} of the requests/s: measured "
        f"{loss:.1%} fewer, {verdict(loss <= TARGET_CANARY_LOSS)}. A shadow computes every "
        "request twice (production and the candidate share the forward-pass thread), so it "
        "costs more; its queue drops what it cannot keep up with (`shadow_dropped_total`).",
    ]
    return lines


# -- main ---------------------------------------------------------------------------------------


# -- scaling: requests/s by the number of Inference processes ----------------------------------


@dataclass
class ScalingStep:
    processes: int
    mlmesh: LoadResult | None
    floor: LoadResult | None
    load: float


def rest_rate(
    wrk: Wrk, gateway: Settings, model: Model, bench: Bench, concurrency: int
) -> LoadResult:
    """Uncached REST /predict through ``gateway`` at ``concurrency``: a warm-up, then the
    measured run, each with new inputs."""
    body = predict_body(model.tensors[0].array)
    auth = {API_KEY_HEADER: api_key(gateway)}
    target = HttpTarget("scaling", f"{gateway.gateway_url}/predict", body, auth)
    warm = wrk.run(target, concurrency, bench.args.warm_up, "vary", bench.next_range())
    time.sleep(0.0 if math.isnan(warm.p99_ms) else min(10.0, warm.p99_ms / 1e3))
    return wrk.run(target, concurrency, bench.args.duration, "vary", bench.next_range())


def scaling_run(bench: Bench, settings: Settings, wrk: Wrk, work_dir: Path) -> list[ScalingStep]:
    """The mesh with 1, 2, ... --scaling Inference processes, one after another on the same
    databases (MNIST registered once): uncached REST /predict at the highest concurrency
    through Envoy, and the floor with as many processes, each step."""
    steps = []
    model = None
    c = max(bench.args.concurrency)
    for n in range(1, bench.args.scaling + 1):
        print(f"\n== {n} Inference process(es) ==", flush=True)
        with Mesh(settings.model_copy(update={"inference_processes": n})) as mesh:
            ready = mesh.settings
            if model is None:
                model = register_mnist(ready, bench.args.train_images, work_dir)
            why = wait_for_model(ready, model, timeout_s=120.0)
            if why:
                bench.skip(f"scaling with {n} process(es)", why)
                continue
            load = load_average()
            ours = rest_rate(wrk, ready, model, bench, c)
            with floor_gateway(ready, ready.state_dir / "logs") as (floor, _):
                theirs = rest_rate(wrk, floor, model, bench, c)
        steps.append(ScalingStep(n, ours, theirs, load))
        print(f"  {n}: mlmesh {ours.rps:.0f} req/s, floor {theirs.rps:.0f} req/s", flush=True)
    return steps


def scaling_report(bench: Bench, steps: list[ScalingStep], command: str, started: float) -> str:
    a = bench.args
    c = max(a.concurrency)
    lines = [
        "# Prediction serving: scaling by Inference processes",
        "",
        "Written by `bench/predict.py --scaling N`; each run replaces this file. For each N "
        "from 1, a mesh with `MLMESH_INFERENCE_PROCESSES=N` (Envoy balancing over them) and "
        "the floor (`bench/floor.py`, N processes behind an Envoy rendered from the same "
        f"configuration); MNIST, uncached REST `/predict` through Envoy at c={c}, wrk, "
        f"{a.warm_up:g} s warm-up then {a.duration:g} s measured.",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, "
        f"{(time.monotonic() - a.t0) / 60:.1f} minutes  ",
        f"Machine: {machine()}; {versions()}  ",
        f"Load: `uptime` when the run began: `{a.uptime_start}`; when it ended: `{uptime()}`",
        "",
        "| Inference processes | mlmesh req/s | p50 ms | p99 ms | floor req/s | floor p50 ms "
        "| of the floor | vs 1 process | machine busy | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = steps[0].mlmesh.rps if steps and steps[0].mlmesh else math.nan
    for step in steps:
        ours, theirs = step.mlmesh, step.floor
        if ours is None or theirs is None:
            continue
        share = ours.rps / theirs.rps if theirs.rps else math.nan
        lines.append(
            f"| {step.processes} | {ours.rps:.0f} | {ms(ours.p50_ms)} | {ms(ours.p99_ms)} "
            f"| {theirs.rps:.0f} | {ms(theirs.p50_ms)} | {share:.0%} | {ours.rps / first:.2f}x "
            f"| {ours.machine_busy:.0%} | {step.load:.1f} |"
        )
    if bench.notes:
        lines += ["", "## Notes", ""] + [f"- {' '.join(n.split())}" for n in bench.notes]
    return "\n".join(lines) + "\n"


def check_tools() -> str | None:
    missing = [t for t in ("wrk", "h2load") if shutil.which(t) is None]
    if missing:
        return (
            f"missing load generator(s): {', '.join(missing)}; install them with "
            "scripts/install-system-packages.sh (Debian packages wrk and nghttp2-client)"
        )
    return None


def comma_set(text: str) -> list[str]:
    return list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def add_load_arguments(
    parser: argparse.ArgumentParser, concurrency: Sequence[int], concurrency_help: str
) -> None:
    """The options every bench script loads its rows with: --duration, --warm-up (seconds
    per row) and --concurrency (comma-separated, run in increasing order)."""
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warm-up", type=float, default=2.0, help="warm-up seconds per row")
    parser.add_argument(
        "--concurrency",
        type=lambda s: sorted({int(x) for x in s.split(",")}),
        default=list(concurrency),
        help=concurrency_help,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(
        parser,
        CONCURRENCY,
        "comma-separated concurrencies (default 1,8,32; MNIST runs at each, the other models "
        "at the lowest and highest)",
    )
    parser.add_argument(
        "--models",
        type=comma_set,
        default=list(MODELS),
        help=f"comma-separated models to register and load: {', '.join(MODELS)} (default all)",
    )
    parser.add_argument(
        "--inference-threads",
        type=int,
        default=1,
        help="intra-op threads of every forward pass: MLMESH_INFERENCE_THREADS of the mesh, "
        "the in-process ceiling, the ResNet's ONNX session options and the peers' "
        "OMP_NUM_THREADS (default 1, the service's default)",
    )
    parser.add_argument("--forward-seconds", type=float, default=3.0, help="per in-process row")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of each interleaved check (default 3)"
    )
    parser.add_argument(
        "--slice-seconds",
        type=float,
        default=4.0,
        help="measured seconds of each slice of an interleaved check (default 4)",
    )
    parser.add_argument(
        "--train-images", type=int, default=10_000, help="training images for the 1-epoch model"
    )
    parser.add_argument("--loadgen-threads", type=int, default=1, help="wrk/h2load threads")
    parser.add_argument(
        "--skip",
        type=lambda s: set(comma_set(s)),
        default=set(),
        help=f"comma-separated parts to leave out: {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--only",
        type=lambda s: set(comma_set(s)),
        default=set(),
        help=f"comma-separated parts to run, the others skipped: {', '.join(PARTS)} (e.g. "
        "--only rollout, with --models mnist)",
    )
    parser.add_argument(
        "--scaling",
        type=int,
        default=0,
        metavar="N",
        help="instead of the whole run: MNIST's uncached REST at the highest concurrency with "
        "1, 2, ... N Inference processes, and the floor with as many (report: "
        "results/predict-scaling.md)",
    )
    parser.add_argument("--reinstall-mlserver", action="store_true")
    parser.add_argument(
        "--rate-limits",
        default="predictions=1000000/s:1000000",
        help="MLMESH_RATE_LIMITS of the mesh (default: checked, never reached; "
        "predictions=off skips the check)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the report (default bench/results/predict.md; with --only, "
        "predict-PARTS.md beside it, so a partial run leaves the full report alone)",
    )
    args = parser.parse_args(argv)
    if args.out is None and args.scaling:
        args.out = ROOT / "bench" / "results" / "predict-scaling.md"
    if args.out is None:
        stem = "predict-" + "-".join(sorted(args.only)) if args.only else "predict"
        args.out = ROOT / "bench" / "results" / f"{stem}.md"
    if not 1 <= args.loadgen_threads <= MAX_LOADGEN_THREADS:
        parser.error(f"--loadgen-threads must be 1 to {MAX_LOADGEN_THREADS}")
    if args.only - set(PARTS):
        parser.error(f"--only takes {', '.join(PARTS)}; got {', '.join(sorted(args.only))}")
    if args.only:
        args.skip |= set(PARTS) - args.only
    if args.skip - set(PARTS):
        parser.error(f"--skip takes {', '.join(PARTS)}; got {', '.join(sorted(args.skip))}")
    if not args.models or set(args.models) - set(MODELS):
        parser.error(f"--models takes {', '.join(MODELS)}; got {', '.join(args.models)}")
    if args.inference_threads < 1:
        parser.error("--inference-threads must be 1 or more")
    args.models = [m for m in MODELS if m in args.models]  # MNIST first: its mesh warms it
    args.t0 = time.monotonic()
    args.uptime_start = uptime()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    problem = check_tools()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    started_wall = time.time()
    state_dir = BENCH_DIR / "predict"
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    work_dir = state_dir / "work"
    work_dir.mkdir()
    settings = bench_settings(state_dir, args.rate_limits, args.inference_threads)
    bench = Bench(args)
    # Different inputs from run to run, and room for this run's ranges below COUNTER_SPACE.
    bench.counter = random.randrange(0, COUNTER_SPACE // ROW_RANGE - 200) * ROW_RANGE
    wrk, h2 = Wrk(work_dir, args.loadgen_threads), H2load(work_dir, args.loadgen_threads)
    tools = (
        f"wrk {Wrk.version()} (HTTP/1.1 keep-alive, Lua script; every HTTP row) and h2load "
        f"(nghttp2 {H2load.version()}; h2c, unary gRPC, one stream per connection; the gRPC "
        f"rows), {args.loadgen_threads} thread(s) each, one process at a time"
    )
    print(f"state, logs and load scripts: {state_dir}", flush=True)
    command = "python -m bench.predict " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.scaling:
        try:
            steps = scaling_run(bench, settings, wrk, work_dir)
        except LaunchError as exc:
            print(f"error: the mesh did not start: {exc}", file=sys.stderr)
            return 1
        finally:
            drop_databases(settings)
        args.out.write_text(scaling_report(bench, steps, command.strip(), started_wall))
        print(f"\nwrote {args.out}", flush=True)
        return 0
    try:
        with Mesh(settings) as mesh:
            settings = mesh.settings
            bench.processes = settings.inference_process_count
            registrations = {
                "mnist": lambda: register_mnist(settings, args.train_images, work_dir),
                "resnet": lambda: register_resnet(settings, args.inference_threads, work_dir),
                "sklearn": lambda: register_sklearn(settings, work_dir),
            }
            for key in args.models:
                try:
                    bench.models[key] = registrations[key]()
                except Exception as exc:  # the other models still run
                    log.exception("registering %s failed", key)
                    bench.skip(f"{key}: every row", f"registering it failed: {exc}")
            # Per model, the in-process pass and then mlmesh's rows, close in time: the
            # machine's other load changes by the minute. Then the peers.
            for part in ("forward", "floor", "mlmesh", "rollout"):
                if part in args.skip:
                    bench.skip(PARTS[part], f"--skip {part}")
            for model in bench.models.values():
                forward = None
                if "forward" not in args.skip:
                    print(f"\n== {model.title}: {PARTS['forward']} ==", flush=True)
                    forward = in_process_rows(bench, model, args.inference_threads)
                if model.key == "mnist" and "floor" not in args.skip:
                    print(f"\n== {PARTS['floor']} ==", flush=True)
                    floor_rows(bench, settings, model, wrk, h2)
                if "mlmesh" not in args.skip:
                    print(f"\n== {model.title}: {PARTS['mlmesh']} ==", flush=True)
                    processes = inference_processes(mesh)
                    mlmesh_rows(bench, settings, model, wrk, h2, forward, processes)
                if model.key == "mnist" and "rollout" not in args.skip:
                    print(f"\n== {model.title}: {PARTS['rollout']} ==", flush=True)
                    rollout_rows(bench, settings, model, h2)
            peers = {
                "mlflow": lambda: mlflow_serve_rows(bench, settings, wrk, mesh.log_dir),
                "mlserver": lambda: mlserver_rows(bench, wrk, h2, work_dir, mesh.log_dir),
            }
            for part, run in peers.items():
                print(f"\n== {PARTS[part]} ==", flush=True)
                if part in args.skip:
                    bench.skip(PARTS[part], f"--skip {part}")
                else:
                    run()
    except LaunchError as exc:
        print(f"error: the mesh did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        drop_databases(settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(bench, command.strip(), started_wall, tools))
    print_targets(bench)
    print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
