"""A small SDK over the gateway's gRPC face; every call sends the API key when one is set."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from google.protobuf import json_format

from mlmesh.datasets.v1 import datasets_pb2 as datasets
from mlmesh.datasets.v1 import datasets_pb2_grpc
from mlmesh.inference.v1 import inference_pb2 as inference
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2 as registry
from mlmesh.registry.v1 import registry_pb2_grpc
from mlmesh.training.v1 import sweep_pb2 as sweeps
from mlmesh.training.v1 import training_pb2 as training
from mlmesh.training.v1 import training_pb2_grpc
from mlmesh_client.images import ImageLike, Shape, to_image

DEFAULT_TARGET = "127.0.0.1:8000"
UPLOAD_CHUNK_BYTES = 1 << 20  # well under a gRPC message's 4 MiB limit
DATASET_FORMATS = {
    "": datasets.DATASET_FORMAT_UNSPECIFIED,
    "image_folder": datasets.DATASET_FORMAT_IMAGE_FOLDER,
    "csv": datasets.DATASET_FORMAT_CSV,
    "parquet": datasets.DATASET_FORMAT_PARQUET,
    "npz": datasets.DATASET_FORMAT_NPZ,
}
DATASET_SPLITS = {
    "train": datasets.DATASET_SPLIT_TRAIN,
    "validation": datasets.DATASET_SPLIT_VALIDATION,
    "test": datasets.DATASET_SPLIT_TEST,
}


class MeshError(Exception):
    """A call failed; ``code`` is the gRPC status code and the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def gateway_channel(
    target: str, *, tls: bool = False, ca_file: str | os.PathLike[str] | None = None
) -> grpc.Channel:
    """A channel to the gateway: plain text (h2c), or TLS when ``tls`` or a CA file is given
    (``ca_file``, else MLMESH_GATEWAY_CA_FILE)."""
    ca_file = ca_file or os.environ.get("MLMESH_GATEWAY_CA_FILE") or None
    if not tls and ca_file is None:
        return grpc.insecure_channel(target)
    root = None
    if ca_file is not None:
        try:
            root = Path(ca_file).read_bytes()
        except OSError as exc:
            raise MeshError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot read the CA file {ca_file}: {exc}"
            ) from None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))


class Client:
    """mlmesh through its gateway.

    >>> with Client("127.0.0.1:8000", api_key="...") as mesh:
    ...     mesh.list_registered_models()

    ``target`` defaults to ``MLMESH_GATEWAY`` or 127.0.0.1:8000, ``api_key`` to
    ``MLMESH_API_KEY``. Read-only registry calls work without a key.

    A gateway that speaks TLS takes ``tls=True``: the client then trusts the system's CAs, or
    only the PEM file ``ca_file`` (default ``MLMESH_GATEWAY_CA_FILE``; naming one turns TLS
    on), e.g. the development certificate `python -m services.launcher dev-cert` writes.
    """

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        *,
        tls: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.target = target or os.environ.get("MLMESH_GATEWAY", DEFAULT_TARGET)
        self._api_key = api_key if api_key is not None else os.environ.get("MLMESH_API_KEY")
        self._timeout_s = timeout_s
        self._channel = gateway_channel(self.target, tls=tls, ca_file=ca_file)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self._channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self.datasets = datasets_pb2_grpc.DatasetServiceStub(self._channel)

    def _metadata(self) -> list[tuple[str, str]]:
        return [("x-api-key", self._api_key)] if self._api_key else []

    def _call(self, method, request, extra_metadata: Sequence[tuple[str, str]] = ()):
        try:
            metadata = [*self._metadata(), *extra_metadata]
            return method(request, metadata=metadata, timeout=self._timeout_s)
        except grpc.RpcError as err:
            raise MeshError(err.code(), err.details() or "") from None

    def _stream(self, method, request) -> Iterator:
        """A server-streaming call's answers; open-ended, so no deadline. Closing early cancels."""
        call = method(request, metadata=self._metadata())
        try:
            yield from call
        except grpc.RpcError as err:
            raise MeshError(err.code(), err.details() or "") from None
        finally:
            call.cancel()

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

    def promote(
        self,
        name: str,
        version: int,
        stage: str = "production",
        *,
        archive_existing: bool = False,
        force: bool = False,
    ) -> registry.TransitionModelVersionResponse:
        """Move a version to Production (the default), Staging or Archived (needs an API key);
        inference replicas serving that stage's alias switch to it within a second.

        Refused (FAILED_PRECONDITION) when the Inference service cannot load the version;
        and, unless ``force``, when the production version would be moved elsewhere (leaving
        none) or a production candidate is worse than production on the promotion metric
        (the answer's ``comparison`` has both values).
        """
        return self._call(
            self.registry.TransitionModelVersion,
            registry.TransitionModelVersionRequest(
                model_name=name,
                version=version,
                stage=stage,
                archive_existing_versions=archive_existing,
                force=force,
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

    # -- datasets (need an API key) -------------------------------------------------------
    def upload_dataset(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        label_column: str = "",
        format: str = "",
        resize: tuple[int, int] | None = None,
        validation_fraction: float = 0.0,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> datasets.UploadDatasetResponse:
        """Upload a file as a new version of dataset ``name``: a zip or tar of one folder of
        images per class, a CSV or Parquet table (``label_column``), or an .npz of x and y.
        ``format`` is one of DATASET_FORMATS (empty: from the file); ``on_progress(sent,
        total)`` follows the upload. The answer says what the server found, and whether
        identical bytes had made this version before (``created`` False)."""
        if format not in DATASET_FORMATS:
            raise ValueError(f"format must be one of {', '.join(f for f in DATASET_FORMATS if f)}")
        total = os.path.getsize(path)
        height, width = resize or (0, 0)

        def messages() -> Iterator[datasets.UploadDatasetRequest]:
            yield datasets.UploadDatasetRequest(
                name=name,
                format=DATASET_FORMATS[format],
                label_column=label_column,
                resize_height=height,
                resize_width=width,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction,
                split_seed=split_seed,
                filename=os.path.basename(path),
            )
            sent = 0
            with open(path, "rb") as f:
                while chunk := f.read(UPLOAD_CHUNK_BYTES):
                    sent += len(chunk)
                    request = datasets.UploadDatasetRequest()
                    request.file.data = chunk
                    yield request
                    if on_progress is not None:
                        on_progress(sent, total)

        try:
            # No deadline: a large upload is read, checked and stored before the answer.
            return self.datasets.UploadDataset(messages(), metadata=self._metadata())
        except grpc.RpcError as err:
            raise MeshError(err.code(), err.details() or "") from None

    def list_datasets(self) -> list[datasets.Dataset]:
        """Every dataset (its latest version), built-in ones first."""
        return self._all(self.datasets.ListDatasets, datasets.ListDatasetsRequest(), "datasets")

    def get_dataset(self, name: str, version: int = 0) -> datasets.Dataset:
        """One version of a dataset; the latest when ``version`` is 0."""
        request = datasets.GetDatasetRequest(name=name, version=version)
        return self._call(self.datasets.GetDataset, request).dataset

    def list_dataset_versions(self, name: str) -> list[datasets.Dataset]:
        """Every version of a dataset, newest first."""
        request = datasets.ListDatasetVersionsRequest(name=name)
        return self._all(self.datasets.ListDatasetVersions, request, "datasets")

    def delete_dataset_version(self, name: str, version: int) -> datasets.Dataset:
        """Delete a version (refused while a queued or running job uses it)."""
        request = datasets.DeleteDatasetVersionRequest(name=name, version=version)
        return self._call(self.datasets.DeleteDatasetVersion, request).dataset

    def dataset_sample(
        self, name: str, index: int, *, version: int = 0, split: str = "test"
    ) -> datasets.GetDatasetSampleResponse:
        """Sample ``index`` of a version's split (train, validation or test), with its label."""
        if split not in DATASET_SPLITS:
            raise ValueError(f"split must be one of {', '.join(DATASET_SPLITS)}")
        request = datasets.GetDatasetSampleRequest(
            name=name, version=version, index=index, split=DATASET_SPLITS[split]
        )
        return self._call(self.datasets.GetDatasetSample, request)

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
        request = training.WatchTrainingJobRequest(job_id=job_id)
        return self._stream(self.training.WatchTrainingJob, request)

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

    # -- sweeps (need an API key) ---------------------------------------------------------
    def submit_sweep(self, **fields: object) -> sweeps.Sweep:
        """Start a hyperparameter sweep; fields are SubmitSweepRequest's. ``search_space`` may
        be given as JSON-shaped dicts, e.g. ``{"learning_rate": {"range": {"low": 1e-4,
        "high": 0.1, "scale": "SCALE_LOG"}}, "optimizer": {"choice": {"values": ["adam"]}}}``."""
        request = json_format.ParseDict(
            {k: v for k, v in fields.items() if not hasattr(v, "DESCRIPTOR")},
            sweeps.SubmitSweepRequest(),
        )
        for key, value in fields.items():
            if hasattr(value, "DESCRIPTOR"):  # a message given as itself
                getattr(request, key).CopyFrom(value)
        return self._call(self.training.SubmitSweep, request).sweep

    def get_sweep(self, sweep_id: str) -> sweeps.Sweep:
        return self._call(self.training.GetSweep, sweeps.GetSweepRequest(sweep_id=sweep_id)).sweep

    def list_sweeps(self) -> list[sweeps.Sweep]:
        """Every sweep, newest first."""
        return self._all(self.training.ListSweeps, sweeps.ListSweepsRequest(), "sweeps")

    def cancel_sweep(self, sweep_id: str) -> sweeps.Sweep:
        request = sweeps.CancelSweepRequest(sweep_id=sweep_id)
        return self._call(self.training.CancelSweep, request).sweep

    def watch_sweep(self, sweep_id: str) -> Iterator[sweeps.WatchSweepResponse]:
        """The sweep's events (trials started, epochs, trials ended, new bests), history
        first, until the terminal one."""
        request = sweeps.WatchSweepRequest(sweep_id=sweep_id)
        return self._stream(self.training.WatchSweep, request)

    def sweep(
        self,
        on_event: Callable[[sweeps.WatchSweepResponse], None] | None = None,
        **fields: object,
    ) -> sweeps.Sweep:
        """Submit a sweep and follow it to the end; returns the finished sweep."""
        sweep = self.submit_sweep(**fields)
        for event in self.watch_sweep(sweep.sweep_id):
            if on_event is not None:
                on_event(event)
        return self.get_sweep(sweep.sweep_id)

    # -- inference (needs an API key) -----------------------------------------------------
    # An image is 784 floats in [0, 1] (a sequence or array, any shape of 784 values), or 784
    # uint8 intensities (bytes or a uint8 array), sent as they are. ``model_version`` is a
    # version number or an alias ("staging"); empty means the production version, and an
    # empty ``model_name`` the service's default model.
    def predict(
        self,
        image: ImageLike,
        *,
        model_name: str = "",
        model_version: str | int = "",
        shape: Shape | None = None,
        routing_key: str = "",
    ) -> inference.PredictResponse:
        """The class of one image (its name too, when the model names its classes), with the
        model version that answered, whether the answer was cached, and its prediction_id
        (for submit_feedback). The image's size comes from ``shape`` (height, width,
        channels) or its array's dimensions; 784 flat values are 28x28 grey. During a canary
        rollout, one ``routing_key`` (a user, a session) is always answered by one version."""
        pixels = to_image(image, shape)
        request = inference.PredictRequest(
            image=pixels.pixels,
            image_raw=pixels.raw,
            height=pixels.height,
            width=pixels.width,
            channels=pixels.channels,
            model_name=model_name,
            model_version=str(model_version),
        )
        keyed = [("x-mlmesh-routing-key", routing_key)] if routing_key else []
        return self._call(self.inference.Predict, request, keyed)

    def predict_batch(
        self, images: Iterable[ImageLike], *, model_name: str = "", model_version: str | int = ""
    ) -> inference.PredictBatchResponse:
        """The classes of many images, in order, all answered by one model version."""
        request = inference.PredictBatchRequest(
            images=[to_image(image) for image in images],
            model_name=model_name,
            model_version=str(model_version),
        )
        return self._call(self.inference.PredictBatch, request)

    def predict_stream(
        self, images: Iterable[ImageLike], *, model_name: str = "", model_version: str | int = ""
    ) -> Iterator[inference.PredictStreamResponse]:
        """Answers to a stream of images, in order, as they come; ``request_id`` is each image's
        position ("0", "1", ...). ``images`` is read lazily, so it may be endless."""
        requests = (
            inference.PredictStreamRequest(
                request_id=str(i),
                image=to_image(image),
                model_name=model_name,
                model_version=str(model_version),
            )
            for i, image in enumerate(images)
        )
        sent = _Requests(requests)
        yield from self._stream(self.inference.PredictStream, sent)
        if sent.error is not None:  # after the answers to the images before it
            raise sent.error

    # -- rollouts and feedback ----------------------------------------------------------------
    def start_rollout(
        self,
        model_name: str,
        candidate_version: int,
        *,
        mode: str = "canary",
        weight: int = 0,
        weight_steps: Sequence[int] = (),
        step_interval_s: float = 0.0,
        **guards: float,
    ) -> registry.Rollout:
        """Start a canary (``weight`` percent of requests, stepping up through
        ``weight_steps`` every ``step_interval_s``) or shadow rollout of a candidate version;
        ``guards`` are RolloutGuards fields (min_requests=200, max_accuracy_drop=0.02, ...)."""
        modes = {"canary": registry.ROLLOUT_MODE_CANARY, "shadow": registry.ROLLOUT_MODE_SHADOW}
        request = registry.StartRolloutRequest(
            model_name=model_name,
            candidate_version=candidate_version,
            mode=modes.get(mode, registry.ROLLOUT_MODE_UNSPECIFIED),
            weight=weight,
            weight_steps=list(weight_steps),
            step_interval_seconds=step_interval_s,
            guards=registry.RolloutGuards(**guards) if guards else None,
        )
        return self._call(self.registry.StartRollout, request).rollout

    def get_rollout(self, rollout_id: str) -> registry.Rollout:
        """One rollout with its live figures."""
        request = registry.GetRolloutRequest(rollout_id=rollout_id)
        return self._call(self.registry.GetRollout, request).rollout

    def list_rollouts(self, model_name: str = "") -> list[registry.Rollout]:
        """Every rollout (of one model), newest first."""
        request = registry.ListRolloutsRequest(model_name=model_name, page_size=1000)
        return self._all(self.registry.ListRollouts, request, "rollouts")

    def watch_rollout(self, rollout_id: str) -> Iterator[registry.Rollout]:
        """The rollout now and each time it changes, until it ends."""
        request = registry.WatchRolloutRequest(rollout_id=rollout_id)
        for answer in self._stream(self.registry.WatchRollout, request):
            yield answer.rollout

    def promote_rollout(self, rollout_id: str) -> registry.Rollout:
        """Promote a running rollout's candidate now."""
        request = registry.PromoteRolloutRequest(rollout_id=rollout_id)
        return self._call(self.registry.PromoteRollout, request).rollout

    def abort_rollout(self, rollout_id: str, reason: str = "") -> registry.Rollout:
        """End a running rollout; production keeps serving."""
        request = registry.AbortRolloutRequest(rollout_id=rollout_id, reason=reason)
        return self._call(self.registry.AbortRollout, request).rollout

    def submit_feedback(
        self, labels: Iterable[tuple[str, int]]
    ) -> inference.SubmitFeedbackResponse:
        """True labels of earlier answers: (prediction_id, label) pairs."""
        request = inference.SubmitFeedbackRequest(
            feedback=[inference.Feedback(prediction_id=p, label=y) for p, y in labels]
        )
        return self._call(self.inference.SubmitFeedback, request)

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


class _Requests:
    """Requests of a client-streaming call that end the stream at the first error, kept in
    ``error``: gRPC reads request iterators on a thread of its own and would turn the error
    into a bare CANCELLED call."""

    def __init__(self, requests: Iterator) -> None:
        self._requests = requests
        self.error: Exception | None = None

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise StopIteration from None
