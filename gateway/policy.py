"""Which RPCs need an API key. Every RPC of every mlmesh service must be listed here.

The renderer refuses a descriptor set with an RPC missing from this table, so a new RPC
cannot reach the gateway unclassified.
"""

from __future__ import annotations

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
