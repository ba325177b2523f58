"""The SDK's calls, written once for the sync ``Client`` and the asyncio ``AsyncClient``.

Every method of ``MeshApi`` builds its request and describes the call (``Call``: which RPC,
whether it may be retried, what of the answer the caller gets, whether it pages); the two
clients differ only in how they make it (``_run``, ``_stream``). What a unary call does, with
its retries, deadline and pages, is ``MeshApi._plan``: a generator that says what to send and
how long to wait, and that each client drives its own way.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from mlmesh.datasets.v1 import datasets_pb2 as datasets
from mlmesh.datasets.v1 import datasets_pb2_grpc
from mlmesh.inference.v1 import inference_pb2 as inference
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh.registry.v1 import registry_pb2 as registry
from mlmesh.registry.v1 import registry_pb2_grpc
from mlmesh.training.v1 import sweep_pb2 as sweeps
from mlmesh.training.v1 import training_pb2 as training
from mlmesh.training.v1 import training_pb2_grpc
from mlmesh_client.errors import API_KEY_HEADER, MeshError, error_from
from mlmesh_client.images import ImageLike, Shape, to_image
from mlmesh_client.retry import RetryPolicy, Tries

DEFAULT_TARGET = "127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0
# During a canary rollout, requests with the same routing key are answered by the same version.
ROUTING_KEY_HEADER = "x-mlmesh-routing-key"
ROLLOUT_MODES = {"canary": registry.ROLLOUT_MODE_CANARY, "shadow": registry.ROLLOUT_MODE_SHADOW}
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
_STUBS = {
    "registry": registry_pb2_grpc.RegistryServiceStub,
    "training": training_pb2_grpc.TrainingServiceStub,
    "inference": inference_pb2_grpc.InferenceServiceStub,
    "datasets": datasets_pb2_grpc.DatasetServiceStub,
}


def _itself(answer: Any) -> Any:
    return answer


@dataclass
class Call:
    """One RPC as the SDK makes it. ``idempotent`` calls are retried on UNAVAILABLE;
    ``deadline`` False for calls whose length the caller's data decides (an upload); a
    ``pages`` call follows next_page_token and gives every item of that field."""

    service: str
    method: str
    request: Any  # a message, or an iterator of them for a client-streaming call
    idempotent: bool
    result: Callable[[Any], Any] = _itself
    pages: str = ""
    deadline: bool = True
    metadata: tuple[tuple[str, str], ...] = ()  # beside the API key (a routing key)


@dataclass(frozen=True)
class Send:
    """A step of a plan: send the request, with this much time left."""

    request: Any
    timeout_s: float | None


_UNSET: Any = object()
OnEvent = Callable[[Any], None] | None


@dataclass(frozen=True)
class Followed:
    """What ``train`` and ``sweep`` follow: the id field, the watch and the get methods."""

    id_field: str
    watch: str
    get: str


JOBS = Followed("job_id", "watch_training_job", "get_training_job")
SWEEPS = Followed("sweep_id", "watch_sweep", "get_sweep")


def channel_credentials(tls: bool, ca_file: str | os.PathLike[str] | None):
    """The TLS credentials for the gateway, or None for plain text (h2c): TLS when ``tls`` or
    a CA file is given (``ca_file``, else MLMESH_GATEWAY_CA_FILE)."""
    ca_file = ca_file or os.environ.get("MLMESH_GATEWAY_CA_FILE") or None
    if not tls and ca_file is None:
        return None
    root = None
    if ca_file is not None:
        try:
            root = Path(ca_file).read_bytes()
        except OSError as exc:
            raise MeshError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot read the CA file {ca_file}: {exc}"
            ) from None
    return grpc.ssl_channel_credentials(root_certificates=root)


class MeshApi:
    """What both clients do. ``target`` defaults to ``MLMESH_GATEWAY`` or 127.0.0.1:8000,
    ``api_key`` to ``MLMESH_API_KEY`` (read-only registry calls work without one);
    ``timeout_s`` is every unary call's deadline (None: none), ``retry`` how idempotent calls
    are retried on UNAVAILABLE. ``with_options`` changes either for some calls."""

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        *,
        tls: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target or os.environ.get("MLMESH_GATEWAY", DEFAULT_TARGET)
        self._api_key = api_key if api_key is not None else os.environ.get("MLMESH_API_KEY")
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._channel = self._open_channel(self.target, channel_credentials(tls, ca_file))
        self._stubs = {name: stub(self._channel) for name, stub in _STUBS.items()}

    def with_options(
        self, *, timeout_s: float | None = _UNSET, retry: RetryPolicy | None = None
    ) -> Self:
        """This client with another deadline or retry policy, on the same channel: for one
        call, ``mesh.with_options(timeout_s=2).predict(image)``; ``timeout_s=None``: no
        deadline. Close the client it came from, not this one."""
        other = copy.copy(self)
        if timeout_s is not _UNSET:
            other._timeout_s = timeout_s
        if retry is not None:
            other._retry = retry
        return other

    @staticmethod
    def _open_channel(target: str, credentials: grpc.ChannelCredentials | None) -> Any:
        """A channel to ``target``, TLS with ``credentials``, else plain text."""
        raise NotImplementedError

    def _metadata(self, call: Call) -> list[tuple[str, str]]:
        key = [(API_KEY_HEADER, self._api_key)] if self._api_key else []
        return [*key, *call.metadata]

    def _method(self, call: Call) -> Any:
        return getattr(self._stubs[call.service], call.method)

    def _error(self, err: grpc.RpcError) -> MeshError:
        return error_from(err, key_sent=bool(self._api_key))

    def _plan(self, call: Call) -> Generator[Send | float, Any, Any]:
        """A unary (or client-streaming) call: yields what to send (the answer, or the
        grpc.RpcError, comes back) and how long to wait between tries; returns the result,
        raises the MeshError that ends it. Each page is a call of its own."""
        items: list = []
        while True:
            tries = Tries(self._retry, call.idempotent, self._timeout_s if call.deadline else None)
            while True:
                answer = yield Send(call.request, tries.timeout_s())
                if not isinstance(answer, grpc.RpcError):
                    break
                wait = tries.wait_s(answer.code())
                if wait is None:
                    raise self._error(answer) from None
                yield wait
            if not call.pages:
                return call.result(answer)
            items += getattr(answer, call.pages)
            if not answer.next_page_token:
                return items
            call.request.page_token = answer.next_page_token

    def _run(self, call: Call) -> Any:
        """Make a unary call (the sync client: its result; the asyncio one: an awaitable)."""
        raise NotImplementedError

    def _stream(self, call: Call) -> Any:
        """Open a server-streaming call (an iterator of answers; an async one in asyncio). It
        has no deadline, since a stream is open-ended, and is not retried."""
        raise NotImplementedError

    def _read(self, service: str, method: str, request: Message, **how: Any) -> Any:
        return self._run(Call(service, method, request, idempotent=True, **how))

    def _change(self, service: str, method: str, request: Message, **how: Any) -> Any:
        return self._run(Call(service, method, request, idempotent=False, **how))

    def _submit(self, method: str, request: Any, result: Callable[[Any], Any]) -> Any:
        """A submission: idempotent, so retried, only when it carries an idempotency key."""
        return self._run(Call("training", method, request, bool(request.idempotency_key), result))

    def _follow(self, kind: Followed, submitted: Any, on_event: OnEvent) -> Any:
        """Follow a submitted job or sweep to its end (each event to ``on_event``), then get
        it again: the sync client returns it, the asyncio one an awaitable of it."""
        raise NotImplementedError

    # -- registry --------------------------------------------------------------------------
    def list_experiments(self, filter: str = "") -> list[registry.Experiment]:
        """Every active experiment matching an MLflow filter."""
        request = registry.ListExperimentsRequest(filter=filter)
        return self._read("registry", "ListExperiments", request, pages="experiments")

    def list_registered_models(self, filter: str = "") -> list[registry.RegisteredModel]:
        """Every registered model matching an MLflow filter."""
        request = registry.ListRegisteredModelsRequest(filter=filter)
        return self._read("registry", "ListRegisteredModels", request, pages="registered_models")

    def list_model_versions(self, name: str) -> list[registry.ModelVersion]:
        """Every version of a registered model, newest first."""
        request = registry.ListModelVersionsRequest(name=name)
        return self._read("registry", "ListModelVersions", request, pages="model_versions")

    def get_model_version(
        self, name: str, version: int = 0, *, alias: str = ""
    ) -> registry.ModelVersion:
        """One version of a registered model, by number or by alias ("production")."""
        request = registry.GetModelVersionRequest(name=name, version=version, alias=alias)
        return self._read("registry", "GetModelVersion", request, result=_model_version)

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
        (the answer's ``comparison`` has both values). Not retried: a transition is not
        idempotent.
        """
        request = registry.TransitionModelVersionRequest(
            model_name=name,
            version=version,
            stage=stage,
            archive_existing_versions=archive_existing,
            force=force,
        )
        return self._change("registry", "TransitionModelVersion", request)

    def list_audit_events(
        self, model_name: str = "", page_size: int = 20
    ) -> list[registry.AuditEvent]:
        """The newest audit events, optionally of one model (needs an API key)."""
        request = registry.ListAuditEventsRequest(model_name=model_name, page_size=page_size)
        return self._read("registry", "ListAuditEvents", request, result=_audit_events)

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
        identical bytes had made this version before (``created`` False). No deadline: a
        large upload is read, checked and stored before the answer."""
        if format not in DATASET_FORMATS:
            raise ValueError(f"format must be one of {', '.join(f for f in DATASET_FORMATS if f)}")
        height, width = resize or (0, 0)
        first = datasets.UploadDatasetRequest(
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
        messages = _upload_messages(first, path, on_progress)
        return self._run(Call("datasets", "UploadDataset", messages, False, deadline=False))

    def list_datasets(self) -> list[datasets.Dataset]:
        """Every dataset (its latest version), built-in ones first."""
        return self._read(
            "datasets", "ListDatasets", datasets.ListDatasetsRequest(), pages="datasets"
        )

    def get_dataset(self, name: str, version: int = 0) -> datasets.Dataset:
        """One version of a dataset; the latest when ``version`` is 0."""
        request = datasets.GetDatasetRequest(name=name, version=version)
        return self._read("datasets", "GetDataset", request, result=_dataset)

    def list_dataset_versions(self, name: str) -> list[datasets.Dataset]:
        """Every version of a dataset, newest first."""
        request = datasets.ListDatasetVersionsRequest(name=name)
        return self._read("datasets", "ListDatasetVersions", request, pages="datasets")

    def delete_dataset_version(self, name: str, version: int) -> datasets.Dataset:
        """Delete a version (refused while a queued or running job uses it)."""
        request = datasets.DeleteDatasetVersionRequest(name=name, version=version)
        return self._change("datasets", "DeleteDatasetVersion", request, result=_dataset)

    def dataset_sample(
        self, name: str, index: int, *, version: int = 0, split: str = "test"
    ) -> datasets.GetDatasetSampleResponse:
        """Sample ``index`` of a version's split (train, validation or test), with its label."""
        if split not in DATASET_SPLITS:
            raise ValueError(f"split must be one of {', '.join(DATASET_SPLITS)}")
        request = datasets.GetDatasetSampleRequest(
            name=name, version=version, index=index, split=DATASET_SPLITS[split]
        )
        return self._read("datasets", "GetDatasetSample", request)

    # -- training (needs an API key) ------------------------------------------------------
    def submit_training_job(self, **fields: object) -> training.TrainingJob:
        """Queue a job; fields are SubmitTrainingJobRequest's (epochs, learning_rate, ...).
        Retried on UNAVAILABLE only when it carries an ``idempotency_key``."""
        return self._submit("SubmitTrainingJob", training.SubmitTrainingJobRequest(**fields), _job)

    def get_training_job(self, job_id: str) -> training.TrainingJob:
        request = training.GetTrainingJobRequest(job_id=job_id)
        return self._read("training", "GetTrainingJob", request, result=_job)

    def list_training_jobs(self) -> list[training.TrainingJob]:
        """Every training job, newest first."""
        request = training.ListTrainingJobsRequest()
        return self._read("training", "ListTrainingJobs", request, pages="jobs")

    def cancel_training_job(self, job_id: str) -> training.TrainingJob:
        request = training.CancelTrainingJobRequest(job_id=job_id)
        return self._change("training", "CancelTrainingJob", request, result=_job)

    def watch_training_job(self, job_id: str) -> Iterator[training.WatchTrainingJobResponse]:
        """The job's events, history first, until the terminal one."""
        request = training.WatchTrainingJobRequest(job_id=job_id)
        return self._stream(Call("training", "WatchTrainingJob", request, False))

    def train(self, on_event: OnEvent = None, **fields: object) -> training.TrainingJob:
        """Submit a job (``fields`` as for ``submit_training_job``) and follow it to the end,
        each event (a WatchTrainingJobResponse) to ``on_event``; returns the finished job,
        whose ``state`` says how it ended."""
        return self._follow(JOBS, self.submit_training_job(**fields), on_event)

    # -- sweeps (need an API key) ---------------------------------------------------------
    def submit_sweep(self, **fields: object) -> sweeps.Sweep:
        """Start a hyperparameter sweep; fields are SubmitSweepRequest's. ``search_space`` may
        be given as JSON-shaped dicts, e.g. ``{"learning_rate": {"range": {"low": 1e-4,
        "high": 0.1, "scale": "SCALE_LOG"}}, "optimizer": {"choice": {"values": ["adam"]}}}``.
        Retried on UNAVAILABLE only when it carries an ``idempotency_key``."""
        request = json_format.ParseDict(
            {k: v for k, v in fields.items() if not hasattr(v, "DESCRIPTOR")},
            sweeps.SubmitSweepRequest(),
        )
        for key, value in fields.items():
            if hasattr(value, "DESCRIPTOR"):  # a message given as itself
                getattr(request, key).CopyFrom(value)
        return self._submit("SubmitSweep", request, _sweep)

    def get_sweep(self, sweep_id: str) -> sweeps.Sweep:
        request = sweeps.GetSweepRequest(sweep_id=sweep_id)
        return self._read("training", "GetSweep", request, result=_sweep)

    def list_sweeps(self) -> list[sweeps.Sweep]:
        """Every sweep, newest first."""
        return self._read("training", "ListSweeps", sweeps.ListSweepsRequest(), pages="sweeps")

    def cancel_sweep(self, sweep_id: str) -> sweeps.Sweep:
        request = sweeps.CancelSweepRequest(sweep_id=sweep_id)
        return self._change("training", "CancelSweep", request, result=_sweep)

    def watch_sweep(self, sweep_id: str) -> Iterator[sweeps.WatchSweepResponse]:
        """The sweep's events (trials started, epochs, trials ended, new bests), history
        first, until the terminal one."""
        request = sweeps.WatchSweepRequest(sweep_id=sweep_id)
        return self._stream(Call("training", "WatchSweep", request, False))

    def sweep(self, on_event: OnEvent = None, **fields: object) -> sweeps.Sweep:
        """Submit a sweep and follow it to the end (events: WatchSweepResponse); returns the
        finished sweep."""
        return self._follow(SWEEPS, self.submit_sweep(**fields), on_event)

    # -- inference (needs an API key) -----------------------------------------------------
    # An image is an array (height x width [x channels]) or a flat sequence of floats in
    # [0, 1], or uint8 intensities (bytes or a uint8 array), sent as they are; 784 flat values
    # are 28x28 grey. ``model_version`` is a version number or an alias ("staging"); empty
    # means the production version, and an empty ``model_name`` the service's default model.
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
        channels) or its array's dimensions. During a canary rollout, one ``routing_key`` (a
        user, a session) is always answered by one version."""
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
        routed = ((ROUTING_KEY_HEADER, routing_key),) if routing_key else ()
        return self._read("inference", "Predict", request, metadata=routed)

    def predict_batch(
        self, images: Iterable[ImageLike], *, model_name: str = "", model_version: str | int = ""
    ) -> inference.PredictBatchResponse:
        """The classes of many images, in order, all answered by one model version."""
        request = inference.PredictBatchRequest(
            images=[to_image(image) for image in images],
            model_name=model_name,
            model_version=str(model_version),
        )
        return self._read("inference", "PredictBatch", request)

    def predict_stream(
        self, images: Iterable[ImageLike], *, model_name: str = "", model_version: str | int = ""
    ) -> Iterator[inference.PredictStreamResponse]:
        """Answers to a stream of images, in order, as they come; ``request_id`` is each image's
        position ("0", "1", ...). ``images`` is read lazily, so it may be endless; an image
        that cannot be sent raises its error after the answers to the images before it."""
        requests = (
            inference.PredictStreamRequest(
                request_id=str(i),
                image=to_image(image),
                model_name=model_name,
                model_version=str(model_version),
            )
            for i, image in enumerate(images)
        )
        return self._stream(Call("inference", "PredictStream", Requests(requests), False))

    def submit_feedback(
        self, labels: Iterable[tuple[str, int]]
    ) -> inference.SubmitFeedbackResponse:
        """True labels of earlier answers, as (prediction_id, label) pairs; each id is scored
        against the version that answered it (once). Not retried: a label counts once."""
        request = inference.SubmitFeedbackRequest(
            feedback=[inference.Feedback(prediction_id=p, label=y) for p, y in labels]
        )
        return self._change("inference", "SubmitFeedback", request)

    # -- rollouts (need an API key) --------------------------------------------------------
    def start_rollout(
        self,
        model_name: str,
        candidate_version: int,
        *,
        mode: str = "canary",
        weight: int = 0,
        weight_steps: Iterable[int] = (),
        step_interval_s: float = 0.0,
        **guards: float,
    ) -> registry.Rollout:
        """Start a canary (``weight`` percent of requests, stepping up through
        ``weight_steps`` every ``step_interval_s``) or shadow rollout of a candidate version;
        ``guards`` are RolloutGuards fields (min_requests=200, max_accuracy_drop=0.02, ...)."""
        request = registry.StartRolloutRequest(
            model_name=model_name,
            candidate_version=candidate_version,
            mode=ROLLOUT_MODES.get(mode, registry.ROLLOUT_MODE_UNSPECIFIED),
            weight=weight,
            weight_steps=list(weight_steps),
            step_interval_seconds=step_interval_s,
            guards=registry.RolloutGuards(**guards) if guards else None,
        )
        return self._change("registry", "StartRollout", request, result=_rollout)

    def get_rollout(self, rollout_id: str) -> registry.Rollout:
        """One rollout with its live figures."""
        request = registry.GetRolloutRequest(rollout_id=rollout_id)
        return self._read("registry", "GetRollout", request, result=_rollout)

    def list_rollouts(self, model_name: str = "") -> list[registry.Rollout]:
        """Every rollout (of one model), newest first."""
        request = registry.ListRolloutsRequest(model_name=model_name, page_size=1000)
        return self._read("registry", "ListRollouts", request, pages="rollouts")

    def watch_rollout(self, rollout_id: str) -> Iterator[registry.WatchRolloutResponse]:
        """The rollout now and each time it changes (``.rollout``), until it ends."""
        request = registry.WatchRolloutRequest(rollout_id=rollout_id)
        return self._stream(Call("registry", "WatchRollout", request, False))

    def promote_rollout(self, rollout_id: str) -> registry.Rollout:
        """Promote a running rollout's candidate now."""
        request = registry.PromoteRolloutRequest(rollout_id=rollout_id)
        return self._change("registry", "PromoteRollout", request, result=_rollout)

    def abort_rollout(self, rollout_id: str, reason: str = "") -> registry.Rollout:
        """End a running rollout; production keeps serving."""
        request = registry.AbortRolloutRequest(rollout_id=rollout_id, reason=reason)
        return self._change("registry", "AbortRollout", request, result=_rollout)


def _model_version(answer: registry.GetModelVersionResponse) -> registry.ModelVersion:
    return answer.model_version


def _rollout(answer: Any) -> registry.Rollout:
    return answer.rollout


def _audit_events(answer: registry.ListAuditEventsResponse) -> list[registry.AuditEvent]:
    return list(answer.audit_events)


def _dataset(answer: Any) -> datasets.Dataset:
    return answer.dataset


def _job(answer: Any) -> training.TrainingJob:
    return answer.job


def _sweep(answer: Any) -> sweeps.Sweep:
    return answer.sweep


def _upload_messages(
    first: datasets.UploadDatasetRequest,
    path: str | os.PathLike[str],
    on_progress: Callable[[int, int], None] | None,
) -> Iterator[datasets.UploadDatasetRequest]:
    """The upload's messages: the options, then the file in chunks."""
    total = os.path.getsize(path)
    yield first
    sent = 0
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            sent += len(chunk)
            request = datasets.UploadDatasetRequest()
            request.file.data = chunk
            yield request
            if on_progress is not None:
                on_progress(sent, total)


class Requests:
    """Requests of a client-streaming call that end the stream at the first error, kept in
    ``error`` and raised by ``raise_error`` once the answers before it are in: gRPC reads
    request iterators on a thread (or a task) of its own and would turn the error into a bare
    CANCELLED call."""

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

    @staticmethod
    def raise_error(request: Any) -> None:
        if isinstance(request, Requests) and request.error is not None:
            raise request.error
