"""The Registry process's own Prometheus metrics (served on its ops port's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

TRANSITIONS = Counter(
    "registry_transitions_total",
    "Model version transitions made, by the stage moved to.",
    ("model_name", "stage"),
)
TRANSITIONS_REFUSED = Counter(
    "registry_transitions_refused_total",
    "Transitions refused before anything moved, by reason: cannot_serve (the Inference "
    "service cannot load the version), worse_metric (a production candidate worse than "
    "production, without force), production_left_empty (without force).",
    ("reason",),
)
AUDIT_EVENTS = Counter(
    "registry_audit_events_total",
    "Audit events recorded, by action.",
    ("action",),
)
