"""Runtimes by flavor from MLflow model directories saved here, the flavor setting, and the
memory-aware model LRU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow.pyfunc
import mlflow.pytorch
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.models import infer_signature
from sklearn.linear_model import LogisticRegression

from services.common.errors import FailedPrecondition
from services.common.model_contract import contract_of
from services.common.settings import Settings
from services.inference.batching import Batcher
from services.inference.repository import LoadedModel, ModelRepository, forward_of
from services.inference.runtime import (
    CPU,
    CUDA,
    ModelRaised,
    cuda_available,
    load_runtime,
    pick_flavor,
    resolve_device,
)

WHAT = "model 'm' version 1"


def saved_torch(path: Path) -> Path:
    module = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Softmax(dim=1)).eval()
    example = np.zeros((2, 4), np.float32)
    with torch.no_grad():
        signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
    mlflow.pytorch.save_model(
        module, str(path), signature=signature, serialization_format="pickle",
        pip_requirements=["torch"],
    )  # fmt: skip
    return path


def saved_sklearn(path: Path) -> tuple[Path, LogisticRegression, pd.DataFrame]:
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "b": [1.0, 0.0, 1.0, 0.0]})
    model = LogisticRegression().fit(frame, [0, 0, 1, 1])
    signature = infer_signature(frame, model.predict(frame))
    mlflow.sklearn.save_model(model, str(path), signature=signature, pip_requirements=["sklearn"])
    return path, model, frame


def load(path: Path, flavors: tuple[str, ...] = ("onnx", "pytorch", "python_function")):
    contract = contract_of(mlflow.models.Model.load(str(path)).signature, WHAT)
    return load_runtime(path, contract, threads=1, flavors=flavors, what=WHAT), contract


def test_a_pytorch_model_runs_on_torch_and_the_setting_can_refuse_it(tmp_path: Path) -> None:
    path = saved_torch(tmp_path / "torch")
    runtime, contract = load(path)
    assert runtime.kind == "torch"
    out = forward_of(runtime, contract)({"input-0": np.ones((3, 4), np.float32)})
    assert out["output-0"].shape == (3, 2)
    with pytest.raises(
        FailedPrecondition, match="is a pytorch model, and this service loads only onnx"
    ):
        load(path, flavors=("onnx",))


def test_the_device_a_version_runs_on() -> None:
    """ONNX on the CPU always; on a CUDA device, torch for a version with a pytorch flavor,
    unless ONNX Runtime has its CUDA provider (the package mlmesh installs has not)."""
    assert pick_flavor(["pytorch"], True, CPU, False) == "onnx"  # mlmesh's export, on the CPU
    assert pick_flavor(["pytorch"], True, CUDA, False) == "pytorch"  # torch on the GPU
    assert pick_flavor(["pytorch"], True, CUDA, True) == "onnx"  # onnxruntime-gpu installed
    assert pick_flavor([], True, CUDA, False) == "onnx"  # pytorch not loaded here: the CPU
    assert pick_flavor(["python_function"], False, CUDA, False) == "python_function"
    assert pick_flavor([], False, CPU, False) == ""
    # This machine has no GPU: auto is the CPU, and cuda is refused, saying why.
    if not cuda_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(RuntimeError, match="no CUDA device is usable here"):
            resolve_device("cuda")
    assert resolve_device("cpu") == CPU


def test_every_runtime_says_where_it_runs(tmp_path: Path) -> None:
    runtime, _ = load(saved_torch(tmp_path / "torch"))
    assert runtime.device == CPU
    runtime, _ = load(saved_sklearn(tmp_path / "sklearn")[0])
    assert runtime.device == CPU


def test_a_scikit_learn_model_runs_through_pyfunc_with_its_columns(tmp_path: Path) -> None:
    path, model, frame = saved_sklearn(tmp_path / "sklearn")
    runtime, contract = load(path)
    assert runtime.kind == "pyfunc" and contract.columnar
    out = forward_of(runtime, contract)({"a": frame["a"].to_numpy(), "b": frame["b"].to_numpy()})
    assert out["output-0"].tolist() == model.predict(frame).tolist()
    with pytest.raises(FailedPrecondition, match="python_function model"):
        load(path, flavors=("onnx", "pytorch"))


def test_what_a_model_answers_is_checked_against_its_contract(tmp_path: Path) -> None:
    path, _, _ = saved_sklearn(tmp_path / "sklearn")
    runtime, contract = load(path)
    forward = forward_of(runtime, contract)
    # Its own code failing (a column it cannot take) is ModelRaised, naming the exception.
    with pytest.raises(ModelRaised, match=r"(?s)MlflowException: .*column a"):
        forward({"a": np.array(["x"], dtype=object), "b": np.array([1.0])})


class _Runtime:
    kind = "onnxruntime"


def loaded(name: str, version: int, size: int, executor: ThreadPoolExecutor) -> LoadedModel:
    return LoadedModel(
        name=name,
        version=version,
        run_id="r",
        runtime=_Runtime(),  # type: ignore[arg-type]
        contract=None,  # type: ignore[arg-type]
        batcher=Batcher(lambda x: x, executor, 1, 0.0),
        size_bytes=size,
    )


async def test_the_lru_keeps_within_the_memory_budget_sparing_aliases() -> None:
    settings = Settings(model_cache_versions=10, model_cache_bytes=100)
    with ThreadPoolExecutor(1) as executor:
        repository = ModelRepository(settings, executor)
        repository._set_alias("m", "production", 1)
        for version, size in ((1, 40), (2, 40), (3, 40)):
            repository._models[("m", version)] = loaded("m", version, size, executor)
            await repository._evict()
        # 120 bytes > 100: the least recently used that no alias points at goes (v2).
        assert sorted(v for _, v in repository._models) == [1, 3]
        repository._models[("m", 4)] = loaded("m", 4, 90, executor)
        await repository._evict()
        # A large one does not sit beside others it cannot fit with, but it stays itself.
        assert sorted(v for _, v in repository._models) == [4]
