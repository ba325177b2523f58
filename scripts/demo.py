"""`make demo`: the platform end to end through the gateway, printing what each step did.

Start the mesh, train a CNN on real MNIST, promote it, exercise the Registry, and classify a
test image with the promoted version over REST and gRPC (the repeat from the prediction cache).

    python scripts/demo.py [--epochs 3] [--train-subset 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

import httpx

from mlmesh.training.v1 import training_pb2
from mlmesh_client import Client
from mlmesh_client.cli import Progress
from services.common.server import configure_logging
from services.common.settings import Settings
from services.launcher.mesh import Mesh

EXPERIMENT = "mlmesh-demo"
MODEL = "mnist-classifier"
TEST_IMAGE = 0  # index in MNIST's test split


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def failed(why: str) -> int:
    print(f"\ndemo failed: {why}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=0, help="0 = all 50,000 images")
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings)
    for noisy in ("httpx", "services.launcher", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    step(
        "starting the mesh "
        "(PostgreSQL, Redis, MLflow, Registry, Training, worker, Inference, Envoy)"
    )
    with Mesh(settings) as mesh:
        print(mesh.summary().replace("Press Ctrl-C to stop.", ""))
        _, key = mesh.api_key
        gateway = mesh.settings.gateway_url
        rest = httpx.Client(base_url=gateway, timeout=30)
        grpc_target = f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"

        step("GET /ready")
        print(rest.get("/ready").json())

        step(f"training a CNN on MNIST for {args.epochs} epochs (POST /train, then watch)")
        with Client(grpc_target, api_key=key) as sdk:
            job = sdk.train(
                on_event=Progress(sys.stdout),
                epochs=args.epochs,
                train_subset=args.train_subset,
                experiment_name=EXPERIMENT,
                model_name=MODEL,
            )
        if job.state != training_pb2.JOB_STATE_SUCCEEDED:
            return failed(f"training did not succeed: {job.error}")
        version = job.model_version
        accuracy = job.metrics["test_accuracy"]
        print(f"  run {job.mlflow_run_id}: {MODEL} v{version}, test accuracy {accuracy:.4f}")
        run = rest.get(f"/v1/runs/{job.mlflow_run_id}").json()["run"]
        run_url = (
            f"{mesh.settings.gateway_mlflow_url}/#/experiments/{run['experiment_id']}"
            f"/runs/{job.mlflow_run_id}"
        )
        print(f"  see it in the MLflow UI (through the gateway): {run_url}")

        step(f"REST: curl -H 'x-api-key: ...' {gateway}/train/status/{job.job_id}")
        status = rest.get(f"/train/status/{job.job_id}", headers={"x-api-key": key}).json()
        print("  " + json.dumps({k: status[k] for k in _STATUS_FIELDS}))

        step(f"REST (public): curl {gateway}/experiments")
        for e in rest.get("/experiments").json()["experiments"]:
            print(f"  {e['experiment_id']:>4}  {e['name']}")

        step(f"REST (public): the run's metric history, GET /v1/runs/{job.mlflow_run_id}/...")
        history = rest.get(
            f"/v1/runs/{job.mlflow_run_id}/metric-history", params={"metric_key": "val_accuracy"}
        ).json()["metrics"]
        print("  val_accuracy by epoch: " + ", ".join(f"{m['value']:.4f}" for m in history))

        step("REST without a key: POST /models/transition")
        denied = rest.post("/models/transition", json={"model_name": MODEL, "version": version})
        print(f"  HTTP {denied.status_code}: {denied.text.strip()}")

        step(f"REST with the key: promote v{version} to Production, archiving the previous one")
        promotion = {
            "model_name": MODEL,
            "version": version,
            "stage": "Production",
            "archive_existing_versions": True,
        }
        moved = rest.post("/models/transition", json=promotion, headers={"x-api-key": key})
        if moved.status_code == 400 and "is worse than production" in moved.text:
            # An earlier demo's version is in production and scored higher: the Registry asks
            # for confirmation. The demo serves what it trained, so it confirms.
            print(f"  HTTP 400: {moved.json()['message']}")
            print("  the demo serves what it trained: again with force=true")
            moved = rest.post(
                "/models/transition", json={**promotion, "force": True}, headers={"x-api-key": key}
            )
        if moved.status_code != 200:
            return failed(f"the promotion answered HTTP {moved.status_code}: {moved.text}")
        body = moved.json()
        print(
            f"  HTTP {moved.status_code}: v{body['model_version']['version']} is "
            f"{body['model_version']['stage']}, aliases {body['model_version']['aliases']}, "
            f"archived {body['archived_versions']}"
        )
        compared = body["comparison"]
        if compared["production_version"]:
            print(
                f"  {compared['metric_key']}: v{version} {compared.get('candidate_value', '-')}, "
                f"previous production v{compared['production_version']} "
                f"{compared.get('production_value', '-')}"
            )

        with Client(grpc_target, api_key=key) as sdk:
            step("gRPC (Python SDK): the model's versions")
            for v in sdk.list_model_versions(MODEL)[:4]:
                print(f"  v{v.version:<3} {v.stage:<10} aliases={list(v.aliases)}")
            step("gRPC: the audit log (who moved what, when)")
            for e in sdk.list_audit_events(MODEL, page_size=4):
                print(
                    f"  #{e.event_id} {e.time.ToJsonString()} {e.client}: "
                    f"v{e.version} {e.from_stage} -> {e.to_stage}"
                )

        with Client(grpc_target, api_key=key) as sdk:
            sample = sdk.dataset_sample("mnist", TEST_IMAGE)
        pixels, label = sample.pixels, sample.label
        body = {"image": list(pixels), "model_name": MODEL}
        body_file = mesh.settings.state_dir / "demo-predict.json"
        body_file.write_text(json.dumps(body))
        step(
            f"REST: classify MNIST test image {TEST_IMAGE} (a {label}) with the production version"
        )
        print(
            f"  curl -s -X POST {gateway}/predict -H {shlex.quote(f'x-api-key: {key}')} "
            f"-d @{shlex.quote(str(body_file))}"
        )
        print(f'  ({body_file} is {{"image": [784 floats in [0, 1]], "model_name": "{MODEL}"}})')
        answer = rest.post("/predict", json=body, headers={"x-api-key": key})
        if answer.status_code != 200:
            return failed(f"POST /predict answered HTTP {answer.status_code}: {answer.text}")
        by_rest = answer.json()
        shown = {**by_rest, "probabilities": [round(p, 3) for p in by_rest["probabilities"]]}
        print(f"  HTTP 200: {json.dumps(shown)}")

        with Client(grpc_target, api_key=key) as sdk:
            sample = sdk.dataset_sample("mnist", TEST_IMAGE + 1)
            pixels, label = sample.pixels, sample.label
            step(f"gRPC (Python SDK): test image {TEST_IMAGE + 1} (a {label}), then once more")
            by_grpc = sdk.predict(list(pixels), model_name=MODEL)
            repeat = sdk.predict(list(pixels), model_name=MODEL)
        for what, a in (("first ", by_grpc), ("repeat", repeat)):
            print(
                f"  {what}: class {a.prediction} (confidence {a.confidence:.4f}) from "
                f"{a.model_name} v{a.model_version}, cached: {str(a.cached).lower()}"
            )
        if by_grpc.cached:
            return failed("the first prediction of a new image came from the cache")
        if mesh.settings.prediction_cache_ttl_s > 0 and not repeat.cached:
            return failed("the repeated prediction did not come from the cache")

        step("the versions involved")
        answered = {
            "REST": by_rest["model_version"],
            "gRPC": by_grpc.model_version,
            "gRPC repeat": repeat.model_version,
        }
        print(f"  promoted to Production: {MODEL} v{version}")
        print("  answered: " + ", ".join(f"{how} v{v}" for how, v in answered.items()))
        if set(answered.values()) != {version}:
            return failed(f"predictions were not answered by the promoted v{version}")
        if by_grpc.prediction != label:
            print(f"  (the model got this one wrong: {by_grpc.prediction}, not {label})")
        step("stopping the mesh")
    print(
        f"\ndemo finished: trained {MODEL} v{version} (test accuracy {accuracy:.4f}), promoted "
        f"it, read it back and classified a test image with it over REST and gRPC through Envoy."
    )
    print(f"MLflow UI (through the gateway; `make up` keeps the mesh running): {run_url}")
    return 0


_STATUS_FIELDS = ("job_id", "state", "mlflow_run_id", "model_name", "model_version")


if __name__ == "__main__":
    sys.exit(main())
