"""The Inference process's Prometheus metrics (served on its ops port's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MODEL_LABELS = ("model_name", "model_version")

PREDICTIONS = Counter(
    "model_predictions_total",
    "Images classified, by the registered model and version that answered (cached included).",
    MODEL_LABELS,
)
PREDICTION_DURATION = Histogram(
    "model_prediction_duration_seconds",
    "Time to answer one prediction request, by method (one stream message for PredictStream; "
    "ModelInfer: the Open Inference Protocol, gRPC and REST).",
    ("method",),
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CACHE_HITS = Counter(
    "prediction_cache_hits_total",
    "Images answered from the Redis prediction cache.",
    ("model_name",),
)
CACHE_MISSES = Counter(
    "prediction_cache_misses_total",
    "Images the prediction cache did not hold (or was not asked for), computed by the model.",
    ("model_name",),
)
CACHE_ERRORS = Counter(
    "prediction_cache_errors_total",
    "Cache reads or writes that failed (Redis down or slow); the prediction is served uncached.",
    ("operation",),
)
BATCH_SIZE = Histogram(
    "inference_batch_size",
    "Images per forward pass of the dynamic batcher.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FORWARD_DURATION = Histogram(
    "inference_forward_duration_seconds",
    "Time of one forward pass (one batch).",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
INPUT_DRIFT = Gauge(
    "model_input_drift_psi",
    "Population stability index of recent inputs' pixel-intensity histogram against the "
    "training inputs' (below 0.1 stable, 0.1-0.25 moderate, above 0.25 significant).",
    MODEL_LABELS,
)
DRIFT_WINDOW = Gauge(
    "model_input_drift_window_images",
    "Recent images the drift score is computed over.",
    MODEL_LABELS,
)
MODELS_LOADED = Gauge(
    "inference_models_loaded",
    "Model versions held in memory, with the runtime each runs on (onnxruntime or torch).",
    (*MODEL_LABELS, "runtime"),
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
