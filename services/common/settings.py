"""One typed settings object for every mlmesh process.

Every field is read from the environment with the ``MLMESH_`` prefix (``MLMESH_REDIS_URL``,
...) or from a ``.env`` file in the working directory. Build it once in a process's ``main``
and pass it down; nothing else reads the environment.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The PostgreSQL server the launcher uses (or starts) when no database URL is configured.
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432"

# The name every service certificate of the mesh is issued to, and that its clients (the
# gateway, the Registry) check: who a service is, not where it runs, so one certificate
# serves on any address (127.0.0.1, a compose host name, a pod's IP).
MESH_SERVICE_NAME = "mlmesh-service"
# The name of the gateway's client certificate.
MESH_GATEWAY_NAME = "mlmesh-gateway"


@dataclass(frozen=True)
class MeshTlsFiles:
    """The mesh's certificates (PEM), by their fixed names in MLMESH_MTLS_DIR: the CA every
    service and the gateway trust, the services' certificate (server, and client when one
    service calls another) and the gateway's client certificate. The CA's key is not read
    by any service: only the launcher uses it, to issue the others."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def service_cert(self) -> Path:
        return self.directory / "service.crt"

    @property
    def service_key(self) -> Path:
        return self.directory / "service.key"

    @property
    def gateway_cert(self) -> Path:
        return self.directory / "gateway.crt"

    @property
    def gateway_key(self) -> Path:
        return self.directory / "gateway.key"

    def missing(self, *paths: Path) -> list[Path]:
        """Those of ``paths`` (default: all but the CA's key) that are not files."""
        wanted = paths or (
            self.ca_cert, self.service_cert, self.service_key, self.gateway_cert,
            self.gateway_key,
        )  # fmt: skip
        return [p for p in wanted if not p.is_file()]


# Inference process i listens on each of the Inference ports plus i times this step: ports
# plus i would collide at once (the ops port 9104 + 1 is the OIP HTTP port 9105), and gRPC
# 50053 + 10 is the health port 50063. A step of 100 keeps 16 processes' ports clear of each
# other and of the other services' defaults.
INFERENCE_PORT_STEP = 100


@dataclass(frozen=True)
class InferenceEndpoint:
    """Where one of the launcher's Inference processes listens (Settings.inference_endpoints)."""

    index: int  # 0, 1, ...: process 0 listens on the configured ports themselves
    address: str  # host:port of its gRPC server (mutual TLS)
    health_port: int  # its plain-text grpc.health.v1 port, same host
    ops_port: int  # its /ready, /health, /metrics
    http_port: int  # its Open Inference Protocol REST face (/v2), same host

    @property
    def name(self) -> str:
        """The launcher's name for the process (its log file, Mesh.pids()): ``inference``,
        then ``inference-1``, ``inference-2``, ..."""
        return "inference" if self.index == 0 else f"inference-{self.index}"

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def health_address(self) -> str:
        return f"{self.host}:{self.health_port}"

    def ports(self) -> dict[str, int]:
        """Every port the process binds, by what it serves."""
        return {
            "gRPC": split_address(self.address)[1],
            "health": self.health_port,
            "ops": self.ops_port,
            "OIP HTTP": self.http_port,
        }

    def settings_update(self) -> dict[str, object]:
        """The settings that differ for this process: its own ports."""
        return {
            "inference_address": self.address,
            "inference_health_port": self.health_port,
            "inference_ops_port": self.ops_port,
            "inference_http_port": self.http_port,
        }


class Settings(BaseSettings):
    """Settings shared by the launcher, the gateway renderer and the services."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_", env_file=".env", extra="ignore")

    # -- backing stores -------------------------------------------------------------------
    database_url: str = Field(
        "",
        description="PostgreSQL database for mlmesh's own tables (jobs, audit log). Empty: "
        f"`{LOCAL_POSTGRES}/mlmesh_<tag>`, where <tag> is derived from the state directory's "
        "absolute path, so that each state directory (each checkout) has databases of its own.",
    )
    mlflow_backend_store_uri: str = Field(
        "",
        description="MLflow server's backend store (the launcher passes it to `mlflow server`). "
        f"Empty: `{LOCAL_POSTGRES}/mlflow_<tag>`, beside the artifacts in the state directory.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for the job queue, prediction cache, events and rate limits.",
    )
    mlflow_tracking_uri: str = Field(
        "http://127.0.0.1:5001",
        description="MLflow tracking server as the services and workers reach it (the trusted "
        "side); the launcher starts it on this host and port. Users reach MLflow through the "
        "gateway instead (MLMESH_GATEWAY_MLFLOW_PORT).",
    )
    mlflow_request_timeout_s: float = Field(
        10.0, description="Timeout of one MLflow REST call made by a service."
    )
    mlflow_request_max_retries: int = Field(
        1, description="Retries of a failed MLflow REST call made by a service."
    )

    # -- services ---------------------------------------------------------------------------
    registry_address: str = Field(
        "127.0.0.1:50051", description="host:port the Registry gRPC server listens on."
    )
    registry_ops_port: int = Field(
        9101, description="HTTP port of the Registry process: /ready, /health, /metrics."
    )
    registry_health_port: int = Field(
        50061,
        description="Plain-text gRPC port of the Registry that answers only health checks "
        "(and reflection): probes carry no client certificate. Same host as "
        "MLMESH_REGISTRY_ADDRESS.",
    )
    training_address: str = Field(
        "127.0.0.1:50052", description="host:port of the Training gRPC server."
    )
    training_health_port: int = Field(
        50062,
        description="Plain-text gRPC port of the Training service that serves only "
        "grpc.health.v1; same host as MLMESH_TRAINING_ADDRESS.",
    )
    inference_address: str = Field(
        "127.0.0.1:50053", description="host:port of the Inference gRPC server."
    )
    inference_health_port: int = Field(
        50063,
        description="Plain-text gRPC port of the Inference service that serves only "
        "grpc.health.v1; same host as MLMESH_INFERENCE_ADDRESS.",
    )
    inference_ops_port: int = Field(
        9104, description="HTTP port of the Inference process: /ready, /health, /metrics."
    )
    inference_http_port: int = Field(
        9105,
        description="HTTP port of the Inference process's Open Inference Protocol REST face "
        "(/v2), which the gateway forwards to; the same host as MLMESH_INFERENCE_ADDRESS.",
    )
    inference_processes: int = Field(
        0,
        ge=0,
        description="How many Inference processes the launcher runs, behind one gateway "
        "cluster; process i listens on each MLMESH_INFERENCE_* port plus 100 x i. 0: one per "
        "core this process may use (`len(os.sched_getaffinity(0))`). Compose and Kubernetes "
        "run one per container or pod (1) and scale by replicas.",
    )
    registry_inference_target: str = Field(
        "",
        description="host:port at which the Registry reaches the Inference service to check "
        "that a version loads before making it production or staging; empty: "
        "MLMESH_INFERENCE_ADDRESS (right when both run on one machine: the launcher's "
        "Inference process 0; every process loads a promoted version on its own).",
    )
    promotion_load_timeout_s: float = Field(
        120.0,
        description="How long the Registry waits for the Inference service to load a version "
        "it is asked to make production or staging.",
    )
    promotion_metric: str = Field(
        "test_accuracy",
        description="Run metric compared when a version is promoted to production: a candidate "
        "worse than the current production version needs force. Higher is better; a leading "
        "`-` means lower is better (e.g. `-val_loss`). Empty: no comparison.",
    )
    inference_max_batch_images: int = Field(
        256, description="Most images one PredictBatch request may carry."
    )
    batch_max_size: int = Field(
        32, description="Most images the dynamic batcher puts in one forward pass."
    )
    batch_max_wait_ms: float = Field(
        1.0,
        description="How long the batcher waits for more requests before a forward pass "
        "that is not full; 0 batches only what is already queued.",
    )
    batch_max_size_cuda: int = Field(
        256,
        description="Most rows the dynamic batcher puts in one forward pass of a version that "
        "runs on a CUDA device (a GPU answers a large batch in about the time of a small one).",
    )
    batch_max_wait_ms_cuda: float = Field(
        2.0,
        description="How long the batcher waits for more requests before a forward pass on a "
        "CUDA device that is not full.",
    )
    inference_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where forward passes run: auto (a CUDA device when there is one, else "
        "the CPU), cpu, or cuda (refused at start-up where there is none).",
    )
    inference_threads: int = Field(
        1, description="Threads one forward pass uses (ONNX Runtime intra-op / torch)."
    )
    model_cache_versions: int = Field(
        3, description="Model versions an inference replica keeps loaded (least recently used go)."
    )
    model_cache_bytes: int = Field(
        2 * 1024**3,
        description="Memory budget of the loaded model versions, by the size of their model "
        "files: least recently used versions are unloaded to stay within it (the last one "
        "loaded always stays).",
    )
    inference_flavors: str = Field(
        "onnx,pytorch,python_function",
        description="MLflow flavors the Inference service loads, comma-separated. Loading a "
        "pytorch or python_function model unpickles it, which runs code from the artifact "
        "store; ONNX (a graph, not code) is always allowed.",
    )
    model_refresh_interval_s: float = Field(
        10.0,
        description="How often inference re-reads the aliases it serves, in case a Redis "
        "model event was missed.",
    )
    inference_follow_mlflow_aliases: bool = Field(
        False,
        description="Where the Inference service reads the production and staging aliases: "
        "false, as the Registry recorded them through TransitionModelVersion (the audit log), "
        "so a change made in MLflow around mlmesh is not served; true, MLflow's own aliases, "
        "whoever set them.",
    )
    registry_alias_check_interval_s: float = Field(
        10.0,
        description="How often the Registry compares MLflow's production and staging aliases "
        "with the audit log, and records a difference as changed_outside_mlmesh.",
    )
    rollout_check_interval_s: float = Field(
        1.0,
        description="How often the Registry's rollout controller judges the guards of the "
        "running rollouts and steps canary weights (one Registry replica acts at a time).",
    )
    feedback_retention_s: int = Field(
        86400,
        description="How long an answer's prediction_id can be labelled through "
        "SubmitFeedback (the answers are kept in Redis this long).",
    )
    shadow_queue_size: int = Field(
        256,
        description="Shadow requests waiting for the candidate at most, per Inference "
        "replica; more are dropped and counted (shadow work never slows production answers).",
    )
    prediction_cache_ttl_s: int = Field(
        3600, description="Lifetime of a cached prediction in Redis; 0 turns the cache off."
    )
    drift_window_images: int = Field(
        2000, description="Recent inputs the drift score (PSI against training) is computed over."
    )
    training_ops_port: int = Field(
        9102, description="HTTP port of the Training process: /ready, /health, /metrics."
    )
    training_queue: str = Field(
        "arq:mlmesh-training", description="ARQ queue (Redis key) training jobs are queued on."
    )
    training_reconcile_interval_s: float = Field(
        30.0, description="How often the Training service re-queues unfinished jobs Redis lost."
    )
    worker_max_jobs: int = Field(2, description="Training jobs one worker runs at once.")
    worker_ops_port: int = Field(
        9103, description="HTTP port of a training worker's /metrics; 0 turns it off."
    )
    worker_ops_host: str = Field(
        "127.0.0.1",
        description="Address a training worker's /metrics binds (0.0.0.0 in containers).",
    )
    worker_torch_threads: int = Field(
        0, description="torch threads per training process; 0 = CPU cores / jobs running."
    )
    worker_lease_s: float = Field(
        15.0, description="A job whose worker died is retried once its lease is this old."
    )
    job_max_tries: int = Field(
        20, description="Attempts of a job before it fails for good (worker deaths, outages)."
    )
    data_dir: Path | None = Field(
        None, description="IDX directory of MNIST/Fashion-MNIST used before the offline sources."
    )
    dataset_max_bytes: int = Field(
        1024**3, description="Largest dataset file an upload may send, in bytes."
    )
    dataset_max_classes: int = Field(1000, description="Most classes an uploaded dataset may have.")
    dataset_cache_dir: Path = Field(
        Path("~/.cache/mlmesh/datasets"),
        description="Where the Training service and its workers keep the dataset versions "
        "they downloaded from MLflow (one copy per machine).",
    )
    grpc_max_message_bytes: int = Field(
        4 * 1024 * 1024, description="Largest gRPC message a service accepts or sends."
    )
    shutdown_grace_s: float = Field(
        10.0, description="Seconds in-flight RPCs get to finish after SIGTERM."
    )
    readiness_timeout_s: float = Field(
        2.0, description="Timeout of each dependency check behind /ready."
    )

    # -- gateway ----------------------------------------------------------------------------
    gateway_host: str = Field("127.0.0.1", description="Address the Envoy gateway binds.")
    gateway_port: int = Field(8000, description="Envoy listener: REST and gRPC (h2c).")
    gateway_admin_port: int = Field(9901, description="Envoy admin interface (loopback only).")
    gateway_metrics_port: int = Field(
        9902,
        description="Envoy listener that serves only GET /stats/prometheus (the admin stays "
        "on loopback).",
    )
    gateway_mlflow_port: int = Field(
        5000,
        description="Envoy listener for MLflow's UI and REST API, under gateway/policy.py's "
        "MLflow table (reads public, writes with a key, serving changes refused).",
    )
    gateway_tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (chain) of the gateway's listener; with the key file, the "
        "listener speaks TLS only (HTTPS and gRPC over TLS).",
    )
    gateway_tls_key_file: Path | None = Field(
        None, description="PEM private key of MLMESH_GATEWAY_TLS_CERT_FILE."
    )
    mtls_dir: Path | None = Field(
        None,
        description="Directory of the mesh's certificates (ca.crt, service.crt/.key, "
        "gateway.crt/.key): the gateway talks to the services over mutual TLS with them. "
        "Default: STATE_DIR/mtls, which the launcher fills on first start.",
    )
    api_keys: str = Field(
        "",
        description="API keys as comma-separated client=key pairs, e.g. `alice=s3cret`.",
    )
    api_keys_file: Path | None = Field(
        None, description="File of client=key lines; read in addition to MLMESH_API_KEYS."
    )
    rate_limits: str = Field(
        "predictions=2000/s:4000,training_submissions=2/s:30,registry_writes=5/s:30",
        description="Per-client rate limits by route class, held in Redis: "
        "`CLASS[@CLIENT]=RATE/UNIT:BURST` or `CLASS=off`, comma-separated (classes "
        "`predictions`, `training_submissions`, `registry_writes`; see the README).",
    )

    # -- launcher ---------------------------------------------------------------------------
    state_dir: Path = Field(
        Path(".mlmesh"),
        description="Where the launcher keeps logs, config, private databases, artifacts.",
    )
    default_model_name: str = Field(
        "mnist-classifier",
        description="Registered model a prediction uses when it names none. (A training job "
        "or sweep that names none registers under its dataset's: `mnist-classifier`, "
        "`fashion-mnist-classifier`.)",
    )
    log_level: str = Field("INFO", description="Log level of every process.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The event loop of the service processes: uvloop (libuv, in C: less CPU "
        "per request) or Python's own asyncio loop.",
    )
    prediction_log_every: int = Field(
        100,
        ge=1,
        description="The access log's share of predictions answered OK: one line per this "
        "many (errors always have theirs; 1 logs every one). Every other RPC is logged.",
    )

    @model_validator(mode="after")
    def _databases_of_the_state_dir(self) -> Settings:
        # MLflow's metadata (in PostgreSQL) and its artifacts (under state_dir) must travel
        # together: databases named after the state directory keep a second checkout, or a
        # state directory made afresh, from finding model versions whose artifacts are
        # elsewhere. The launcher also checks the pairing before it starts MLflow.
        tag = state_tag(self.state_dir)
        if not self.database_url:
            self.database_url = f"{LOCAL_POSTGRES}/mlmesh_{tag}"
        if not self.mlflow_backend_store_uri:
            self.mlflow_backend_store_uri = f"{LOCAL_POSTGRES}/mlflow_{tag}"
        return self

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        cert, key = self.gateway_tls_cert_file, self.gateway_tls_key_file
        if (cert is None) != (key is None):
            raise ValueError(
                "set MLMESH_GATEWAY_TLS_CERT_FILE and MLMESH_GATEWAY_TLS_KEY_FILE together "
                "(`python -m services.launcher dev-cert` makes a development pair)"
            )
        for name, path in (("CERT", cert), ("KEY", key)):
            if path is not None and not path.is_file():
                raise ValueError(f"MLMESH_GATEWAY_TLS_{name}_FILE {path} is not a file")
        return self

    @model_validator(mode="after")
    def _inference_ports_apart(self) -> Settings:
        # The ports of Inference processes 1, 2, ... must be free of each other and of every
        # port the launcher's other processes bind on the same machine. (Process 0's are the
        # configured ports, checked by whoever binds them, as any service's: a gateway may
        # well render one upstream for all three services.)
        taken: dict[int, str] = {}
        for name in (
            "registry_ops_port", "registry_health_port", "training_ops_port",
            "training_health_port", "worker_ops_port", "gateway_port", "gateway_admin_port",
            "gateway_metrics_port", "gateway_mlflow_port",
        ):  # fmt: skip
            taken[getattr(self, name)] = f"MLMESH_{name.upper()}"
        taken[split_address(self.registry_address)[1]] = "MLMESH_REGISTRY_ADDRESS"
        taken[split_address(self.training_address)[1]] = "MLMESH_TRAINING_ADDRESS"
        taken.pop(0, None)  # a port of 0 is off
        for e in self.inference_endpoints():
            for what, port in e.ports().items():
                where = f"Inference process {e.index}'s {what} port"
                if e.index > 0 and not 0 < port < 65536:
                    raise ValueError(
                        f"{where} would be {port}, not a TCP port: lower "
                        "MLMESH_INFERENCE_PROCESSES or the MLMESH_INFERENCE_* ports"
                    )
                if e.index > 0 and port in taken:
                    raise ValueError(
                        f"{where} {port} is also {taken[port]}: give the Inference ports room "
                        f"(process i uses each plus {INFERENCE_PORT_STEP} x i) or lower "
                        "MLMESH_INFERENCE_PROCESSES"
                    )
                taken[port] = where
        return self

    @field_validator("rate_limits")
    @classmethod
    def _valid_rate_limits(cls, value: str) -> str:
        from services.common.limits import parse_limits  # raises ValueError naming the entry

        parse_limits(value)
        return value

    @field_validator("inference_flavors")
    @classmethod
    def _known_flavors(cls, value: str) -> str:
        known = ("onnx", "pytorch", "python_function")
        for flavor in (f.strip() for f in value.split(",") if f.strip()):
            if flavor not in known:
                raise ValueError(f"flavor {flavor!r} is not one of {', '.join(known)}")
        return value

    @property
    def inference_flavor_list(self) -> tuple[str, ...]:
        """inference_flavors as a tuple; onnx is always among them."""
        listed = (f.strip() for f in self.inference_flavors.split(","))
        return tuple(dict.fromkeys(["onnx", *(f for f in listed if f)]))

    @property
    def inference_process_count(self) -> int:
        """How many Inference processes the launcher runs: inference_processes, or with 0,
        the cores this process may use."""
        return self.inference_processes or len(os.sched_getaffinity(0))

    def inference_endpoints(self) -> list[InferenceEndpoint]:
        """Each Inference process's name and ports, process 0 first: the one place the
        launcher, the gateway renderer, Prometheus targets and the tests take them from."""
        host, port = split_address(self.inference_address)
        return [
            InferenceEndpoint(
                index=i,
                address=f"{host}:{port + INFERENCE_PORT_STEP * i}",
                health_port=self.inference_health_port + INFERENCE_PORT_STEP * i,
                ops_port=self.inference_ops_port + INFERENCE_PORT_STEP * i,
                http_port=self.inference_http_port + INFERENCE_PORT_STEP * i,
            )
            for i in range(self.inference_process_count)
        ]

    def for_inference_process(self, endpoint: InferenceEndpoint) -> Settings:
        """These settings as Inference process ``endpoint`` runs with them: its own ports."""
        return self.model_copy(update=endpoint.settings_update())

    @property
    def mlflow_port(self) -> int:
        """Port of the MLflow server, taken from mlflow_tracking_uri."""
        return urlsplit(self.mlflow_tracking_uri).port or 5000

    @property
    def mlflow_backend_sqlalchemy_uri(self) -> str:
        """mlflow_backend_store_uri with the driver MLflow is built and tested with (psycopg2).

        SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, with which MLflow's
        archive_existing_versions query fails on PostgreSQL.
        """
        scheme, sep, rest = self.mlflow_backend_store_uri.partition("://")
        if scheme in ("postgresql", "postgres"):
            return f"postgresql+psycopg2{sep}{rest}"
        return self.mlflow_backend_store_uri

    @property
    def gateway_tls(self) -> bool:
        """Whether the gateway's listener speaks TLS."""
        return self.gateway_tls_cert_file is not None

    @property
    def gateway_url(self) -> str:
        """Base URL of the gateway."""
        scheme = "https" if self.gateway_tls else "http"
        return f"{scheme}://{self.gateway_host}:{self.gateway_port}"

    @property
    def gateway_mlflow_url(self) -> str:
        """Base URL of MLflow's UI and API through the gateway: what users open."""
        scheme = "https" if self.gateway_tls else "http"
        return f"{scheme}://{self.gateway_host}:{self.gateway_mlflow_port}"

    @property
    def mesh_tls(self) -> MeshTlsFiles:
        """The mesh's certificates: MLMESH_MTLS_DIR, or STATE_DIR/mtls."""
        return MeshTlsFiles(self.mtls_dir or self.state_dir / "mtls")

    def health_address(self, address: str) -> str:
        """host:port of the plain-text health port of the service listening at ``address``
        (MLMESH_<SERVICE>_ADDRESS): the same host, its MLMESH_<SERVICE>_HEALTH_PORT."""
        ports = {
            self.registry_address: self.registry_health_port,
            self.training_address: self.training_health_port,
            self.inference_address: self.inference_health_port,
        }
        if address not in ports:
            raise ValueError(f"{address} is not the address of a service in these settings")
        return f"{split_address(address)[0]}:{ports[address]}"


def state_tag(state_dir: Path) -> str:
    """A short name for a state directory, the same for the same absolute path."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" into its parts."""
    host, _, port = address.rpartition(":")
    return host, int(port)
