"""What runs a loaded model version, chosen by its MLflow flavor.

- an ``onnx`` flavor, or mlmesh's own ONNX export inside the model (ONNX_PATH_IN_MODEL): ONNX
  Runtime (on a CPU it ran mlmesh's CNN 2-3x faster than eager torch);
- a ``pytorch`` flavor: the module itself, in inference mode;
- on a CUDA device (MLMESH_INFERENCE_DEVICE): torch on the GPU for a version with a pytorch
  flavor, even when it has an ONNX export, unless the installed ONNX Runtime has its CUDA
  provider (the ``onnxruntime`` package mlmesh installs has not: ``onnxruntime-gpu`` is the
  same module in another distribution, and pip installs the two over each other);
- anything else with a ``python_function`` flavor (scikit-learn, XGBoost, LightGBM, a custom
  pyfunc): ``mlflow.pyfunc``, in process.

Every runtime maps the contract's named input arrays to the contract's named output arrays.
All of them block: the batcher calls them in its executor, never on the event loop.

Loading a pickled model (pytorch, most pyfuncs) runs code from the artifact store, so
whoever may register and promote versions can make this service run code.
``MLMESH_INFERENCE_FLAVORS`` restricts which flavors load; ONNX (a graph, data rather than
code) always does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import mlflow.models
import mlflow.pyfunc
import numpy as np

from services.common.errors import FailedPrecondition
from services.common.model_contract import ONNX_PATH_IN_MODEL, ModelContract, TensorSpec

log = logging.getLogger(__name__)

ONNX, PYTORCH, PYFUNC = "onnx", "pytorch", "python_function"
FLAVORS = (ONNX, PYTORCH, PYFUNC)


class ModelRaised(Exception):
    """The model's own code failed on a request (its type and message say how)."""


CPU, CUDA = "cpu", "cuda"


def cuda_available() -> bool:
    """Whether a CUDA device can run torch here: an NVIDIA device node, and torch (a CUDA
    build) seeing it. torch is imported only where such a node exists."""
    if not Path("/dev/nvidiactl").exists() and not Path("/dev/nvidia0").exists():
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(setting: str) -> str:
    """The device MLMESH_INFERENCE_DEVICE names: ``auto`` is CUDA when cuda_available(), else
    the CPU; ``cuda`` where there is none is refused, saying so."""
    if setting == CPU or (setting == "auto" and not cuda_available()):
        return CPU
    if setting == CUDA and not cuda_available():
        raise RuntimeError(
            "MLMESH_INFERENCE_DEVICE=cuda, but no CUDA device is usable here (no NVIDIA device "
            "node, or torch does not see one); use auto or cpu"
        )
    return CUDA


def pick_flavor(flavors: Sequence[str], has_onnx: bool, device: str, onnx_on_cuda: bool) -> str:
    """The flavor a version runs with: ONNX (the export mlmesh logs, or the onnx flavor) on
    ONNX Runtime, unless the device is CUDA and ONNX Runtime cannot use it while the version
    has a pytorch flavor this service loads: then torch, on the GPU. Else its pytorch or
    python_function flavor (``flavors``: the one it has, if this service loads it); "" when
    none."""
    if has_onnx and (device == CPU or onnx_on_cuda or PYTORCH not in flavors):
        return ONNX
    for flavor in (PYTORCH, PYFUNC):
        if flavor in flavors:
            return flavor
    return ""


class Runtime(Protocol):
    """A forward pass: the contract's inputs (name -> array) to its outputs."""

    kind: str  # onnxruntime, torch or pyfunc
    device: str  # cpu or cuda: where its forward pass runs

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntime:
    """An ONNX Runtime session on the CPU; the graph's inputs and outputs are matched to the
    contract's by name, or else by position."""

    kind = "onnxruntime"

    def __init__(
        self, path: Path, contract: ModelContract, threads: int, what: str, device: str = CPU
    ) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == CUDA:
            providers.insert(0, "CUDAExecutionProvider")
        self._session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.device = CUDA if "CUDAExecutionProvider" in self._session.get_providers() else CPU
        graph_in = [i.name for i in self._session.get_inputs()]
        graph_out = [o.name for o in self._session.get_outputs()]
        self._feed = _match([t.name for t in contract.inputs], graph_in, what, "inputs")
        fetch = _match([t.name for t in contract.outputs], graph_out, what, "outputs")
        self._fetch = list(fetch.values())
        self._names = list(fetch)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(
            self._fetch, {self._feed[name]: array for name, array in inputs.items()}
        )
        return dict(zip(self._names, results, strict=True))


class TorchRuntime:
    """The model's own PyTorch module, in inference mode, called with the inputs in the
    contract's order; it answers a tensor, a tuple or list of them, or a dict by name."""

    kind = "torch"

    def __init__(self, module: Any, contract: ModelContract, device: str = CPU) -> None:
        self._module = module.to(device) if device != CPU else module
        self.device = device
        self._inputs = [t.name for t in contract.inputs]
        self._outputs = contract.outputs

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        tensors = [
            torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device)
            for a in (inputs[name] for name in self._inputs)
        ]
        with torch.inference_mode():
            result = self._module(*tensors)
        if isinstance(result, Mapping):
            found = {k: v for k, v in result.items()}
        elif isinstance(result, (tuple, list)):
            found = {spec.name: v for spec, v in zip(self._outputs, result, strict=False)}
        else:
            found = {self._outputs[0].name: result}
        return {name: value.detach().cpu().numpy() for name, value in found.items()}


class PyfuncRuntime:
    """An ``mlflow.pyfunc`` model: a DataFrame for a column signature, the array itself for
    one unnamed tensor, a dict of arrays otherwise."""

    kind = "pyfunc"
    device = CPU

    def __init__(self, model: Any, contract: ModelContract, string_columns: set[str]) -> None:
        self._model = model
        self._contract = contract
        self._string_columns = string_columns
        self._single = len(contract.inputs) == 1 and not contract.columnar

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._contract.columnar:
            import pandas as pd

            data: Any = pd.DataFrame(
                {
                    name: _strings(array) if name in self._string_columns else array
                    for name, array in inputs.items()
                }
            )
        elif self._single:
            data = next(iter(inputs.values()))
        else:
            data = dict(inputs)
        return _by_output(self._model.predict(data), self._contract.outputs)


def load_runtime(
    model_dir: Path,
    contract: ModelContract,
    *,
    threads: int,
    flavors: Sequence[str],
    what: str,
    device: str = CPU,
) -> Runtime:
    """Load the MLflow model in ``model_dir`` with the runtime its flavor asks for, on
    ``device`` where the runtime can use it (pick_flavor; the CPU otherwise).

    ``flavors`` are those this service may load besides ONNX; ``what`` names the version in
    errors (FailedPrecondition: the version cannot be served here, and why).
    """
    model = mlflow.models.Model.load(str(model_dir))
    available = model.flavors
    export = model_dir / ONNX_PATH_IN_MODEL
    onnx_path = export if export.exists() else None
    if onnx_path is None and ONNX in available:
        onnx_path = model_dir / available[ONNX]["data"]
    # Of pytorch and python_function, the first the version has is the one it runs with.
    own = next((f for f in (PYTORCH, PYFUNC) if f in available), None)
    if own is not None and own not in flavors and onnx_path is None:
        raise FailedPrecondition(
            f"{what} is a {own} model, and this service loads only "
            f"{', '.join(sorted({ONNX, *flavors}))} (MLMESH_INFERENCE_FLAVORS: loading a "
            f"{own} model runs code from the artifact store)"
        )
    loadable = [own] if own is not None and own in flavors else []
    onnx_on_cuda = _onnx_on_cuda(device)
    flavor = pick_flavor(loadable, onnx_path is not None, device, onnx_on_cuda)
    if flavor == ONNX:
        assert onnx_path is not None
        return OnnxRuntime(onnx_path, contract, threads, what, CUDA if onnx_on_cuda else CPU)
    if not flavor:
        raise FailedPrecondition(
            f"{what} cannot be served: it has none of the flavors mlmesh runs (onnx, pytorch, "
            f"python_function); its flavors are {', '.join(available) or 'none'}"
        )
    try:
        if flavor == PYTORCH:
            import torch
            from mlflow import pytorch as mlflow_pytorch

            torch.set_num_threads(max(1, threads))
            module = mlflow_pytorch.load_model(str(model_dir), map_location=device)
            return TorchRuntime(module, contract, device)
        strings = {
            spec.name
            for spec in (model.signature.inputs.inputs if contract.columnar else [])
            if getattr(spec.type, "name", "") == "string"
        }
        return PyfuncRuntime(mlflow.pyfunc.load_model(str(model_dir)), contract, strings)
    except Exception as exc:  # a missing dependency, a corrupt artifact, ...
        raise FailedPrecondition(
            f"{what} cannot be served: MLflow could not load its {flavor} model "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _onnx_on_cuda(device: str) -> bool:
    """Whether the installed ONNX Runtime has its CUDA provider (onnxruntime-gpu; the CPU
    package mlmesh installs has not)."""
    if device != CUDA:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def check_answers(
    answers: Mapping[str, Any], contract: ModelContract, rows: int | None
) -> dict[str, np.ndarray]:
    """The model's answers as the contract's outputs: every output present, of its datatype,
    with ``rows`` rows for a batched model; ModelRaised says what does not fit."""
    checked = {}
    for spec in contract.outputs:
        if spec.name not in answers:
            raise ModelRaised(
                f"it answered {', '.join(map(repr, answers)) or 'nothing'}, not output "
                f"{spec.name!r}"
            )
        checked[spec.name] = _as_output(answers[spec.name], spec)
        if rows is not None and (checked[spec.name].ndim == 0 or len(checked[spec.name]) != rows):
            raise ModelRaised(
                f"output {spec.name!r} has shape {list(checked[spec.name].shape)} for "
                f"{rows} input rows"
            )
    return checked


def _as_output(value: Any, spec: TensorSpec) -> np.ndarray:
    array = np.asarray(value)
    if spec.datatype == "BYTES":
        flat = [v.encode() if isinstance(v, str) else v for v in array.ravel().tolist()]
        if not all(isinstance(v, bytes) for v in flat):
            raise ModelRaised(f"output {spec.name!r} is BYTES, but it answered {array.dtype}")
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(array.shape)
    if array.dtype == spec.dtype:
        return array
    if array.dtype.kind in "OSU" or (array.dtype.kind == "f" and spec.dtype.kind in "iub"):
        raise ModelRaised(
            f"output {spec.name!r} is {spec.datatype}, but it answered {array.dtype} values"
        )
    return array.astype(spec.dtype)


def _by_output(result: Any, outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """A pyfunc's answer (a DataFrame, Series, array, list or dict) by output name."""
    import pandas as pd

    if isinstance(result, dict):
        return result
    if isinstance(result, pd.DataFrame):
        if all(spec.name in result.columns for spec in outputs):
            return {spec.name: result[spec.name].to_numpy() for spec in outputs}
        if len(outputs) == 1 and result.shape[1] > 1:
            return {outputs[0].name: result.to_numpy()}
        return {spec.name: result.iloc[:, i].to_numpy() for i, spec in enumerate(outputs)}
    if isinstance(result, pd.Series):
        return {outputs[0].name: result.to_numpy()}
    return {outputs[0].name: result}


def _strings(array: np.ndarray) -> np.ndarray:
    """BYTES elements as text, for a string column (binary columns keep their bytes)."""
    return np.array(
        [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()], dtype=object
    )


def _match(names: list[str], graph: list[str], what: str, kind: str) -> dict[str, str]:
    """Contract names -> graph names: by name where all match, else by position."""
    if set(names) <= set(graph):
        return {n: n for n in names}
    if len(names) == len(graph):
        return dict(zip(names, graph, strict=True))
    raise FailedPrecondition(
        f"{what} cannot be served: its signature has {len(names)} {kind} "
        f"({', '.join(names)}), its ONNX graph {len(graph)} ({', '.join(graph)})"
    )
