"""The Inference process's Prometheus metrics (served on its ops port's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MODEL_LABELS = ("model_name", "model_version")

PREDICTIONS = Counter(
    "model_predictions_total",
    "Rows answered (images, table rows; one per request for a model without a batch "
    "dimension), by the registered model and version that answered (cached included).",
    MODEL_LABELS,
)
PREDICTION_DURATION = Histogram(
    "model_prediction_duration_seconds",
    "Time to answer one prediction request, by method (one stream message for PredictStream; "
    "ModelInfer: the Open Inference Protocol, gRPC and REST).",
    ("method",),
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
MODEL_ERRORS = Counter(
    "model_errors_total",
    "Requests the model's own code failed on (answered INTERNAL), by model and version.",
    MODEL_LABELS,
)
CACHE_HITS = Counter(
    "prediction_cache_hits_total",
    "Rows answered from the Redis prediction cache.",
    ("model_name",),
)
CACHE_MISSES = Counter(
    "prediction_cache_misses_total",
    "Rows the prediction cache did not hold (or was not asked for), computed by the model.",
    ("model_name",),
)
CACHE_ERRORS = Counter(
    "prediction_cache_errors_total",
    "Cache reads or writes that failed (Redis down or slow); the prediction is served uncached.",
    ("operation",),
)
BATCH_SIZE = Histogram(
    "inference_batch_size",
    "Rows per forward pass of the dynamic batcher.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FORWARD_DURATION = Histogram(
    "inference_forward_duration_seconds",
    "Time of one forward pass (one batch), by the runtime that ran it.",
    ("runtime",),
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
INPUT_DRIFT = Gauge(
    "model_input_drift_psi",
    "Population stability index of an input's recent values against the training values' "
    "histogram in the version's drift reference (below 0.1 stable, 0.1-0.25 moderate, above "
    "0.25 significant); absent for a version without a reference.",
    (*MODEL_LABELS, "input"),
)
DRIFT_WINDOW = Gauge(
    "model_input_drift_window_images",
    "Recent rows (images, table rows) the drift score is computed over.",
    (*MODEL_LABELS, "input"),
)
MODELS_LOADED = Gauge(
    "inference_models_loaded",
    "Model versions held in memory, with the runtime each runs on (onnxruntime, torch or pyfunc).",
    (*MODEL_LABELS, "runtime"),
)
MODELS_LOADED_BYTES = Gauge(
    "inference_models_loaded_bytes",
    "Size of the model versions held in memory (their model files), against "
    "MLMESH_MODEL_CACHE_BYTES.",
)
MODEL_LOAD_DURATION = Histogram(
    "inference_model_load_duration_seconds",
    "Time to download and load one model version.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ALIAS_SWITCHES = Counter(
    "inference_alias_switches_total",
    "Times an alias this replica serves (production, staging) moved to another version.",
    ("model_name", "alias"),
)
ALIAS_VERSION = Gauge(
    "model_alias_version",
    "The version an alias (production, staging) points at, as this replica serves it.",
    ("model_name", "alias"),
)
ROLLOUT_REQUESTS = Counter(
    "rollout_requests_total",
    "Requests answered during a rollout (canary: by either version; shadow: the candidate's "
    "shadow computations too), by model, version and role (production, candidate).",
    (*MODEL_LABELS, "role"),
)
SHADOW_ANSWERS = Counter(
    "shadow_answers_total",
    "Rows a shadow candidate computed, by model, candidate version and outcome: agreed or "
    "disagreed with production's answer, or failed (the request failed on the candidate).",
    (*MODEL_LABELS, "outcome"),
)
SHADOW_DROPPED = Counter(
    "shadow_dropped_total",
    "Shadow requests dropped because the shadow queue (MLMESH_SHADOW_QUEUE_SIZE) was full.",
    ("model_name",),
)
FEEDBACK = Counter(
    "model_feedback_total",
    "Answers labelled through SubmitFeedback, by model, the version that answered, and what "
    "it served as then (production, candidate, other).",
    (*MODEL_LABELS, "served_as"),
)
FEEDBACK_CORRECT = Counter(
    "model_feedback_correct_total",
    "Labelled answers that matched the true label (live accuracy: this over "
    "model_feedback_total), by model, version and what it served as.",
    (*MODEL_LABELS, "served_as"),
)
