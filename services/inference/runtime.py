"""How a loaded model version runs: ONNX Runtime when the version carries an ONNX export,
otherwise the PyTorch model itself (eager, inference mode).

mlmesh's training logs an ONNX export beside every model (tracking.ONNX_PATH_IN_MODEL): on a
CPU, ONNX Runtime ran the CNN 2-3x faster than eager torch (bench/results/predict.md). A model
registered by other means, with only MLflow's pytorch flavor, still serves, through torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import mlflow.models
import mlflow.pytorch
import numpy as np
import onnxruntime
import torch

from services.common.errors import FailedPrecondition
from services.training.ml.catalog import IMAGE_PIXELS, NUM_CLASSES
from services.training.ml.tracking import ONNX_PATH_IN_MODEL

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """A forward pass: (N, 784) float32 in [0, 1] → (N, 10) float32 probabilities."""

    kind: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class OnnxRuntime:
    """An ONNX Runtime session on the CPU."""

    kind = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: images})[0]


class TorchRuntime:
    """The model's own PyTorch module, in inference mode."""

    kind = "torch"

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._module(torch.from_numpy(images)).numpy()


@dataclass(frozen=True)
class TensorInfo:
    """A served model's input or output tensor, as its MLflow signature describes it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1: a dimension of any size


# What every served model takes and gives (load_runtime checks it), named as MLServer names
# the tensors of a signature that names none.
DEFAULT_INPUT = TensorInfo("input-0", np.dtype(np.float32), (-1, IMAGE_PIXELS))
DEFAULT_OUTPUT = TensorInfo("output-0", np.dtype(np.float32), (-1, NUM_CLASSES))


def model_tensors(model_dir: Path, what: str) -> tuple[TensorInfo, TensorInfo]:
    """The input and output tensors of the MLflow model in ``model_dir``, from its signature.

    A signature of one tensor in and one out gives names, element types and shapes; without
    one (or with a column-based one), the tensors are DEFAULT_INPUT and DEFAULT_OUTPUT.
    """
    signature = mlflow.models.Model.load(str(model_dir)).signature
    if (
        signature is None
        or signature.outputs is None
        or not signature.inputs.is_tensor_spec()
        or not signature.outputs.is_tensor_spec()
        or len(signature.inputs.inputs) != 1
        or len(signature.outputs.inputs) != 1
    ):
        log.info("%s has no one-tensor signature; its tensors are %s and %s",
                 what, DEFAULT_INPUT.name, DEFAULT_OUTPUT.name)  # fmt: skip
        return DEFAULT_INPUT, DEFAULT_OUTPUT
    (given,), (answered,) = signature.inputs.inputs, signature.outputs.inputs
    return (
        TensorInfo(given.name or DEFAULT_INPUT.name, given.type, tuple(given.shape)),
        TensorInfo(answered.name or DEFAULT_OUTPUT.name, answered.type, tuple(answered.shape)),
    )


def load_runtime(model_dir: Path, threads: int, what: str) -> Runtime:
    """Load the model saved in ``model_dir`` (an MLflow model directory) and check that it
    maps a batch of 784-pixel images to ten probabilities each.

    ``what`` names the model version in errors.
    """
    onnx_path = model_dir / ONNX_PATH_IN_MODEL
    runtime: Runtime
    if onnx_path.exists():
        runtime = OnnxRuntime(onnx_path, threads)
    else:
        try:
            module = mlflow.pytorch.load_model(str(model_dir))
        except Exception as exc:
            raise FailedPrecondition(
                f"{what} cannot be served: it is neither an mlmesh model (ONNX export) nor a "
                f"PyTorch model MLflow can load ({type(exc).__name__}: {exc})"
            ) from exc
        runtime = TorchRuntime(module)
    _check(runtime, what)
    return runtime


def _check(runtime: Runtime, what: str) -> None:
    probe = np.zeros((2, IMAGE_PIXELS), dtype=np.float32)
    try:
        out = np.asarray(runtime(probe))
    except Exception as exc:
        raise FailedPrecondition(
            f"{what} cannot be served: it does not take a (N, {IMAGE_PIXELS}) float32 batch "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if out.shape != (2, NUM_CLASSES):
        raise FailedPrecondition(
            f"{what} cannot be served: it answers shape {out.shape} for 2 images; "
            f"mlmesh serves classifiers that answer (N, {NUM_CLASSES}) probabilities"
        )
    if not np.allclose(out.sum(axis=1), 1.0, atol=1e-3) or (out < 0).any():
        raise FailedPrecondition(
            f"{what} cannot be served: its outputs are not probabilities (rows must be "
            "non-negative and sum to 1; end the model with a softmax)"
        )
