"""MLflow entities and audit events to mlmesh.registry.v1 messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from mlflow.entities import Experiment, FileInfo, Metric, Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel

from mlmesh.registry.v1 import registry_pb2 as pb
from services.common.rollouts import (
    ABORTED,
    CANARY,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    SHADOW,
    SUPERSEDED,
    Guards,
    VersionFigures,
)
from services.registry.audit import AuditEvent
from services.registry.registry import Comparison
from services.registry.rollouts import RolloutView

_RUN_STATUS = {
    "RUNNING": pb.RUN_STATUS_RUNNING,
    "SCHEDULED": pb.RUN_STATUS_SCHEDULED,
    "FINISHED": pb.RUN_STATUS_FINISHED,
    "FAILED": pb.RUN_STATUS_FAILED,
    "KILLED": pb.RUN_STATUS_KILLED,
}


def _ts(millis: int | None) -> Timestamp | None:
    if not millis:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(int(millis))
    return ts


def experiment(e: Experiment) -> pb.Experiment:
    return pb.Experiment(
        experiment_id=e.experiment_id,
        name=e.name,
        artifact_location=e.artifact_location or "",
        lifecycle_stage=e.lifecycle_stage,
        tags=dict(e.tags or {}),
        create_time=_ts(e.creation_time),
        update_time=_ts(e.last_update_time),
    )


def metric(m: Metric) -> pb.Metric:
    return pb.Metric(key=m.key, value=m.value, step=m.step, time=_ts(m.timestamp))


def run(r: Run) -> pb.Run:
    info = r.info
    return pb.Run(
        run_id=info.run_id,
        run_name=info.run_name or "",
        experiment_id=info.experiment_id,
        status=_RUN_STATUS.get(info.status, pb.RUN_STATUS_UNSPECIFIED),
        start_time=_ts(info.start_time),
        end_time=_ts(info.end_time),
        artifact_uri=info.artifact_uri or "",
        lifecycle_stage=info.lifecycle_stage,
        params=dict(r.data.params),
        # data.metrics maps each key to its latest value only; the Metric objects (with step
        # and time) are what the run's proto carries.
        metrics=[
            metric(Metric.from_proto(m))
            for m in sorted(r.data.to_proto().metrics, key=lambda m: m.key)
        ],
        tags=dict(r.data.tags),
    )


def file_info(f: FileInfo) -> pb.FileInfo:
    return pb.FileInfo(path=f.path, is_dir=f.is_dir, file_size=f.file_size or 0)


def model_version(v: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=v.name,
        version=int(v.version),
        stage=v.current_stage or "None",
        aliases=sorted(v.aliases or []),
        run_id=v.run_id or "",
        source=v.source or "",
        status=v.status or "",
        description=v.description or "",
        tags=dict(v.tags or {}),
        create_time=_ts(v.creation_timestamp),
        update_time=_ts(v.last_updated_timestamp),
    )


def registered_model(m: RegisteredModel) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=m.name,
        description=m.description or "",
        aliases={alias: int(version) for alias, version in (m.aliases or {}).items()},
        latest_versions=[model_version(v) for v in m.latest_versions or []],
        tags=dict(m.tags or {}),
        create_time=_ts(m.creation_timestamp),
        update_time=_ts(m.last_updated_timestamp),
    )


def audit_event(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        event_id=e.event_id,
        time=_time(e.time),
        client=e.client,
        action=e.action,
        model_name=e.model_name,
        version=e.version,
        from_stage=e.from_stage,
        to_stage=e.to_stage,
        previous_version=e.previous_version,
        archived_versions=e.archived_versions,
        note=e.note,
    )


def comparison(c: Comparison) -> pb.MetricComparison:
    return pb.MetricComparison(
        metric_key=c.metric_key,
        higher_is_better=c.higher_is_better,
        candidate_value=c.candidate_value,
        production_version=c.production_version,
        production_value=c.production_value,
        worse=c.worse,
    )


MODES = {CANARY: pb.ROLLOUT_MODE_CANARY, SHADOW: pb.ROLLOUT_MODE_SHADOW}
_STATES = {
    RUNNING: pb.ROLLOUT_STATE_RUNNING,
    PROMOTED: pb.ROLLOUT_STATE_PROMOTED,
    ROLLED_BACK: pb.ROLLOUT_STATE_ROLLED_BACK,
    ABORTED: pb.ROLLOUT_STATE_ABORTED,
    SUPERSEDED: pb.ROLLOUT_STATE_SUPERSEDED,
}


def mode(m: int) -> str:
    """A request's RolloutMode as the domain's name ("" for one it does not know)."""
    return next((name for name, value in MODES.items() if value == m), "")


def guards(g: pb.RolloutGuards) -> Guards:
    """A request's guards (the domain checks them)."""

    def optional(field: str) -> float | None:
        return getattr(g, field) if g.HasField(field) else None

    return Guards(
        min_requests=g.min_requests,
        max_error_rate=optional("max_error_rate"),
        max_p99_latency_ms=optional("max_p99_latency_ms"),
        max_p99_latency_ratio=optional("max_p99_latency_ratio"),
        min_agreement=optional("min_agreement"),
        max_accuracy_drop=optional("max_accuracy_drop"),
        min_feedback=g.min_feedback,
    )


def _time(t: datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def _figures(f: VersionFigures) -> pb.VersionFigures:
    return pb.VersionFigures(
        version=f.version,
        requests=f.requests,
        errors=f.errors,
        error_rate=f.error_rate,
        p99_latency_ms=f.p99_latency_ms,
        feedback=f.feedback,
        correct=f.correct,
        accuracy=f.accuracy,
    )


def rollout(view: RolloutView) -> pb.Rollout:
    r, f = view.rollout, view.figures
    d = r.decision
    return pb.Rollout(
        rollout_id=r.rollout_id,
        model_name=r.model_name,
        production_version=r.production_version,
        candidate_version=r.candidate_version,
        mode=MODES[r.mode],
        weight=r.weight,
        weight_steps=r.weight_steps,
        step_interval_seconds=r.step_interval_s,
        guards=pb.RolloutGuards(**{k: v for k, v in r.guards.__dict__.items() if v is not None}),
        state=_STATES[r.state],
        production=_figures(f.production),
        candidate=_figures(f.candidate),
        shadow=pb.ShadowFigures(
            compared=f.shadow.compared,
            agreed=f.shadow.agreed,
            agreement=f.shadow.agreement,
            dropped=f.shadow.dropped,
        ),
        decision=pb.RolloutDecision(**d) if d else None,
        started_by=r.started_by,
        ended_by=r.ended_by,
        start_time=_time(r.create_time),
        end_time=_time(r.end_time),
    )
