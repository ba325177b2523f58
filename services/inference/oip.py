"""The Open Inference Protocol (KServe "V2") on mlmesh's one data plane.

Both of the protocol's faces, the gRPC service ``inference.GRPCInferenceService``
(oip_servicer.py) and the REST routes under ``/v2`` (oip_http.py), decode their tensors into
numpy and call OpenInference. It checks them against the model version's MLflow signature and
asks ``Inference.predict``, so the batching, the prediction cache, model loading and the
metrics are those of mlmesh's own Predict.

Registry-aware: a model is a registered model; a version is a number or an alias
(``production``, ``staging``), and none means production.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from services.common.errors import InvalidArgument
from services.inference.inputs import check_batch_size, check_pixels
from services.inference.repository import ModelRepository
from services.inference.runtime import TensorInfo
from services.inference.service import Inference

SERVER_NAME = "mlmesh"
SERVER_VERSION = metadata.version("mlmesh")
# The REST face takes and gives tensors as binary data after the JSON (Triton's extension).
EXTENSIONS = ("binary_tensor_data",)

# The protocol's tensor datatypes and their numpy element types (BYTES is not served: every
# model mlmesh serves takes numbers).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

# What runs a loaded version, in the protocol's (Triton's) platform names.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torch": "pytorch"}

# Parameters of extensions mlmesh does not implement: refused by name rather than ignored.
UNSUPPORTED_PARAMETERS = {
    "classification": "the classification extension is not supported; ask for the "
    "probabilities output and take its arg-max",
    "shared_memory_region": "the shared-memory extensions are not supported; send the data",
}


def datatype_name(dtype: np.dtype) -> str:
    """The protocol's name of a numpy element type."""
    return _NAMES.get(np.dtype(dtype), str(dtype))


def check_datatype(datatype: str, field: str) -> np.dtype:
    """The numpy element type of a protocol datatype; an error names the datatypes served."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{field}.datatype {datatype!r} is not a datatype mlmesh serves; use one of "
            + ", ".join(DATATYPES)
        )
    return dtype


def check_shape(shape: Sequence[int], field: str) -> tuple[int, ...]:
    """A tensor's shape: dimensions of 0 or more."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape {list(shape)} has a negative dimension")
    return tuple(int(d) for d in shape)


def decode_raw(raw: bytes, dtype: np.dtype, shape: tuple[int, ...], field: str) -> np.ndarray:
    """A tensor's little-endian bytes as a flat array, checked against its shape."""
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{field} has {len(raw)} bytes of data; shape {list(shape)} of "
            f"{datatype_name(dtype)} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<"))


def check_parameters(parameters: Iterable[str], field: str) -> None:
    """Refuse the parameters of extensions that are not implemented."""
    for name in parameters:
        if name in UNSUPPORTED_PARAMETERS:
            raise InvalidArgument(f"{field}.parameters.{name}: {UNSUPPORTED_PARAMETERS[name]}")


@dataclass(frozen=True)
class InputTensor:
    """One decoded input tensor of a request."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # flat, of the datatype's element type
    field: str  # how errors name it, e.g. "inputs[0]"


@dataclass(frozen=True)
class ModelMetadata:
    """What ModelMetadata answers."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


@dataclass(frozen=True)
class InferAnswer:
    """What ModelInfer answers: the version that answered and its one output tensor."""

    model_name: str
    model_version: str
    output: TensorInfo
    data: np.ndarray  # (N, classes), of the output's element type


class OpenInference:
    """The protocol's operations over the Inference domain and the model repository."""

    def __init__(
        self, inference: Inference, repository: ModelRepository, max_batch_images: int
    ) -> None:
        self._inference = inference
        self._repository = repository
        self._max_batch_images = max_batch_images
        # ServerReady: true once start-up (the default model's warm-up) is over, false again
        # when the process starts draining.
        self.ready = False

    async def model_ready(self, name: str, version: str) -> bool:
        """Whether that version is loaded; asking never loads it."""
        return await self._repository.is_loaded(_model_name(name), version)

    async def model_metadata(self, name: str, version: str) -> ModelMetadata:
        """The version's tensors (loading it if needed) and the model's registered versions."""
        name = _model_name(name)
        model = await self._repository.model(name, version)
        versions = await self._repository.versions(name)
        return ModelMetadata(
            name=name,
            versions=[str(v) for v in versions],
            platform=PLATFORMS.get(model.runtime.kind, model.runtime.kind),
            inputs=[model.input],
            outputs=[model.output],
        )

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Sequence[InputTensor],
        outputs: Sequence[str],
        *,
        read_cache: bool = True,
    ) -> InferAnswer:
        """Run ``inputs`` through the version; ``outputs`` names the outputs wanted (none:
        all)."""
        name = _model_name(name)
        model = await self._repository.model(name, version)
        expected = model.input
        if len(inputs) != 1:
            raise InvalidArgument(
                f"inputs has {len(inputs)} tensors; the model takes one, {expected.name!r}"
            )
        (tensor,) = inputs
        field = tensor.field
        if tensor.name != expected.name:
            raise InvalidArgument(
                f"{field} is named {tensor.name!r}; the model's input is {expected.name!r}"
            )
        if tensor.datatype != datatype_name(expected.dtype):
            raise InvalidArgument(
                f"{field} ({tensor.name}) has datatype {tensor.datatype}; the model takes "
                f"{datatype_name(expected.dtype)}"
            )
        if len(tensor.shape) != len(expected.shape) or any(
            want not in (-1, got) for want, got in zip(expected.shape, tensor.shape, strict=False)
        ):
            raise InvalidArgument(
                f"{field} ({tensor.name}) has shape {list(tensor.shape)}; the model takes "
                f"{list(expected.shape)} (-1: any size)"
            )
        if tensor.data.size != math.prod(tensor.shape):
            raise InvalidArgument(
                f"{field} ({tensor.name}) has {tensor.data.size} elements; shape "
                f"{list(tensor.shape)} needs {math.prod(tensor.shape)}"
            )
        check_batch_size(tensor.shape[0], self._max_batch_images, field)
        for i, wanted in enumerate(outputs):
            if wanted != model.output.name:
                raise InvalidArgument(
                    f"outputs[{i}] asks for {wanted!r}; the model's output is {model.output.name!r}"
                )
        images = tensor.data.reshape(tensor.shape[0], -1).astype(np.float32, copy=False)
        check_pixels(images, f"{field} ({tensor.name})")
        # By number: the version checked above is the one that answers, even if an alias
        # moves meanwhile.
        p = await self._inference.predict(images, name, str(model.version), read_cache=read_cache)
        return InferAnswer(
            model_name=p.model_name,
            model_version=str(p.model_version),
            output=model.output,
            data=p.probabilities.astype(model.output.dtype, copy=False),
        )


def _model_name(name: str) -> str:
    if not name.strip():
        raise InvalidArgument("the model name is empty: name a registered model")
    return name.strip()
