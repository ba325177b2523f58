"""How a loaded model version runs: ONNX Runtime when the version carries an ONNX export,
otherwise the PyTorch model itself (eager, inference mode).

mlmesh's training logs an ONNX export beside every model (tracking.ONNX_PATH_IN_MODEL): on a
CPU, ONNX Runtime ran the CNN 2-3x faster than eager torch (bench/results/predict.md). A model
registered by other means, with only MLflow's pytorch flavor, still serves, through torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import mlflow.pytorch
import numpy as np
import onnxruntime
import torch

from services.common.errors import FailedPrecondition
from services.training.ml.catalog import IMAGE_PIXELS, NUM_CLASSES
from services.training.ml.tracking import ONNX_PATH_IN_MODEL


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
