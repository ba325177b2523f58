"""`make demo`: start the mesh, put a run and two model versions into MLflow, and exercise the
Registry through the gateway over REST and gRPC, printing what each step did.

Training and inference arrive with their services; until then the demo's model versions
point at a run's artifacts rather than at a trained network, and it says so.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import httpx
from mlflow import MlflowClient

from mlmesh_client import Client
from services.common.server import configure_logging
from services.common.settings import Settings
from services.launcher.mesh import Mesh

EXPERIMENT = "mlmesh-demo"
MODEL = "mlmesh-demo-model"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def seed(tracking_uri: str) -> tuple[str, list[int]]:
    """One run with params, per-epoch metrics and an artifact; two versions registered from it."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"demo-{int(time.time())}")
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.001")
    client.log_param(run_id, "epochs", "3")
    for epoch, acc in enumerate([0.95, 0.975, 0.985], start=1):
        client.log_metric(run_id, "val_accuracy", acc, step=epoch)
    client.log_text(run_id, "seeded by scripts/demo.py; not a trained model", "notes.txt")
    client.set_terminated(run_id)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL, description="versions created by make demo")
    versions = [
        int(client.create_model_version(MODEL, f"runs:/{run_id}/notes.txt", run_id).version)
        for _ in range(2)
    ]
    return run_id, versions


def main() -> int:
    settings = Settings()
    configure_logging(settings)
    for noisy in ("httpx", "services.launcher", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    step("starting the mesh (PostgreSQL, Redis, MLflow, Registry, Envoy)")
    with Mesh(settings) as mesh:
        print(mesh.summary().replace("Press Ctrl-C to stop.", ""))
        _, key = mesh.api_key
        gateway = mesh.settings.gateway_url
        rest = httpx.Client(base_url=gateway, timeout=30)
        grpc_target = f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"

        step("GET /ready")
        print(rest.get("/ready").json())

        step(f"seeding MLflow at {mesh.settings.mlflow_tracking_uri}")
        run_id, (v_a, v_b) = seed(mesh.settings.mlflow_tracking_uri)
        print(f"run {run_id} in experiment {EXPERIMENT!r}; {MODEL} versions {v_a} and {v_b}")

        step(f"REST (public): curl {gateway}/experiments")
        for e in rest.get("/experiments").json()["experiments"]:
            print(f"  {e['experiment_id']:>4}  {e['name']}")

        step(f"REST (public): curl {gateway}/v1/runs?experiment_ids=...&order_by=...")
        exp = rest.get("/v1/experiments", params={"filter": f"name = '{EXPERIMENT}'"}).json()
        runs = rest.get(
            "/v1/runs",
            params={
                "experiment_ids": exp["experiments"][0]["experiment_id"],
                "order_by": "attributes.start_time DESC",
                "page_size": 3,
            },
        ).json()["runs"]
        for r in runs:
            print(f"  {r['run_id']}  {r['status']}  params={r['params']}")

        step("REST without a key: POST /models/transition")
        denied = rest.post("/models/transition", json={"model_name": MODEL, "version": v_a})
        print(f"  HTTP {denied.status_code}: {denied.text.strip()}")

        step(f"REST with the key: POST /models/transition v{v_a} -> Production")
        moved = rest.post(
            "/models/transition",
            json={"model_name": MODEL, "version": v_a, "stage": "Production"},
            headers={"x-api-key": key},
        )
        print(f"  HTTP {moved.status_code}: " + json.dumps(moved.json()["model_version"]))

        step(f"gRPC (Python SDK): promote v{v_b} to Production, archiving v{v_a}")
        with Client(grpc_target, api_key=key) as sdk:
            done = sdk.transition(MODEL, v_b, "production", archive_existing=True)
            print(
                f"  v{done.model_version.version} {done.model_version.stage}, "
                f"previous v{done.previous_version}, archived {list(done.archived_versions)}"
            )
            step("gRPC: the model's versions")
            for v in sdk.list_model_versions(MODEL)[:4]:
                print(f"  v{v.version:<3} {v.stage:<10} aliases={list(v.aliases)}")
            step("gRPC: the audit log (who moved what, when)")
            for e in sdk.list_audit_events(MODEL, page_size=4):
                print(
                    f"  #{e.event_id} {e.time.ToJsonString()} {e.client}: "
                    f"v{e.version} {e.from_stage} -> {e.to_stage}"
                )

        step("REST: /train and /predict are not running yet")
        print("  " + rest.post("/train", json={"epochs": 1}, headers={"x-api-key": key}).text)
        step("stopping the mesh")
    print("\ndemo finished: the Registry answered over REST and gRPC through Envoy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
