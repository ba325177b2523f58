"""Call a model through the gateway with NVIDIA's tritonclient, and print its answer as JSON.

Runs in .venv-tritonclient (tritonclient needs protobuf<7), so it imports nothing of mlmesh:

    .venv-tritonclient/bin/python tests/integration/oip_call.py --url 127.0.0.1:8000 \\
        --protocol grpc --key KEY --model NAME [--version V] < request.json

The request on stdin is {"inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...]}
(BYTES data as strings). The answer on stdout is {"model_version", "outputs": {name: {"datatype",
"shape", "data"}}}, or {"error": "<status>: <message>"} when the server refused the call.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

_NUMPY = {
    "BOOL": np.bool_,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--protocol", choices=("grpc", "http"), required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="")
    args = parser.parse_args()
    request = json.load(sys.stdin)
    client_module = grpcclient if args.protocol == "grpc" else httpclient
    client = client_module.InferenceServerClient(args.url)
    inputs = []
    for spec in request["inputs"]:
        data = np.array(spec["data"], dtype=_NUMPY[spec["datatype"]]).reshape(spec["shape"])
        if spec["datatype"] == "BYTES":
            data = np.array([v.encode() for v in data.ravel()], dtype=object).reshape(data.shape)
        tensor = client_module.InferInput(spec["name"], list(data.shape), spec["datatype"])
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    outputs = [client_module.InferRequestedOutput(n) for n in request.get("outputs", [])]
    try:
        result = client.infer(
            args.model,
            inputs,
            model_version=args.version,
            outputs=outputs or None,
            headers={"x-api-key": args.key},
        )
    except InferenceServerException as exc:
        print(json.dumps({"error": f"{exc.status()}: {exc.message()}"}))
        return 0
    response = result.get_response()
    described = response.outputs if args.protocol == "grpc" else response["outputs"]
    answer = {}
    for output in described:
        name = output.name if args.protocol == "grpc" else output["name"]
        datatype = output.datatype if args.protocol == "grpc" else output["datatype"]
        array = result.as_numpy(name)
        data = (
            [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
            if datatype == "BYTES"
            else array.ravel().tolist()
        )
        answer[name] = {"datatype": datatype, "shape": list(array.shape), "data": data}
    version = response.model_version if args.protocol == "grpc" else response["model_version"]
    print(json.dumps({"model_version": version, "outputs": answer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
