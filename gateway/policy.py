"""Which RPCs need an API key, and what the gateway lets through to MLflow.

Every RPC of every mlmesh service must be listed here: the renderer refuses a descriptor set
with an RPC missing from this table, so a new RPC cannot reach the gateway unclassified.
Every route of MLflow's server is classified below too (MLFLOW_ROUTES); one that is not is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Access = Literal["public", "protected"]

RPC_ACCESS: dict[str, Access] = {
    # Registry: the read-only views are public; changes and the audit log are protected.
    "/mlmesh.registry.v1.RegistryService/ListExperiments": "public",
    "/mlmesh.registry.v1.RegistryService/GetExperiment": "public",
    "/mlmesh.registry.v1.RegistryService/ListRuns": "public",
    "/mlmesh.registry.v1.RegistryService/GetRun": "public",
    "/mlmesh.registry.v1.RegistryService/GetMetricHistory": "public",
    "/mlmesh.registry.v1.RegistryService/ListArtifacts": "public",
    "/mlmesh.registry.v1.RegistryService/ListRegisteredModels": "public",
    "/mlmesh.registry.v1.RegistryService/GetRegisteredModel": "public",
    "/mlmesh.registry.v1.RegistryService/ListModelVersions": "public",
    "/mlmesh.registry.v1.RegistryService/GetModelVersion": "public",
    "/mlmesh.registry.v1.RegistryService/TransitionModelVersion": "protected",
    "/mlmesh.registry.v1.RegistryService/ListAuditEvents": "protected",
    # Rollouts change what serves (and show live traffic figures): all keyed.
    "/mlmesh.registry.v1.RegistryService/StartRollout": "protected",
    "/mlmesh.registry.v1.RegistryService/GetRollout": "protected",
    "/mlmesh.registry.v1.RegistryService/ListRollouts": "protected",
    "/mlmesh.registry.v1.RegistryService/WatchRollout": "protected",
    "/mlmesh.registry.v1.RegistryService/PromoteRollout": "protected",
    "/mlmesh.registry.v1.RegistryService/AbortRollout": "protected",
    # Training: everything is protected.
    "/mlmesh.training.v1.TrainingService/SubmitTrainingJob": "protected",
    "/mlmesh.training.v1.TrainingService/GetTrainingJob": "protected",
    "/mlmesh.training.v1.TrainingService/ListTrainingJobs": "protected",
    "/mlmesh.training.v1.TrainingService/CancelTrainingJob": "protected",
    "/mlmesh.training.v1.TrainingService/WatchTrainingJob": "protected",
    "/mlmesh.training.v1.TrainingService/SubmitSweep": "protected",
    "/mlmesh.training.v1.TrainingService/GetSweep": "protected",
    "/mlmesh.training.v1.TrainingService/ListSweeps": "protected",
    "/mlmesh.training.v1.TrainingService/CancelSweep": "protected",
    "/mlmesh.training.v1.TrainingService/WatchSweep": "protected",
    # Datasets (served by the Training process): everything is protected.
    "/mlmesh.datasets.v1.DatasetService/UploadDataset": "protected",
    "/mlmesh.datasets.v1.DatasetService/GetDataset": "protected",
    "/mlmesh.datasets.v1.DatasetService/ListDatasets": "protected",
    "/mlmesh.datasets.v1.DatasetService/ListDatasetVersions": "protected",
    "/mlmesh.datasets.v1.DatasetService/DeleteDatasetVersion": "protected",
    "/mlmesh.datasets.v1.DatasetService/GetDatasetSample": "protected",
    # Inference: everything is protected.
    "/mlmesh.inference.v1.InferenceService/Predict": "protected",
    "/mlmesh.inference.v1.InferenceService/PredictBatch": "protected",
    "/mlmesh.inference.v1.InferenceService/PredictStream": "protected",
    "/mlmesh.inference.v1.InferenceService/LoadModelVersion": "protected",
    "/mlmesh.inference.v1.InferenceService/SubmitFeedback": "protected",
    # The Open Inference Protocol (KServe V2): its health RPCs are public like /health and
    # /ready (probes carry no key); metadata and inference are protected.
    "/inference.GRPCInferenceService/ServerLive": "public",
    "/inference.GRPCInferenceService/ServerReady": "public",
    "/inference.GRPCInferenceService/ModelReady": "public",
    "/inference.GRPCInferenceService/ServerMetadata": "protected",
    "/inference.GRPCInferenceService/ModelMetadata": "protected",
    "/inference.GRPCInferenceService/ModelInfer": "protected",
}

# Plain HTTP routes the gateway serves besides the RPCs.
HTTP_ACCESS: dict[str, Access] = {
    "/health": "public",
    "/ready": "public",
}

# The Open Inference Protocol's REST routes (verb, path template) and the RPC each one is:
# each has that RPC's access. The gateway forwards them as they are to the Inference
# process's HTTP face (services/inference/oip_http.py), not through the transcoder.
OIP_SERVICE = "inference.GRPCInferenceService"
OIP_REST_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v2/health/live", "ServerLive"),
    ("GET", "/v2/health/ready", "ServerReady"),
    ("GET", "/v2/models/{name}/ready", "ModelReady"),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "ModelReady"),
    ("GET", "/v2", "ServerMetadata"),
    ("GET", "/v2/models/{name}", "ModelMetadata"),
    ("GET", "/v2/models/{name}/versions/{version}", "ModelMetadata"),
    ("POST", "/v2/models/{name}/infer", "ModelInfer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "ModelInfer"),
)

# Proto packages whose services the gateway serves: mlmesh's own and the protocol's.
CONTRACT_PACKAGES = ("mlmesh.", "inference.")

# Which upstream cluster serves each gRPC service.
SERVICE_CLUSTERS: dict[str, str] = {
    "mlmesh.registry.v1.RegistryService": "registry",
    "mlmesh.training.v1.TrainingService": "training",
    "mlmesh.datasets.v1.DatasetService": "training",
    "mlmesh.inference.v1.InferenceService": "inference",
    OIP_SERVICE: "inference",
}


# -- MLflow's UI and REST API (the gateway's MLflow listener, MLMESH_GATEWAY_MLFLOW_PORT) -------
# Every route of the installed MLflow server (its Flask app and the FastAPI routers around it)
# is classified here; tests/unit/test_mlflow_policy.py reads MLflow's own route list and fails
# on one this table misses (or one it lists that MLflow no longer has). Anything else is
# refused (deny by default). Keys come as x-api-key or as MLflow clients send
# MLFLOW_TRACKING_TOKEN: `Authorization: Bearer <key>`.
#
#   public     reads: the UI's pages and the searches it POSTs, artifact downloads;
#   protected  an API key: what logs experiments, runs and models (a worker, a notebook),
#              registering a version, artifact uploads;
#   refused    403 whatever the key, with ``why``: registry writes that change what serves
#              (every such change goes through TransitionModelVersion, which checks the version
#              and lands in the audit log), and MLflow features mlmesh does not offer (the AI
#              gateway, the assistant, MCP servers, server-side jobs, webhooks: they make the
#              server run code or call out).
#
# Paths are MLflow's with their variables as {name} (one segment) or {name=**} (the rest of
# the path). "{api}" stands for MLflow's REST prefixes /api/2.0/mlflow/, /ajax-api/2.0/mlflow/,
# /api/3.0/mlflow/ and /ajax-api/3.0/mlflow/ (the UI calls ajax-api, clients api), and
# "{artifacts}" for /api/2.0/mlflow-artifacts/ and /ajax-api/2.0/mlflow-artifacts/.

MlflowAccess = Literal["public", "protected", "refused"]


@dataclass(frozen=True)
class MlflowRule:
    """What the gateway does with one MLflow route; ``why`` is the refusal's message."""

    access: MlflowAccess
    why: str = ""


MLFLOW_PREFIXES = {
    "{api}": r"/(ajax-)?api/[23]\.0/mlflow/",
    "{artifacts}": r"/(ajax-)?api/2\.0/mlflow-artifacts/",
}

_PUBLIC = MlflowRule("public")
_KEY = MlflowRule("protected")
_PROMOTE = (
    "use mlmesh's RegistryService.TransitionModelVersion (REST POST "
    "/v1/models/{name}/versions/{version}:transition, `mlmesh promote`), which checks that the "
    "version can serve and records who moved it in the audit log"
)


def _serving(what: str) -> MlflowRule:
    """A refused registry write: it would change what the Inference service serves."""
    return MlflowRule(
        "refused",
        f"{what} is refused at mlmesh's gateway: it changes what serves. To move a version "
        f"in or out of production or staging, {_PROMOTE}",
    )


def _not_offered(feature: str) -> MlflowRule:
    return MlflowRule(
        "refused",
        f"{feature} is not offered through mlmesh's gateway (it makes the MLflow server run "
        "code or call other services)",
    )


_AI_GATEWAY = _not_offered("MLflow's AI gateway")
_ASSISTANT = _not_offered("MLflow's assistant")
_MCP = _not_offered("MLflow's MCP server registry")
_JOBS = _not_offered("MLflow's server-side jobs")
_WEBHOOKS = _not_offered("MLflow's webhooks")
_LLM = _not_offered("running scorers, evaluations, prompt optimisation or demos on the server")
_NOT_IMPLEMENTED = MlflowRule("refused", "MLflow does not implement this route")

MLFLOW_ROUTES: dict[str, MlflowRule] = {
    # -- the UI and the server's own pages
    "GET /": _PUBLIC,
    "GET /static-files/{path=**}": _PUBLIC,
    "GET /build/{filename=**}": _PUBLIC,
    "GET /health": _PUBLIC,
    "GET /version": _PUBLIC,
    "GET {api}server-info": _PUBLIC,
    "GET /graphql": _PUBLIC,  # the UI's queries; MLflow's schema has no mutation but searches
    "POST /graphql": _PUBLIC,
    "GET {api}ui-telemetry": _PUBLIC,
    "POST {api}ui-telemetry": _not_offered("MLflow's UI telemetry"),
    # -- experiments
    "GET {api}experiments/get": _PUBLIC,
    "GET {api}experiments/get-by-name": _PUBLIC,
    "GET {api}experiments/search": _PUBLIC,
    "POST {api}experiments/search": _PUBLIC,
    "POST {api}experiments/search-datasets": _PUBLIC,
    "POST {api}experiments/create": _KEY,
    "POST {api}experiments/update": _KEY,
    "POST {api}experiments/delete": _KEY,
    "POST {api}experiments/restore": _KEY,
    "POST {api}experiments/set-experiment-tag": _KEY,
    "POST {api}experiments/delete-experiment-tag": _KEY,
    "POST /api/2.0mlflow/experiments/search-datasets": _NOT_IMPLEMENTED,
    "POST /ajax-api/2.0mlflow/experiments/search-datasets": _NOT_IMPLEMENTED,
    # -- runs, metrics, artifacts of runs
    "GET {api}runs/get": _PUBLIC,
    "POST {api}runs/search": _PUBLIC,
    "GET {api}metrics/get-history": _PUBLIC,
    "GET {api}metrics/get-history-bulk": _PUBLIC,
    "GET {api}metrics/get-history-bulk-interval": _PUBLIC,
    "GET {api}artifacts/list": _PUBLIC,
    "POST {api}artifacts/presigned-download-url": _PUBLIC,
    "POST {api}runs/create": _KEY,
    "POST {api}runs/update": _KEY,
    "POST {api}runs/delete": _KEY,
    "POST {api}runs/restore": _KEY,
    "POST {api}runs/log-metric": _KEY,
    "POST {api}runs/log-parameter": _KEY,
    "POST {api}runs/log-batch": _KEY,
    "POST {api}runs/log-model": _KEY,
    "POST {api}runs/log-inputs": _KEY,
    "POST {api}runs/outputs": _KEY,
    "POST {api}runs/set-tag": _KEY,
    "POST {api}runs/delete-tag": _KEY,
    "POST {api}artifacts/presigned-upload-url": _KEY,
    "POST {api}upload-artifact": _KEY,
    "POST {api}runs/create-promptlab-run": _LLM,
    # -- artifacts (the proxied artifact store)
    "GET /get-artifact": _PUBLIC,
    "GET /model-versions/get-artifact": _PUBLIC,
    "GET {artifacts}artifacts": _PUBLIC,
    "GET {artifacts}artifacts/{artifact_path=**}": _PUBLIC,
    "GET {artifacts}presigned/{artifact_path=**}": _PUBLIC,
    "PUT {artifacts}artifacts/{artifact_path=**}": _KEY,
    "POST {artifacts}mpu/create/{artifact_path=**}": _KEY,
    "POST {artifacts}mpu/complete/{artifact_path=**}": _KEY,
    "POST {artifacts}mpu/abort/{artifact_path=**}": _KEY,
    "DELETE {artifacts}artifacts/{artifact_path=**}": _serving(
        "Deleting artifacts (a served version's files may be among them)"
    ),
    # -- logged models (MLflow 3: log_model makes one, a version's files live in it)
    "GET {api}logged-models/{model_id}": _PUBLIC,
    "POST {api}logged-models/search": _PUBLIC,
    "GET {api}logged-models/{model_id}/artifacts/directories": _PUBLIC,
    "GET {api}logged-models/{model_id}/artifacts/files": _PUBLIC,
    "POST {api}logged-models": _KEY,
    "PATCH {api}logged-models/{model_id}": _KEY,
    "PATCH {api}logged-models/{model_id}/tags": _KEY,
    "DELETE {api}logged-models/{model_id}/tags/{tag_key}": _KEY,
    "POST {api}logged-models/{model_id}/params": _KEY,
    "DELETE {api}logged-models/{model_id}": _serving(
        "Deleting a logged model (a served version's files may be in it)"
    ),
    # -- the model registry. Registering is a key's; what serves moves only through mlmesh.
    "GET {api}registered-models/get": _PUBLIC,
    "GET {api}registered-models/search": _PUBLIC,
    "GET {api}registered-models/get-latest-versions": _PUBLIC,
    "POST {api}registered-models/get-latest-versions": _PUBLIC,
    "GET {api}registered-models/alias": _PUBLIC,
    "GET {api}model-versions/get": _PUBLIC,
    "GET {api}model-versions/search": _PUBLIC,
    "GET {api}model-versions/get-download-uri": _PUBLIC,
    "POST {api}registered-models/create": _KEY,
    "POST {api}model-versions/create": _KEY,
    "PATCH {api}registered-models/update": _KEY,  # the description
    "PATCH {api}model-versions/update": _KEY,  # the description
    # The Inference service reads no tags: changing them does not change what serves.
    "POST {api}registered-models/set-tag": _KEY,
    "DELETE {api}registered-models/delete-tag": _KEY,
    "POST {api}model-versions/set-tag": _KEY,
    "DELETE {api}model-versions/delete-tag": _KEY,
    "POST {api}registered-models/alias": _serving("Setting an alias in MLflow"),
    "DELETE {api}registered-models/alias": _serving("Deleting an alias in MLflow"),
    "POST {api}model-versions/transition-stage": _serving("A stage transition in MLflow"),
    "DELETE {api}model-versions/delete": _serving(
        "Deleting a model version (archive it instead: stage Archived)"
    ),
    "DELETE {api}registered-models/delete": _serving("Deleting a registered model"),
    "POST {api}registered-models/rename": _serving(
        "Renaming a registered model (requests name the model)"
    ),
    # -- tracing and GenAI evaluation data: reads public, writes a key's
    "GET {api}traces": _PUBLIC,
    "GET {api}traces/{trace_id}": _PUBLIC,
    "GET {api}traces/{request_id}/info": _PUBLIC,
    "GET {api}traces/get": _PUBLIC,
    "GET {api}traces/batchGet": _PUBLIC,
    "POST {api}traces/batchGetInfos": _PUBLIC,
    "POST {api}traces/search": _PUBLIC,
    "POST {api}traces/calculate-filter-correlation": _PUBLIC,
    "POST {api}traces/metrics": _PUBLIC,
    "GET {api}get-trace-artifact": _PUBLIC,
    "GET {api}unified-traces": _PUBLIC,
    "GET {api}get-online-trace-details": _PUBLIC,
    "GET {api}traces/{trace_id}/assessments/{assessment_id}": _PUBLIC,
    "POST {api}traces": _KEY,
    "POST /v1/traces": _KEY,  # OpenTelemetry (OTLP) export
    "PATCH {api}traces/{request_id}": _KEY,
    "PATCH {api}traces/{trace_id}/tags": _KEY,
    "DELETE {api}traces/{trace_id}/tags": _KEY,
    "POST {api}traces/link-to-run": _KEY,
    "POST {api}traces/link-prompts": _KEY,
    "POST {api}traces/delete-traces": _KEY,
    "POST {api}traces/{trace_id}/assessments": _KEY,
    "PATCH {api}traces/{trace_id}/assessments/{assessment_id}": _KEY,
    "DELETE {api}traces/{trace_id}/assessments/{assessment_id}": _KEY,
    "GET {api}issues/{issue_id}": _PUBLIC,
    "POST {api}issues/search": _PUBLIC,
    "POST {api}issues": _KEY,
    "PATCH {api}issues/{issue_id}": _KEY,
    "POST {api}issues/invoke": _LLM,
    "GET {api}label-schemas/get": _PUBLIC,
    "GET {api}label-schemas/get-by-name": _PUBLIC,
    "GET {api}label-schemas/list": _PUBLIC,
    "POST {api}label-schemas/create": _KEY,
    "PATCH {api}label-schemas/update": _KEY,
    "DELETE {api}label-schemas/delete": _KEY,
    "GET {api}datasets/{dataset_id}": _PUBLIC,
    "GET {api}datasets/search": _PUBLIC,
    "POST {api}datasets/search": _PUBLIC,
    "GET {api}datasets/{dataset_id}/records": _PUBLIC,
    "GET {api}datasets/{dataset_id}/experiment-ids": _PUBLIC,
    "POST {api}datasets/create": _KEY,
    "DELETE {api}datasets/{dataset_id}": _KEY,
    "PATCH {api}datasets/{dataset_id}/tags": _KEY,
    "DELETE {api}datasets/{dataset_id}/tags/{key}": _KEY,
    "POST {api}datasets/{dataset_id}/records": _KEY,
    "DELETE {api}datasets/{dataset_id}/records": _KEY,
    "POST {api}datasets/{dataset_id}/add-experiments": _KEY,
    "POST {api}datasets/{dataset_id}/remove-experiments": _KEY,
    "GET {api}scorers/list": _PUBLIC,
    "GET {api}scorers/versions": _PUBLIC,
    "GET {api}scorers/get": _PUBLIC,
    "GET {api}scorers/online-configs": _PUBLIC,
    "POST {api}scorers/register": _KEY,
    "DELETE {api}scorers/delete": _KEY,
    "PUT {api}scorers/online-config": _LLM,
    "POST {api}scorer/invoke": _LLM,
    "POST {api}genai/evaluate/invoke": _LLM,
    "POST {api}demo/generate": _LLM,
    "POST {api}demo/delete": _LLM,
    "GET {api}review-queues/get": _PUBLIC,
    "GET {api}review-queues/get-by-name": _PUBLIC,
    "GET {api}review-queues/list": _PUBLIC,
    "GET {api}review-queues/items/list": _PUBLIC,
    "POST {api}review-queues/create": _KEY,
    "POST {api}review-queues/get-or-create-user": _KEY,
    "POST {api}review-queues/update": _KEY,
    "POST {api}review-queues/delete": _KEY,
    "POST {api}review-queues/items/add": _KEY,
    "POST {api}review-queues/items/remove": _KEY,
    "POST {api}review-queues/items/set-status": _KEY,
    # -- workspaces (MLflow's multi-tenancy)
    "GET {api}workspaces": _PUBLIC,
    "GET {api}workspaces/{workspace_name}": _PUBLIC,
    "POST {api}workspaces": _KEY,
    "PATCH {api}workspaces/{workspace_name}": _KEY,
    "DELETE {api}workspaces/{workspace_name}": _KEY,
    # -- features mlmesh does not offer: they make the server run code or call out
    "POST {api}prompt-optimization/jobs": _LLM,
    "GET {api}prompt-optimization/jobs/{job_id}": _LLM,
    "GET {api}prompt-optimization/jobs/search": _LLM,
    "POST {api}prompt-optimization/jobs/search": _LLM,
    "POST {api}prompt-optimization/jobs/{job_id}/cancel": _LLM,
    "DELETE {api}prompt-optimization/jobs/{job_id}": _LLM,
    "GET {api}jobs/{job_id}": _JOBS,
    "PATCH {api}jobs/cancel/{job_id}": _JOBS,
    "GET /ajax-api/3.0/jobs/{job_id}": _JOBS,
    "POST /ajax-api/3.0/jobs/": _JOBS,
    "PATCH /ajax-api/3.0/jobs/cancel/{job_id}": _JOBS,
    "POST /ajax-api/3.0/jobs/search": _JOBS,
    "GET {api}webhooks": _WEBHOOKS,
    "POST {api}webhooks": _WEBHOOKS,
    "GET {api}webhooks/{webhook_id}": _WEBHOOKS,
    "PATCH {api}webhooks/{webhook_id}": _WEBHOOKS,
    "DELETE {api}webhooks/{webhook_id}": _WEBHOOKS,
    "POST {api}webhooks/{webhook_id}/test": _WEBHOOKS,
    "GET {api}gateway-proxy": _AI_GATEWAY,
    "POST {api}gateway-proxy": _AI_GATEWAY,
    "GET {api}gateway/{path=**}": _AI_GATEWAY,
    "POST {api}gateway/{path=**}": _AI_GATEWAY,
    "PATCH {api}gateway/{path=**}": _AI_GATEWAY,
    "DELETE {api}gateway/{path=**}": _AI_GATEWAY,
    "GET /gateway/{path=**}": _AI_GATEWAY,
    "POST /gateway/{path=**}": _AI_GATEWAY,
    "GET {api}assistant/{path=**}": _ASSISTANT,
    "POST {api}assistant/{path=**}": _ASSISTANT,
    "PUT {api}assistant/{path=**}": _ASSISTANT,
    "PATCH {api}assistant/{path=**}": _ASSISTANT,
    "GET {api}mcp-servers": _MCP,
    "POST {api}mcp-servers": _MCP,
    "GET {api}mcp-servers/{path=**}": _MCP,
    "POST {api}mcp-servers/{path=**}": _MCP,
    "PATCH {api}mcp-servers/{path=**}": _MCP,
    "DELETE {api}mcp-servers/{path=**}": _MCP,
}
