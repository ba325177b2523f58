"""The model contract (services/common/model_contract.py): tensors from MLflow signatures, the
checks of a request's tensors against them, and the drift reference's format."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema, TensorSpec

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.model_contract import (
    ModelContract,
    RequestTensor,
    contract_of,
    drift_reference,
    parse_drift_reference,
)
from services.common.model_contract import TensorSpec as Spec

WHAT = "model 'm' version 3"


def tensor(name: str, datatype: str, shape: tuple[int, ...], data: object, i: int = 0):
    return RequestTensor(name, datatype, shape, np.asarray(data).ravel(), f"inputs[{i}]")


def test_a_column_signature_serves_each_column_as_a_1d_tensor() -> None:
    frame = pd.DataFrame({"alcohol": [13.2], "hue": [1.0], "colour": ["red"], "ok": [True]})
    contract = contract_of(infer_signature(frame, np.array([1])), WHAT)
    assert contract.columnar and contract.batched
    assert contract.inputs == (
        Spec("alcohol", "FP64", (-1,)),
        Spec("hue", "FP64", (-1,)),
        Spec("colour", "BYTES", (-1,)),
        Spec("ok", "BOOL", (-1,)),
    )
    assert contract.outputs == (Spec("output-0", "INT64", (-1,)),)


def test_a_tensor_signature_serves_tensors_as_themselves_named_or_numbered() -> None:
    signature = ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 3, 224, 224), "image"),
                TensorSpec(np.dtype(np.int64), (-1,), "crop"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1000))]),
    )
    contract = contract_of(signature, WHAT)
    assert not contract.columnar and contract.batched
    assert [t.describe() for t in contract.inputs] == [
        "image FP32 [-1, 3, 224, 224]",
        "crop INT64 [-1]",
    ]
    assert contract.outputs == (Spec("output-0", "FP32", (-1, 1000)),)
    fixed = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (3, 4))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (3,))]),
    )
    assert not contract_of(fixed, WHAT).batched


@pytest.mark.parametrize(
    ("signature", "words"),
    [
        (None, "model 'm' version 3 cannot be served: it has no signature"),
        (
            ModelSignature(inputs=Schema([ColSpec("double", "x")])),
            "its signature has no outputs",
        ),
        (
            ModelSignature(
                inputs=Schema([ColSpec("datetime", "when")]),
                outputs=Schema([ColSpec("double")]),
            ),
            "input column 'when' has type datetime",
        ),
    ],
)
def test_what_cannot_be_served_is_refused_naming_what_is_missing(
    signature: ModelSignature | None, words: str
) -> None:
    with pytest.raises(FailedPrecondition, match=words):
        contract_of(signature, WHAT)


def two_inputs() -> ModelContract:
    return ModelContract(
        inputs=(Spec("x", "FP32", (-1, 2)), Spec("k", "INT64", (-1,))),
        outputs=(Spec("y", "FP32", (-1,)),),
        columnar=False,
    )


def test_request_tensors_become_the_model_inputs() -> None:
    arrays = two_inputs().check_inputs(
        [
            tensor("k", "INT64", (2,), [3, 4], 1),
            tensor("x", "FP32", (2, 2), np.arange(4, dtype=np.float32)),
        ]
    )
    assert list(arrays) == ["x", "k"]  # the contract's order
    assert arrays["x"].shape == (2, 2) and arrays["k"].tolist() == [3, 4]


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ([tensor("x", "FP32", (1, 2), [0, 0])], "input 'k' is missing; the model takes x FP32"),
        (
            [tensor("x", "FP32", (1, 2), [0, 0]), tensor("z", "INT64", (1,), [1], 1)],
            r"inputs\[1\] is named 'z'; the model takes x FP32 \[-1, 2\], k INT64 \[-1\]",
        ),
        (
            [tensor("x", "FP64", (1, 2), [0, 0]), tensor("k", "INT64", (1,), [1], 1)],
            r"inputs\[0\] \(x\) has datatype FP64; the model takes FP32",
        ),
        (
            [tensor("x", "FP32", (1, 3), [0, 0, 0]), tensor("k", "INT64", (1,), [1], 1)],
            r"inputs\[0\] \(x\) has shape \[1, 3\]; the model takes \[-1, 2\]",
        ),
        (
            [tensor("x", "FP32", (1, 2), [0, 0, 0]), tensor("k", "INT64", (1,), [1], 1)],
            r"has 3 elements; shape \[1, 2\] needs 2",
        ),
        (
            [tensor("x", "FP32", (2, 2), [0] * 4), tensor("k", "INT64", (1,), [1], 1)],
            "different numbers of rows",
        ),
        (
            [tensor("x", "FP32", (1, 2), [0, 0]), tensor("x", "FP32", (1, 2), [0, 0], 1)],
            r"inputs\[1\] repeats input 'x'",
        ),
    ],
)
def test_bad_request_tensors_name_the_tensor_and_what_the_model_takes(
    tensors: list[RequestTensor], words: str
) -> None:
    with pytest.raises(InvalidArgument, match=words):
        two_inputs().check_inputs(tensors)


def test_a_column_may_come_as_n_by_1_as_mlserver_describes_it() -> None:
    contract = contract_of(
        infer_signature(pd.DataFrame({"a": [1.0]}), pd.DataFrame({"p": [0.5]})), WHAT
    )
    arrays = contract.check_inputs([tensor("a", "FP64", (3, 1), [1.0, 2.0, 3.0])])
    assert arrays["a"].shape == (3,)


def test_drift_references_round_trip_and_the_old_pixel_format_is_read() -> None:
    contract = ModelContract(
        inputs=(Spec("a", "FP64", (-1,)), Spec("s", "BYTES", (-1,))),
        outputs=(Spec("y", "INT64", (-1,)),),
        columnar=True,
    )
    document = drift_reference({"a": np.array([0.0, 1.0, 1.0, 3.0]), "s": np.array(["x"])}, 3)
    assert list(document["inputs"]) == ["a"]  # numbers only
    features = parse_drift_reference(json.dumps(document), contract)
    np.testing.assert_allclose(features["a"].edges, [0, 1, 2, 3])
    np.testing.assert_allclose(features["a"].shares, [0.25, 0.5, 0.25])
    old = {"bin_edges": np.linspace(0, 1, 11).tolist(), "histogram": [0.1] * 10}
    pixels = parse_drift_reference(json.dumps(old), contract)
    assert list(pixels) == ["a"] and len(pixels["a"].shares) == 10
    with pytest.raises(ValueError, match="K\\+1 increasing"):
        parse_drift_reference(
            json.dumps({"inputs": {"a": {"edges": [0, 1], "shares": [1]}}}), contract
        )
