"""One training run in MLflow: a small store over an explicit MlflowClient.

Params, metrics, tags, artifacts and the dataset go through ``MlflowClient(tracking_uri=...)``.
Only logging and registering the model need MLflow's process-wide tracking URI (the flavor
and ``register_model`` use the default client); it is set for those two calls alone and put
back afterwards, and training runs in a process of its own anyway (services/training/child.py).
torch is imported only where a model is logged, so sweeps can drive their parent runs from
the Training service without loading it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import Schema, TensorSpec

from services.common.model_contract import CLASS_NAMES_KEY, IMAGE_SHAPE_KEY, ONNX_FILE
from services.datasets.store import dataset_input

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"
REGISTRATION_TIMEOUT_S = 300.0
# MLflow 3's experiment tag for what an experiment holds, and its value for model training
# (the UI's "Machine learning" kind, as opposed to "genai_development"; see
# mlflow/server/js's ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_HTTP_5XX = re.compile(r"\berror code 5\d\d\b|\bstatus code 5\d\d\b|\b5\d\d Server Error\b")
_CONNECTION_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.RetryError,
    ConnectionError,
    TimeoutError,
)


# What skops must trust to load the scikit-learn models training makes (gradient boosting's
# decision trees), recorded in the model's flavor configuration for whoever loads it.
SKLEARN_TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)


def signature(features: int, classes: int) -> ModelSignature:
    """What a served network takes and gives: a batch of flat rows (an image's pixels, channels
    last, or a table's features), one probability per class each."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, features))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )


def model_metadata(
    class_names: Sequence[str], image_shape: Sequence[int] | None
) -> dict[str, object]:
    """What a served model says of itself (services/common/model_contract.py): its classes,
    and an image classifier's image size (its input is a flat row)."""
    metadata: dict[str, object] = {CLASS_NAMES_KEY: list(class_names)}
    if image_shape is not None:
        metadata[IMAGE_SHAPE_KEY] = [int(d) for d in image_shape]
    return metadata


def run_name(
    architecture: str,
    dataset: str,
    optimizer: str,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    trial: int | None = None,
) -> str:
    """A training run's name in MLflow's UI, saying what it trained (its job id is the tag
    ``mlmesh.job_id``): ``cnn-mnist-adam-lr0.001-bs128-e3``; a sweep's trial, under the
    sweep's run that names the dataset, ``trial-3-cnn-adam-lr0.0013-bs224-e3``."""
    hyperparameters = f"{optimizer}-lr{learning_rate:.2g}-bs{batch_size}-e{epochs}"
    if trial is None:
        return f"{architecture}-{dataset}-{hyperparameters}"
    return f"trial-{trial}-{architecture}-{hyperparameters}"


def sweep_run_name(dataset: str, strategy: str, max_trials: int) -> str:
    """A sweep's parent run's name (its sweep id is the tag ``mlmesh.sweep_id``):
    ``sweep-mnist-tpe-10-trials``."""
    return f"sweep-{dataset}-{strategy}-{max_trials}-trials"


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it was raised from) says MLflow could not be reached.

    Connection failures, timeouts, exhausted retries and HTTP 5xx answers are transient;
    MLflow's 4xx answers (bad names, missing things) are not.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _CONNECTION_ERRORS):
            return True
        if isinstance(current, RestException) and current.get_http_status_code() >= 500:
            return True
        if isinstance(current, MlflowException) and _HTTP_5XX.search(current.message):
            return True
        current = current.__cause__ or current.__context__
    return False


def pip_requirements() -> list[str]:
    """The logged model's requirements, stated: MLflow would infer them by loading the model
    in a subprocess, which takes seconds per job."""
    import torch

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
    ]


class RunTracker:
    """The MLflow run of one training attempt."""

    def __init__(self, client: MlflowClient, tracking_uri: str, run_id: str) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    @classmethod
    def open(
        cls, tracking_uri: str, experiment_name: str, run_name: str, tags: dict[str, str]
    ) -> RunTracker:
        """Create the run (and the experiment when missing)."""
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, experiment_name)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, tracking_uri, run.info.run_id)

    def log_params(self, params: dict[str, object]) -> None:
        """Log ``params`` (stringified) in one request."""
        items = [Param(key, str(value)) for key, value in params.items()]
        self.client.log_batch(self.run_id, params=items)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` in one request."""
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_dataset(self, name: str, digest: str, summary: dict[str, object]) -> None:
        """Record the dataset version as the run's training input: the same MLflow dataset
        (name and digest) its upload recorded, so the UI shows which data a model came from."""
        self.client.log_inputs(
            self.run_id, datasets=[dataset_input(name, digest, summary, "training")]
        )

    def log_artifacts(self, directory: Path) -> None:
        """Upload every file of ``directory`` to the run's artifact root."""
        self.client.log_artifacts(self.run_id, str(directory))

    def _logged_model_id(self) -> str:
        # The LoggedModel is created here, in the run's experiment: left to log_model, MLflow
        # files it under the fluent API's active experiment, which is experiment 0 ("Default")
        # in a process that never called set_experiment, and the run's page then lists no
        # logged model.
        run = self.client.get_run(self.run_id)
        logged = self.client.create_logged_model(
            run.info.experiment_id,
            name=MODEL_NAME_IN_RUN,
            source_run_id=self.run_id,
            params=run.data.params,
        )
        return logged.model_id

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        model_signature: ModelSignature,
        metadata: dict[str, object],
    ) -> ModelInfo:
        """Log ``model`` (CPU, eval mode, outputs probabilities) in torch.export's pt2 format,
        with an ONNX export of it beside (model_contract.ONNX_PATH_IN_MODEL) for serving.

        pt2 rather than pickle: MLflow 3.17 refuses to unpickle models unless
        MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set, while a pt2 archive loads anywhere with
        ``mlflow.pyfunc.load_model`` and needs none of mlmesh's code (the graph is traced).
        The example must have more than one row for the batch dimension to stay dynamic.
        """
        import mlflow.pytorch

        with tempfile.TemporaryDirectory(prefix="mlmesh-onnx-") as tmp:
            onnx_path = Path(tmp) / ONNX_FILE
            export_onnx(model, input_example, onnx_path)
            model_id = self._logged_model_id()
            with _global_tracking_uri(self.tracking_uri):
                return mlflow.pytorch.log_model(
                    model,
                    name=MODEL_NAME_IN_RUN,
                    run_id=self.run_id,
                    model_id=model_id,
                    signature=model_signature,
                    input_example=input_example,
                    serialization_format="pt2",
                    pip_requirements=pip_requirements(),
                    extra_files=[str(onnx_path)],
                    metadata=metadata,
                )

    def log_sklearn_model(
        self, model: object, input_example: object, metadata: dict[str, object]
    ) -> ModelInfo:
        """Log a scikit-learn classifier in the sklearn flavor, served through pyfunc as its
        class probabilities (``predict_proba``), with a column signature of its features."""
        import mlflow.sklearn
        import sklearn

        proba = model.predict_proba(input_example)  # type: ignore[attr-defined]
        model_id = self._logged_model_id()
        with _global_tracking_uri(self.tracking_uri):
            return mlflow.sklearn.log_model(
                model,
                name=MODEL_NAME_IN_RUN,
                run_id=self.run_id,
                model_id=model_id,
                signature=mlflow.models.infer_signature(input_example, proba),
                input_example=input_example,
                pyfunc_predict_fn="predict_proba",
                # MLflow saves with skops, which loads only the types it is told to trust;
                # the trees are the one type a gradient-boosting model adds, made here.
                skops_trusted_types=list(SKLEARN_TRUSTED_TYPES),
                pip_requirements=[
                    f"scikit-learn=={sklearn.__version__}",
                    f"mlflow=={mlflow.__version__}",
                ],
                metadata=metadata,
            )

    def register(self, model_uri: str, model_name: str, tags: dict[str, str]) -> int:
        """Register a logged model (``ModelInfo.model_uri``) as a new version of
        ``model_name``; wait until READY."""
        with _global_tracking_uri(self.tracking_uri):
            version = mlflow.register_model(
                model_uri, model_name, await_registration_for=0, tags=tags
            )
        deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
        while True:
            current = self.client.get_model_version(model_name, version.version)
            if current.status == "READY":
                return int(current.version)
            if current.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise RuntimeError(
                    f"model {model_name} version {current.version} is {current.status}: "
                    f"{current.status_message or 'registration did not finish'}"
                )
            time.sleep(0.5)

    def end(self, status: str) -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def end_quietly(self, status: str) -> None:
        """End the run as ``status`` on the way out of an error; a failure here is only logged."""
        try:
            self.end(status)
        except Exception:
            log.warning("could not mark MLflow run %s %s", self.run_id, status, exc_info=True)

    def status(self) -> str:
        """The run's status as MLflow holds it (RUNNING, FINISHED, FAILED, KILLED)."""
        return self.client.get_run(self.run_id).info.status


def export_onnx(model: torch.nn.Module, input_example: np.ndarray, path: Path) -> None:
    """Export ``model`` to ONNX at ``path`` with a dynamic batch dimension (input "x")."""
    import torch

    example = torch.from_numpy(np.ascontiguousarray(input_example, dtype=np.float32))
    # The exporter's graph passes log every step at INFO; a job's log needs none of it.
    for chatty in ("onnxscript", "onnx_ir"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["x"],
        output_names=["probabilities"],
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        optimize=True,
        verbose=False,
    )
    program.save(str(path))


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing, marked as model training."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except RestException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another job created it between our look and our create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"experiment_name {name!r} names a deleted MLflow experiment; restore it or pick "
            "another name"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before mlmesh set it, or by hand
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
        )
    return experiment.experiment_id
