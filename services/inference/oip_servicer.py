"""inference.GRPCInferenceService: the Open Inference Protocol's gRPC face over OpenInference."""

from __future__ import annotations

import time

import grpc
import numpy as np

from mlmesh.oip.v2 import grpc_predict_v2_pb2 as pb
from mlmesh.oip.v2 import grpc_predict_v2_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.model_contract import RequestTensor, TensorSpec
from services.inference import metrics
from services.inference.oip import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    OpenInference,
    bytes_array,
    check_datatype,
    check_parameters,
    check_shape,
    decode_raw,
    encode_raw,
)
from services.inference.servicer import fresh_requested, routing_key

# The InferTensorContents field that carries each datatype's elements (FP16 has none: raw only).
CONTENTS_FIELDS = {
    "BYTES": "bytes_contents",
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _typed(contents: pb.InferTensorContents, datatype: str, field: str) -> np.ndarray:
    """A tensor's typed contents as a flat array; only its datatype's field may be set."""
    wanted = CONTENTS_FIELDS.get(datatype)
    if wanted is None:
        raise InvalidArgument(f"{field}: {datatype} data can only come in raw_input_contents")
    for other, _ in contents.ListFields():
        if other.name != wanted:
            raise InvalidArgument(
                f"{field}.contents.{other.name} does not match datatype {datatype}; "
                f"its elements go in contents.{wanted}"
            )
    if datatype == "BYTES":
        return bytes_array(contents.bytes_contents)
    return np.asarray(getattr(contents, wanted), dtype=check_datatype(datatype, field))


def _inputs(request: pb.ModelInferRequest) -> list[RequestTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries; give one per input ({len(request.inputs)})"
        )
    decoded = []
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        dtype = check_datatype(tensor.datatype, field)
        shape = check_shape(tensor.shape, field)
        check_parameters(tensor.parameters, field)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"{field} has contents and raw_input_contents is given too; use one form"
                )
            data = decode_raw(raw[i], dtype, shape, field)
        else:
            data = _typed(tensor.contents, tensor.datatype, field)
        decoded.append(RequestTensor(tensor.name, tensor.datatype, shape, data, field))
    return decoded


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


class OipServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """Thin adapter from the protocol's generated service to OpenInference."""

    def __init__(self, oip: OpenInference) -> None:
        self._oip = oip

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._oip.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self._oip.model_ready(request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        found = await self._oip.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=found.name,
            versions=found.versions,
            platform=found.platform,
            inputs=[_tensor_metadata(t) for t in found.inputs],
            outputs=[_tensor_metadata(t) for t in found.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Answers in the form asked: raw_output_contents for a raw request, typed contents
        otherwise."""
        started = time.perf_counter()
        check_parameters(request.parameters, "parameters")
        for i, wanted in enumerate(request.outputs):
            check_parameters(wanted.parameters, f"outputs[{i}]")
        answer = await self._oip.infer(
            request.model_name,
            request.model_version,
            _inputs(request),
            [o.name for o in request.outputs],
            read_cache=not fresh_requested(context),
            routing_key=routing_key(context),
        )
        response = pb.ModelInferResponse(
            model_name=answer.model_name, model_version=answer.model_version, id=request.id
        )
        response.parameters["prediction_id"].string_param = answer.prediction_id
        # Raw when asked raw, or when an output's datatype has no typed field (FP16): the
        # protocol has raw_output_contents hold every output or none.
        raw = bool(request.raw_input_contents) or any(
            spec.datatype not in CONTENTS_FIELDS for spec, _ in answer.outputs
        )
        for spec, data in answer.outputs:
            output = response.outputs.add(
                name=spec.name, datatype=spec.datatype, shape=list(data.shape)
            )
            if raw:
                response.raw_output_contents.append(encode_raw(data))
            else:
                getattr(output.contents, CONTENTS_FIELDS[spec.datatype]).extend(
                    data.ravel().tolist()
                )
        metrics.PREDICTION_DURATION.labels("ModelInfer").observe(time.perf_counter() - started)
        return response
