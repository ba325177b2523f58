"""The one text rule for every request (services/common/text.py): no NUL in any string field."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from mlmesh.inference.v1 import inference_pb2
from mlmesh.registry.v1 import registry_pb2
from mlmesh.training.v1 import sweep_pb2
from services.common.errors import InvalidArgument
from services.common.text import _text_fields, check_message, check_text


def test_plain_text_passes_and_a_nul_is_named_with_its_field() -> None:
    assert check_text("mnist-classifier ℵ\n\t'\"%00", "name") == "mnist-classifier ℵ\n\t'\"%00"
    with pytest.raises(InvalidArgument, match=r"^model_name contains a NUL character \(U\+0000 at"):
        check_text("a\x00b", "model_name")


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (registry_pb2.GetModelVersionRequest(name="\x00", version=1), "name"),
        (registry_pb2.ListRunsRequest(experiment_ids=["1", "2\x00"]), r"experiment_ids\[1\]"),
        (inference_pb2.PredictRequest(image=[0.0] * 784, model_version="\x00"), "model_version"),
        (
            sweep_pb2.SubmitSweepRequest(search_space={"lr\x00": sweep_pb2.ParameterSpace()}),
            "search_space key",
        ),
        (
            sweep_pb2.SubmitSweepRequest(
                search_space={
                    "optimizer": sweep_pb2.ParameterSpace(
                        choice=sweep_pb2.Choice(values=[struct_pb2.Value(string_value="a\x00")])
                    )
                }
            ),
            r"search_space\['optimizer'\]\.choice\.values\[0\]\.string_value",
        ),
    ],
)
def test_nested_repeated_and_map_fields_are_checked(message, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field} contains a NUL"):
        check_message(message)


def test_messages_without_text_are_not_walked() -> None:
    # Images are numbers and bytes: a batch of them costs nothing to check.
    batch = inference_pb2.PredictBatchRequest.DESCRIPTOR
    assert [f.name for f in _text_fields(batch)] == ["model_name", "model_version"]
    check_message(
        inference_pb2.PredictBatchRequest(
            images=[inference_pb2.Image(raw=b"\x00" * 784)] * 3, model_name="m"
        )
    )
