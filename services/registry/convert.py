"""MLflow entities and audit events to mlmesh.registry.v1 messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from mlflow.entities import Experiment, FileInfo, Metric, Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel

from mlmesh.registry.v1 import registry_pb2 as pb
from services.registry.audit import AuditEvent
from services.registry.registry import Comparison

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
    ts = Timestamp()
    ts.FromDatetime(e.time)
    return pb.AuditEvent(
        event_id=e.event_id,
        time=ts,
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
