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
    # Inference: everything is protected.
    "/mlmesh.inference.v1.InferenceService/Predict": "protected",
    "/mlmesh.inference.v1.InferenceService/PredictBatch": "protected",
    "/mlmesh.inference.v1.InferenceService/PredictStream": "protected",
}

# Plain HTTP routes the gateway serves besides the RPCs.
HTTP_ACCESS: dict[str, Access] = {
    "/health": "public",
    "/ready": "public",
}

# Which upstream cluster serves each gRPC service.
SERVICE_CLUSTERS: dict[str, str] = {
    "mlmesh.registry.v1.RegistryService": "registry",
    "mlmesh.training.v1.TrainingService": "training",
    "mlmesh.inference.v1.InferenceService": "inference",
}
