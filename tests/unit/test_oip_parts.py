"""The Open Inference Protocol's decoding, without a server: datatypes, raw bytes, JSON data,
the binary tensor extension and typed gRPC contents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlmesh.oip.v2 import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidArgument
from services.inference.oip import check_datatype, check_shape, datatype_name, decode_raw
from services.inference.oip_http import _decode_inputs, _json_data, _split
from services.inference.oip_servicer import _inputs


def test_datatypes_round_trip_and_unknown_ones_are_named() -> None:
    for name in ("BOOL", "UINT8", "INT64", "FP16", "FP32", "FP64"):
        assert datatype_name(check_datatype(name, "inputs[0]")) == name
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.datatype 'fp32' is not"):
        check_datatype("fp32", "inputs[0]")
    with pytest.raises(InvalidArgument, match="negative dimension"):
        check_shape([1, -784], "inputs[0]")


def test_raw_bytes_are_little_endian_and_must_fill_the_shape() -> None:
    values = np.arange(6, dtype=np.float32)
    decoded = decode_raw(values.astype("<f4").tobytes(), np.dtype(np.float32), (2, 3), "x")
    np.testing.assert_array_equal(decoded, values)
    big_endian = values.astype(">f4").tobytes()
    assert not np.array_equal(decode_raw(big_endian, np.dtype(np.float32), (2, 3), "x"), values)
    with pytest.raises(InvalidArgument, match=r"x has 20 bytes of data; shape \[2, 3\] of FP32"):
        decode_raw(values.tobytes()[:20], np.dtype(np.float32), (2, 3), "x")


def test_json_data_may_nest_and_must_hold_the_datatypes_values() -> None:
    np.testing.assert_array_equal(_json_data([[0, 0.5], [1, 0.25]], "FP32", "d"), [0, 0.5, 1, 0.25])
    assert _json_data([True, False], "BOOL", "d").tolist() == [True, False]
    for bad, words in [
        (["1"], "must hold FP32 values"),
        ([True], "must hold FP32 values"),
        ([None], "must hold FP32 values"),
        ([[1.0], [1.0, 2.0]], "ragged"),
        ([10**30], "must hold FP32 values"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            _json_data(bad, "FP32", "d")
    with pytest.raises(InvalidArgument, match="out of UINT8's range"):
        _json_data([256], "UINT8", "d")
    with pytest.raises(InvalidArgument, match="must hold INT32 values"):
        _json_data([0.5], "INT32", "d")


def test_the_binary_extension_splits_the_body_and_each_input_claims_its_bytes() -> None:
    a, b = np.ones(4, dtype="<f4"), np.zeros(2, dtype="<f8")
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [4], "datatype": "FP32",
                 "parameters": {"binary_data_size": 16}},
                {"name": "b", "shape": [2], "datatype": "FP64",
                 "parameters": {"binary_data_size": 16}},
            ]
        }
    ).encode()  # fmt: skip
    body = header + a.tobytes() + b.tobytes()
    text, binary = _split(body, str(len(header)))
    inputs = _decode_inputs(json.loads(text)["inputs"], binary)
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [
        ("a", "FP32", (4,)),
        ("b", "FP64", (2,)),
    ]
    np.testing.assert_array_equal(inputs[0].data, a)
    np.testing.assert_array_equal(inputs[1].data, b)
    with pytest.raises(InvalidArgument, match="8 bytes of binary data follow the JSON"):
        _decode_inputs(json.loads(text)["inputs"][:1], binary[:24])
    with pytest.raises(InvalidArgument, match="only 8 bytes of binary data are left"):
        _decode_inputs(json.loads(text)["inputs"], binary[:24])
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length is 'x'"):
        _split(body, "x")


def test_grpc_inputs_are_typed_or_raw_never_both() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="INT64", shape=[3]).contents.int64_contents.extend(
        [1, 2, 3]
    )
    (decoded,) = _inputs(request)
    assert decoded.data.dtype == np.int64 and decoded.data.tolist() == [1, 2, 3]
    request.raw_input_contents.append(np.arange(3, dtype="<i8").tobytes())
    with pytest.raises(InvalidArgument, match="use one form"):
        _inputs(request)
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="FP16", shape=[1])
    with pytest.raises(InvalidArgument, match="FP16 data can only come in raw_input_contents"):
        _inputs(request)
