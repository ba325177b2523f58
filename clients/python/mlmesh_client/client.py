"""A small SDK over the gateway's gRPC face; every call sends the API key when one is set."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import TracebackType

import grpc

from mlmesh.registry.v1 import registry_pb2 as registry
from mlmesh.registry.v1 import registry_pb2_grpc
from mlmesh.training.v1 import training_pb2 as training
from mlmesh.training.v1 import training_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:8000"


class MeshError(Exception):
    """A call failed; ``code`` is the gRPC status code and the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class Client:
    """mlmesh through its gateway.

    >>> with Client("127.0.0.1:8000", api_key="...") as mesh:
    ...     mesh.list_registered_models()

    ``target`` defaults to ``MLMESH_GATEWAY`` or 127.0.0.1:8000, ``api_key`` to
    ``MLMESH_API_KEY``. Read-only registry calls work without a key.
    """

    def __init__(
        self, target: str | None = None, api_key: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.target = target or os.environ.get("MLMESH_GATEWAY", DEFAULT_TARGET)
        self._api_key = api_key if api_key is not None else os.environ.get("MLMESH_API_KEY")
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(self.target)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self._channel)

    def _metadata(self) -> list[tuple[str, str]]:
        return [("x-api-key", self._api_key)] if self._api_key else []

    def _call(self, method, request):
        try:
            return method(request, metadata=self._metadata(), timeout=self._timeout_s)
        except grpc.RpcError as err:
            raise MeshError(err.code(), err.details() or "") from None

    def _all(self, method, request, field: str) -> list:
        """Follow next_page_token until the last page; return every item."""
        items: list = []
        while True:
            page = self._call(method, request)
            items += getattr(page, field)
            if not page.next_page_token:
                return items
            request.page_token = page.next_page_token

    # -- registry --------------------------------------------------------------------------
    def list_experiments(self, filter: str = "") -> list[registry.Experiment]:
        """Every active experiment matching an MLflow filter."""
        request = registry.ListExperimentsRequest(filter=filter)
        return self._all(self.registry.ListExperiments, request, "experiments")

    def list_registered_models(self, filter: str = "") -> list[registry.RegisteredModel]:
        """Every registered model matching an MLflow filter."""
        request = registry.ListRegisteredModelsRequest(filter=filter)
        return self._all(self.registry.ListRegisteredModels, request, "registered_models")

    def list_model_versions(self, name: str) -> list[registry.ModelVersion]:
        """Every version of a registered model, newest first."""
        request = registry.ListModelVersionsRequest(name=name)
        return self._all(self.registry.ListModelVersions, request, "model_versions")

    def transition(
        self, name: str, version: int, stage: str, *, archive_existing: bool = False
    ) -> registry.TransitionModelVersionResponse:
        """Move a version to Production, Staging or Archived (needs an API key)."""
        return self._call(
            self.registry.TransitionModelVersion,
            registry.TransitionModelVersionRequest(
                model_name=name,
                version=version,
                stage=stage,
                archive_existing_versions=archive_existing,
            ),
        )

    def list_audit_events(
        self, model_name: str = "", page_size: int = 20
    ) -> list[registry.AuditEvent]:
        """The newest audit events, optionally of one model (needs an API key)."""
        page = self._call(
            self.registry.ListAuditEvents,
            registry.ListAuditEventsRequest(model_name=model_name, page_size=page_size),
        )
        return list(page.audit_events)

    # -- training (needs an API key) ------------------------------------------------------
    def submit_training_job(self, **fields: object) -> training.TrainingJob:
        """Queue a job; fields are SubmitTrainingJobRequest's (epochs, learning_rate, ...)."""
        request = training.SubmitTrainingJobRequest(**fields)
        return self._call(self.training.SubmitTrainingJob, request).job

    def get_training_job(self, job_id: str) -> training.TrainingJob:
        request = training.GetTrainingJobRequest(job_id=job_id)
        return self._call(self.training.GetTrainingJob, request).job

    def cancel_training_job(self, job_id: str) -> training.TrainingJob:
        request = training.CancelTrainingJobRequest(job_id=job_id)
        return self._call(self.training.CancelTrainingJob, request).job

    def watch_training_job(self, job_id: str) -> Iterator[training.WatchTrainingJobResponse]:
        """The job's events, history first, until the terminal one."""
        stream = self.training.WatchTrainingJob(
            training.WatchTrainingJobRequest(job_id=job_id), metadata=self._metadata()
        )
        try:
            yield from stream
        except grpc.RpcError as err:
            raise MeshError(err.code(), err.details() or "") from None

    def train(
        self,
        on_event: Callable[[training.WatchTrainingJobResponse], None] | None = None,
        **fields: object,
    ) -> training.TrainingJob:
        """Submit a job and follow it to the end; returns the finished job."""
        job = self.submit_training_job(**fields)
        for event in self.watch_training_job(job.job_id):
            if on_event is not None:
                on_event(event)
        return self.get_training_job(job.job_id)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
