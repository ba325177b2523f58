"""mlmesh through NVIDIA's tritonclient, unchanged: the Open Inference Protocol (KServe V2).

    .venv-tritonclient/bin/python examples/tritonclient_oip.py --key KEY [--model NAME]
        [--version production|staging|N] [--images FILE.npy] [--url 127.0.0.1:8000] [--json]

Over gRPC and over HTTP, through the gateway: is the server live and ready, is the model's
version loaded, what are its tensors; then it classifies the images (an .npy of (N, 784)
float32 pixels in [0, 1]; four random ones if none) twice each way: with typed data (JSON
``data`` over HTTP, ``InferTensorContents`` over gRPC) and as raw little-endian binary. Last it
shows the errors a wrong request gets. ``--json`` prints everything as one JSON document.
``make install`` makes .venv-tritonclient (tritonclient wants protobuf<7, mlmesh protobuf 7).
"""

from __future__ import annotations

import argparse
import json
import os

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def grpc_face(url: str, key: str, model: str, version: str, images: np.ndarray) -> dict:
    headers = {"x-api-key": key}
    client = grpcclient.InferenceServerClient(url)
    meta = client.get_model_metadata(model, version, headers=headers, as_json=True)
    found = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model, version),
        "metadata": meta,
    }
    # Raw binary: tritonclient's InferInput always sends raw_input_contents over gRPC.
    tensor = grpcclient.InferInput(meta["inputs"][0]["name"], list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    wanted = grpcclient.InferRequestedOutput(meta["outputs"][0]["name"])
    result = client.infer(model, [tensor], version, outputs=[wanted], headers=headers)
    found["raw"] = {
        "version": result.get_response().model_version,
        "probabilities": result.as_numpy(meta["outputs"][0]["name"]).tolist(),
    }
    # Typed contents: the protocol's own message, sent with tritonclient's generated stub.
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    typed = request.inputs.add(name=meta["inputs"][0]["name"], datatype="FP32")
    typed.shape.extend(images.shape)
    typed.contents.fp32_contents.extend(images.ravel().tolist())
    with grpc.insecure_channel(url) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=list(headers.items())
        )
    found["typed"] = {
        "version": reply.model_version,
        "probabilities": np.array(reply.outputs[0].contents.fp32_contents)
        .reshape(list(reply.outputs[0].shape))
        .tolist(),
    }
    found["errors"] = errors(client, grpcclient, model, version, images, headers)
    client.close()
    return found


def http_face(url: str, key: str, model: str, version: str, images: np.ndarray) -> dict:
    headers = {"x-api-key": key}
    client = httpclient.InferenceServerClient(url)
    meta = client.get_model_metadata(model, version, headers=headers)
    found = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model, version),
        "metadata": meta,
    }
    name, output = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    for form, binary in (("raw", True), ("typed", False)):
        tensor = httpclient.InferInput(name, list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        wanted = httpclient.InferRequestedOutput(output, binary_data=binary)
        # dict(): tritonclient's HTTP infer() adds its own headers to the dict it is given.
        result = client.infer(model, [tensor], version, outputs=[wanted], headers=dict(headers))
        found[form] = {
            "version": result.get_response()["model_version"],
            "probabilities": result.as_numpy(output).tolist(),
        }
    found["errors"] = errors(client, httpclient, model, version, images, headers)
    client.close()
    return found


def errors(client, module, model: str, version: str, images: np.ndarray, headers: dict) -> dict:
    """What wrong requests get: the status and message of the exception tritonclient raises."""

    def infer(name: str, tensor, version: str = version):
        return lambda: client.infer(name, [tensor], version, headers=dict(headers))

    good = _input(module, images)
    return {
        "unknown model": _error(infer("no-such-model", good, "")),
        "unknown version": _error(infer(model, good, "999")),
        "wrong shape": _error(infer(model, _input(module, images[:, :100]))),
        "wrong datatype": _error(infer(model, _input(module, images, "FP64"))),
    }


def _input(module, images: np.ndarray, datatype: str = "FP32"):
    tensor = module.InferInput("input-0", list(images.shape), datatype)
    tensor.set_data_from_numpy(images.astype(np.float64 if datatype == "FP64" else np.float32))
    return tensor


def _error(call) -> dict:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": None, "message": "no error"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="the gateway, host:port")
    parser.add_argument("--key", default=os.environ.get("MLMESH_API_KEY"), help="an API key")
    parser.add_argument("--model", default="mnist-cnn", help="a registered model")
    parser.add_argument("--version", default="", help="a number or an alias; none: production")
    parser.add_argument("--images", help="an .npy of (N, 784) float32 pixels in [0, 1]")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if not args.key:
        parser.error("give --key or set MLMESH_API_KEY (`make up` prints one)")
    if args.images:
        images = np.load(args.images).astype(np.float32)
    else:
        images = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    found = {
        face: run(args.url, args.key, args.model, args.version, images)
        for face, run in (("grpc", grpc_face), ("http", http_face))
    }
    if args.json:
        print(json.dumps(found))
        return
    for face, f in found.items():
        meta = f["metadata"]
        print(f"{face}: live={f['live']} ready={f['ready']} model_ready={f['model_ready']}")
        print(f"{face}: {meta['name']} versions={meta['versions']} platform={meta['platform']} "
              f"inputs={meta['inputs']} outputs={meta['outputs']}")  # fmt: skip
        for form in ("raw", "typed"):
            probabilities = np.array(f[form]["probabilities"])
            print(f"{face}: {form:5} version {f[form]['version']} answered "
                  f"{probabilities.argmax(axis=1).tolist()} "
                  f"(confidence {probabilities.max(axis=1).round(3).tolist()})")  # fmt: skip
        for case, error in f["errors"].items():
            print(f"{face}: {case} -> {error['status']}: {error['message']}")


if __name__ == "__main__":
    main()
