"""The Open Inference Protocol (KServe "V2") on mlmesh's one data plane.

Both of the protocol's faces, the gRPC service ``inference.GRPCInferenceService``
(oip_servicer.py) and the REST routes under ``/v2`` (oip_http.py), decode their tensors into
numpy and call OpenInference. It checks them against the version's model contract (read from
its MLflow signature: services/common/model_contract.py) and asks ``Inference.answer``, so the
batching, the prediction cache, model loading and the metrics are those of mlmesh's own
Predict, for every model mlmesh serves.

Registry-aware: a model is a registered model; a version is a number or an alias
(``production``, ``staging``), and none means production.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from services.common.errors import InvalidArgument
from services.common.model_contract import DATATYPES, RequestTensor, TensorSpec, datatype_of
from services.inference.inputs import check_batch_size
from services.inference.repository import ModelRepository
from services.inference.service import Inference

SERVER_NAME = "mlmesh"
SERVER_VERSION = metadata.version("mlmesh")
# The REST face takes and gives tensors as binary data after the JSON (Triton's extension).
EXTENSIONS = ("binary_tensor_data",)

# What runs a loaded version, in the protocol's (Triton's) platform names where it has them.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torch": "pytorch", "pyfunc": "mlflow_pyfunc"}

# Parameters of extensions mlmesh does not implement: refused by name rather than ignored.
UNSUPPORTED_PARAMETERS = {
    "classification": "the classification extension is not supported; ask for the "
    "probabilities output and take its arg-max",
    "shared_memory_region": "the shared-memory extensions are not supported; send the data",
}


def datatype_name(dtype: np.dtype) -> str:
    """The protocol's name of a numpy element type."""
    return datatype_of(dtype)


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
    """A tensor's raw bytes as a flat array, checked against its shape: little-endian numbers,
    or for BYTES each element as a 4-byte little-endian length and its bytes."""
    count = math.prod(shape)
    if dtype.kind == "O":
        items, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidArgument(f"{field}: a BYTES element's 4-byte length is cut short")
            (size,) = struct.unpack_from("<I", raw, at)
            if at + 4 + size > len(raw):
                raise InvalidArgument(
                    f"{field}: a BYTES element claims {size} bytes; {len(raw) - at - 4} are left"
                )
            items.append(raw[at + 4 : at + 4 + size])
            at += 4 + size
        if len(items) != count:
            raise InvalidArgument(
                f"{field} has {len(items)} BYTES elements; shape {list(shape)} needs {count}"
            )
        return bytes_array(items)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{field} has {len(raw)} bytes of data; shape {list(shape)} of "
            f"{datatype_name(dtype)} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<"))


def encode_raw(array: np.ndarray) -> bytes:
    """An output's raw bytes (decode_raw's format)."""
    if array.dtype.kind == "O":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel().tolist())
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def bytes_array(items: Iterable[bytes]) -> np.ndarray:
    """A flat BYTES array (numpy objects, one bytes object each)."""
    listed = list(items)
    array = np.empty(len(listed), dtype=object)
    array[:] = listed
    return array


def check_parameters(parameters: Iterable[str], field: str) -> None:
    """Refuse the parameters of extensions that are not implemented."""
    for name in parameters:
        if name in UNSUPPORTED_PARAMETERS:
            raise InvalidArgument(f"{field}.parameters.{name}: {UNSUPPORTED_PARAMETERS[name]}")


@dataclass(frozen=True)
class ModelMetadata:
    """What ModelMetadata answers."""

    name: str
    versions: list[str]
    platform: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]


@dataclass(frozen=True)
class InferAnswer:
    """What ModelInfer answers: the version that answered and its outputs, in the order
    asked for (all of them, in the contract's order, when none were named)."""

    model_name: str
    model_version: str
    outputs: list[tuple[TensorSpec, np.ndarray]]
    # The answer's prediction ids for SubmitFeedback, one per row, joined by commas (the
    # response parameter "prediction_id").
    prediction_id: str = ""


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
            inputs=model.contract.inputs,
            outputs=model.contract.outputs,
        )

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Sequence[RequestTensor],
        outputs: Sequence[str],
        *,
        read_cache: bool = True,
        routing_key: str = "",
    ) -> InferAnswer:
        """Run ``inputs`` through the version; ``outputs`` names the outputs wanted (none:
        all). Without a version, a rollout of the model may pick it (sticky by
        ``routing_key``)."""
        routed = await self._inference.route(_model_name(name), version, routing_key)
        model = routed.model
        arrays = model.contract.check_inputs(inputs)
        if model.contract.batched:
            rows = len(next(iter(arrays.values())))
            check_batch_size(rows, self._max_batch_images, "inputs", "rows")
        for i, wanted in enumerate(outputs):
            if wanted not in {o.name for o in model.contract.outputs}:
                raise InvalidArgument(
                    f"outputs[{i}] asks for {wanted!r}; the model's outputs are "
                    + ", ".join(repr(o.name) for o in model.contract.outputs)
                )
        answer = await self._inference.answer(routed, arrays, outputs, read_cache=read_cache)
        return InferAnswer(
            model_name=answer.model_name,
            model_version=str(answer.model_version),
            outputs=[(model.contract.output(n), a) for n, a in answer.outputs.items()],
            prediction_id=",".join(answer.prediction_ids),
        )


def _model_name(name: str) -> str:
    if not name.strip():
        raise InvalidArgument("the model name is empty: name a registered model")
    return name.strip()
