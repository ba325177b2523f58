"""The Registry process's own Prometheus metrics (served on its ops port's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
OUTSIDE_CHANGES = Counter(
    "registry_alias_changes_outside_mlmesh_total",
    "Production or staging aliases found changed in MLflow without TransitionModelVersion "
    "(recorded in the audit log as changed_outside_mlmesh), by model and alias.",
    ("model_name", "alias"),
)
ALIAS_MISMATCH = Gauge(
    "registry_alias_mismatch",
    "1 while MLflow's production or staging alias of a model differs from what mlmesh "
    "recorded (a change made outside mlmesh, not yet undone or promoted through mlmesh).",
    ("model_name", "alias"),
)
