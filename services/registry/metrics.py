"""The Registry process's own Prometheus metrics (served on its ops port's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.common.rollouts import Figures, Rollout

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
ROLLOUTS = Counter(
    "registry_rollouts_total",
    "Rollouts started (state running) and ended, by model and state (promoted, rolled_back, "
    "aborted, superseded).",
    ("model_name", "state"),
)
ROLLOUT_FIGURE = Gauge(
    "registry_rollout_figure",
    "The figures the rollout controller judges, over every Inference replica, by model, "
    "version, role (production, candidate) and figure (requests, error_rate, p99_latency_ms, "
    "accuracy, agreement, weight); removed when the rollout ends.",
    ("model_name", "model_version", "role", "figure"),
)


def export_figures(rollout: Rollout, figures: Figures) -> None:
    """Show the controller's figures of a running rollout (services/registry/rollouts.py)."""
    name = rollout.model_name
    for role, f in (("production", figures.production), ("candidate", figures.candidate)):
        values = {
            "requests": f.requests,
            "error_rate": f.error_rate,
            "p99_latency_ms": f.p99_latency_ms,
        }
        if f.accuracy is not None:
            values["accuracy"] = f.accuracy
        if role == "candidate":
            values["weight"] = rollout.weight
            if figures.shadow.agreement is not None:
                values["agreement"] = figures.shadow.agreement
        for figure, value in values.items():
            ROLLOUT_FIGURE.labels(name, str(f.version), role, figure).set(value)


def forget_figures(rollout: Rollout) -> None:
    """Remove an ended rollout's figures."""
    for role, version in (
        ("production", rollout.production_version),
        ("candidate", rollout.candidate_version),
    ):
        for figure in ("requests", "error_rate", "p99_latency_ms", "accuracy", "weight",
                       "agreement"):  # fmt: skip
            try:
                ROLLOUT_FIGURE.remove(rollout.model_name, str(version), role, figure)
            except KeyError:
                pass
