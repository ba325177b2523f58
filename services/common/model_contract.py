"""The model contract: what a served model version takes and gives, read from the model.

When a version loads, its inputs and outputs (names, datatypes, shapes with -1 for "any
size") come from its MLflow signature, never from code:

- a tensor signature serves each tensor as itself, named as the signature names it, or
  ``input-<i>``/``output-<i>`` where it names none (MLServer's names);
- a column signature (a DataFrame model: scikit-learn's usual case) serves each column as one
  1-D tensor named after the column (shape ``[-1]``; ``[-1, 1]`` is accepted too, as MLServer
  gives it), and the model gets the columns back as a DataFrame;
- numeric datatypes, BOOL, and BYTES for string and binary columns; anything else (datetime
  columns, nested objects, arrays) is refused when the version loads.

A version without a signature, or without outputs in it, cannot be served, and says so. This
module owns the contract; the runtimes and both protocol faces (mlmesh's Predict, the Open
Inference Protocol) use it, and Training writes models that satisfy it. It also owns what
else a served model may carry: mlmesh's ONNX export inside its model directory, and the drift
reference (``input_reference.json`` in the version's run, format below).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument

# mlmesh's training logs an ONNX export of every model inside the model's directory (MLflow
# puts extra files under extra_files/); inference runs it with ONNX Runtime.
ONNX_FILE = "model.onnx"
ONNX_PATH_IN_MODEL = f"extra_files/{ONNX_FILE}"

# The Open Inference Protocol's tensor datatypes and their numpy element types. BYTES holds
# variable-length byte strings (one Python bytes object per element).
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
        "BYTES": np.object_,
    }.items()
}
_NUMPY_NAMES = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}

# MLflow's column types as protocol datatypes (MLServer maps them the same way).
_COLUMN_TYPES = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
}

INPUT_PREFIX = "input-"
OUTPUT_PREFIX = "output-"


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's datatype of a numpy element type (strings and objects are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    name = _NUMPY_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"numpy type {dtype} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a served model."""

    name: str
    datatype: str  # the protocol's name: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]  # -1: a dimension of any size

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


# What an MLflow model may say of itself in its metadata (``log_model(metadata=...)``):
# the names of its classes in output order, and for an image classifier whose input is a flat
# row, the image's [height, width, channels] (channels last). mlmesh's training writes both.
CLASS_NAMES_KEY = "mlmesh.class_names"
IMAGE_SHAPE_KEY = "mlmesh.image_shape"


@dataclass(frozen=True)
class ModelContract:
    """A version's tensors, how its model wants its inputs, and what it says of itself."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    columnar: bool  # a column signature: the model takes a DataFrame of the inputs
    class_names: tuple[str, ...] = ()  # in output order; empty when the model names none
    image_shape: tuple[int, int, int] | None = None  # (height, width, channels) of its images

    @property
    def batched(self) -> bool:
        """Whether every input's first dimension is a batch of any size: requests may then be
        stacked along it (dynamic batching) and answered row by row."""
        return all(len(t.shape) >= 1 and t.shape[0] == -1 for t in self.inputs)

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InvalidArgument(
            f"the model has no output {name!r}; its outputs are "
            + ", ".join(repr(o.name) for o in self.outputs)
        )

    def describe(self) -> str:
        return (
            f"inputs {', '.join(t.describe() for t in self.inputs)}; "
            f"outputs {', '.join(t.describe() for t in self.outputs)}"
        )

    def check_inputs(self, given: Sequence[RequestTensor]) -> dict[str, np.ndarray]:
        """The request's tensors as the model's inputs (name -> array of the declared type
        and the request's shape); InvalidArgument names the tensor and what the model takes.

        Every input is required, each once, and nothing else is accepted. Batched models need
        the same number of rows in every input.
        """
        by_name: dict[str, RequestTensor] = {}
        for tensor in given:
            if tensor.name in by_name:
                raise InvalidArgument(f"{tensor.field} repeats input {tensor.name!r}")
            by_name[tensor.name] = tensor
        wanted = {spec.name for spec in self.inputs}
        for tensor in given:
            if tensor.name not in wanted:
                raise InvalidArgument(
                    f"{tensor.field} is named {tensor.name!r}; the model takes "
                    + ", ".join(t.describe() for t in self.inputs)
                )
        arrays: dict[str, np.ndarray] = {}
        rows: set[int] = set()
        for spec in self.inputs:
            tensor = by_name.get(spec.name)
            if tensor is None:
                raise InvalidArgument(
                    f"input {spec.name!r} is missing; the model takes "
                    + ", ".join(t.describe() for t in self.inputs)
                )
            arrays[spec.name] = _conform(tensor, spec, self.columnar)
            if self.batched:
                rows.add(arrays[spec.name].shape[0])
        if len(rows) > 1:
            raise InvalidArgument(
                "the inputs have different numbers of rows ("
                + ", ".join(f"{n} {len(a)}" for n, a in arrays.items())
                + "); give every input the same first dimension"
            )
        return arrays


@dataclass(frozen=True)
class RequestTensor:
    """One tensor of a request, decoded by a protocol face."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # flat, of the datatype's element type (bytes objects for BYTES)
    field: str  # how errors name it, e.g. "inputs[0]"


def _conform(tensor: RequestTensor, spec: TensorSpec, columnar: bool) -> np.ndarray:
    what = f"{tensor.field} ({tensor.name})"
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"{what} has datatype {tensor.datatype}; the model takes {spec.datatype}"
        )
    shape = tensor.shape
    # A column may come as [N] or, as MLServer describes columns, [N, 1].
    if columnar and len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise InvalidArgument(
            f"{what} has shape {list(tensor.shape)}; the model takes {list(spec.shape)} "
            "(-1: any size)"
        )
    if tensor.data.size != math.prod(shape):
        raise InvalidArgument(
            f"{what} has {tensor.data.size} elements; shape {list(tensor.shape)} needs "
            f"{math.prod(shape)}"
        )
    return tensor.data.reshape(shape)


def contract_of(
    signature: Any, what: str, metadata: Mapping[str, Any] | None = None
) -> ModelContract:
    """The contract of a version whose MLflow model has ``signature`` (a ModelSignature or
    None) and ``metadata``; FailedPrecondition names ``what`` and what is missing."""
    if signature is None or signature.inputs is None:
        raise FailedPrecondition(
            f"{what} cannot be served: it has no signature. Log it with one, e.g. "
            "`mlflow.<flavor>.log_model(..., signature=mlflow.models.infer_signature(X, "
            "model.predict(X)))`"
        )
    if signature.outputs is None:
        raise FailedPrecondition(
            f"{what} cannot be served: its signature has no outputs, so its answers have no "
            "names or types. Log it with `infer_signature(X, model.predict(X))`"
        )
    columnar = not signature.inputs.is_tensor_spec()
    metadata = metadata or {}
    names = metadata.get(CLASS_NAMES_KEY) or ()
    shape = metadata.get(IMAGE_SHAPE_KEY)
    image_shape = None
    if (
        isinstance(shape, (list, tuple))
        and len(shape) == 3
        and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        image_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    return ModelContract(
        inputs=_tensors(signature.inputs, INPUT_PREFIX, what, "input"),
        outputs=_tensors(signature.outputs, OUTPUT_PREFIX, what, "output"),
        columnar=columnar,
        class_names=tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else (),
        image_shape=image_shape,
    )


def _tensors(schema: Any, prefix: str, what: str, kind: str) -> tuple[TensorSpec, ...]:
    specs = []
    for i, spec in enumerate(schema.inputs):
        name = spec.name or f"{prefix}{i}"
        if schema.is_tensor_spec():
            try:
                datatype = datatype_of(spec.type)
            except ValueError as exc:
                raise FailedPrecondition(
                    f"{what} cannot be served: {kind} {name!r}: {exc}"
                ) from exc
            specs.append(TensorSpec(name, datatype, tuple(int(d) for d in spec.shape)))
            continue
        column_type = getattr(spec.type, "name", None)
        datatype = _COLUMN_TYPES.get(column_type) if isinstance(column_type, str) else None
        if datatype is None:
            raise FailedPrecondition(
                f"{what} cannot be served: {kind} column {name!r} has type "
                f"{column_type or spec.type}; mlmesh "
                "serves numeric, boolean, string and binary columns"
            )
        specs.append(TensorSpec(name, datatype, (-1,)))
    if not specs:
        raise FailedPrecondition(f"{what} cannot be served: its signature has no {kind}s")
    if len({s.name for s in specs}) != len(specs):
        raise FailedPrecondition(f"{what} cannot be served: two {kind}s share a name")
    return tuple(specs)


# -- the drift reference -------------------------------------------------------------------------

# The file, in the version's run's artifacts. Its format (JSON):
#   {"inputs": {"<input name>": {"edges": [e0, ..., eK], "shares": [s1, ..., sK]}, ...}}
# One histogram per input feature: ``edges`` are K+1 increasing bin edges and ``shares`` the
# share of the training values in each bin (summing to 1). For a tensor input, every element
# is a value (an image's pixels all fall in one histogram); for a column input, its values.
# mlmesh's own models before this format logged {"histogram": [...], "bin_edges": [...]},
# the pixels of their one input; that is read as the first input's histogram.
DRIFT_REFERENCE = "input_reference.json"


@dataclass(frozen=True)
class FeatureReference:
    """The training distribution of one input: bin edges and the share in each bin."""

    edges: np.ndarray
    shares: np.ndarray


def drift_reference(
    inputs: Mapping[str, np.ndarray], bins: int = 10
) -> dict[str, dict[str, list[float]]]:
    """A drift reference of training ``inputs`` (name -> values; numeric ones only), in the
    format above: ``bins`` equal-width bins between each input's smallest and largest value."""
    found: dict[str, dict[str, list[float]]] = {}
    for name, values in inputs.items():
        array = np.asarray(values)
        if array.dtype.kind not in "biuf" or array.size == 0:
            continue
        array = array.astype(np.float64).ravel()
        low, high = float(array.min()), float(array.max())
        if high <= low:
            high = low + 1.0
        counts, edges = np.histogram(array, bins=bins, range=(low, high))
        found[name] = {"edges": edges.tolist(), "shares": (counts / counts.sum()).tolist()}
    return {"inputs": found}


def parse_drift_reference(text: str, contract: ModelContract) -> dict[str, FeatureReference]:
    """The features of a drift reference file that name numeric inputs of the contract;
    ValueError says what is wrong with the file."""
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError("a drift reference is a JSON object")
    if "inputs" not in document and "histogram" in document:
        shares = document["histogram"]
        edges = document.get("bin_edges") or np.linspace(0.0, 1.0, len(shares) + 1).tolist()
        document = {"inputs": {contract.inputs[0].name: {"edges": edges, "shares": shares}}}
    features = document.get("inputs")
    if not isinstance(features, dict):
        raise ValueError('a drift reference has "inputs": {name: {"edges", "shares"}}')
    numeric = {t.name for t in contract.inputs if t.datatype not in ("BYTES", "BOOL")}
    found = {}
    for name, feature in features.items():
        if name not in numeric:
            continue
        edges = np.asarray(feature["edges"], dtype=np.float64)
        shares = np.asarray(feature["shares"], dtype=np.float64)
        if (
            edges.ndim != 1
            or shares.ndim != 1
            or len(edges) != len(shares) + 1
            or len(shares) < 2
            or not np.all(np.diff(edges) > 0)
            or shares.sum() <= 0
        ):
            raise ValueError(f"input {name!r}: edges must be K+1 increasing values for K>=2 shares")
        found[name] = FeatureReference(edges, shares / shares.sum())
    return found
