"""The Registry service end to end: real MLflow on PostgreSQL, through Envoy, REST and gRPC."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import grpc
import httpx
import pytest
from mlflow import MlflowClient

from mlmesh.registry.v1 import registry_pb2 as pb
from mlmesh.registry.v1 import registry_pb2_grpc
from services.launcher.mesh import Mesh
from tests.conftest import metric_sample
from tests.integration.models import log_classifier, register_without_artifacts


@dataclass(frozen=True)
class Seeded:
    """What the tests put into MLflow through MLflow's own client."""

    experiment_id: str
    experiment_name: str
    run_ids: list[str]
    model_name: str


@pytest.fixture(scope="module")
def seeded(mesh: Mesh) -> Seeded:
    client = MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    name = f"it-exp-{secrets.token_hex(3)}"
    experiment_id = client.create_experiment(name, tags={"team": "vision"})
    run_ids = []
    for i, lr in enumerate([0.1, 0.01, 0.001]):
        run = client.create_run(experiment_id, run_name=f"run-{i}", tags={"idx": str(i)})
        client.log_param(run.info.run_id, "lr", str(lr))
        for step, acc in enumerate([0.5, 0.7, 0.8 + i / 100]):
            client.log_metric(run.info.run_id, "val_accuracy", acc, step=step)
        client.log_text(run.info.run_id, f"run {i}", "notes/readme.txt")
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    model = f"it-model-{secrets.token_hex(3)}"
    client.create_registered_model(model, description="integration test model")
    for i, run_id in enumerate(run_ids):
        # Servable versions: the Registry refuses to promote one the Inference service
        # cannot load.
        log_classifier(mesh.settings.mlflow_tracking_uri, model, run_id=run_id, favourite=i)
    return Seeded(experiment_id, name, run_ids, model)


@pytest.fixture(scope="module")
def registry(gateway_channel: grpc.Channel) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(gateway_channel)


def key_header(keys: dict[str, str], client: str = "alice") -> dict[str, str]:
    return {"x-api-key": keys[client]}


# -- reads over REST ------------------------------------------------------------------------


def test_health_and_ready(rest: httpx.Client) -> None:
    assert rest.get("/health").json() == {"status": "healthy"}
    ready = rest.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "mlflow": "connected",
        "redis": "connected",
        "postgres": "connected",
    }


@pytest.mark.parametrize("path", ["/v1/experiments", "/experiments"])
def test_list_experiments_rest(rest: httpx.Client, seeded: Seeded, path: str) -> None:
    resp = rest.get(path)
    assert resp.status_code == 200
    names = {e["name"]: e for e in resp.json()["experiments"]}
    assert names[seeded.experiment_name]["tags"] == {"team": "vision"}
    assert names[seeded.experiment_name]["experiment_id"] == seeded.experiment_id


def test_list_experiments_paginates(rest: httpx.Client, seeded: Seeded) -> None:
    first = rest.get("/v1/experiments", params={"page_size": 1}).json()
    assert len(first["experiments"]) == 1
    assert first["next_page_token"]
    second = rest.get(
        "/v1/experiments", params={"page_size": 1, "page_token": first["next_page_token"]}
    ).json()
    assert len(second["experiments"]) == 1
    assert second["experiments"][0]["experiment_id"] != first["experiments"][0]["experiment_id"]


def test_get_experiment_rest(rest: httpx.Client, seeded: Seeded) -> None:
    resp = rest.get(f"/v1/experiments/{seeded.experiment_id}")
    assert resp.status_code == 200
    assert resp.json()["experiment"]["name"] == seeded.experiment_name
    missing = rest.get("/v1/experiments/987654321")
    assert missing.status_code == 404
    assert "987654321" in missing.json()["message"]


def test_list_runs_filter_order_and_pages(rest: httpx.Client, seeded: Seeded) -> None:
    resp = rest.get(
        "/v1/runs",
        params={
            "experiment_ids": seeded.experiment_id,
            "filter": "params.lr != '0.1'",
            "order_by": "metrics.val_accuracy DESC",
        },
    )
    assert resp.status_code == 200, resp.text
    runs = resp.json()["runs"]
    assert [r["run_id"] for r in runs] == [seeded.run_ids[2], seeded.run_ids[1]]
    assert runs[0]["status"] == "RUN_STATUS_FINISHED"
    paged = rest.get(
        "/v1/runs", params={"experiment_ids": seeded.experiment_id, "page_size": 2}
    ).json()
    assert len(paged["runs"]) == 2 and paged["next_page_token"]
    rest_page = rest.get(
        "/v1/runs",
        params={
            "experiment_ids": seeded.experiment_id,
            "page_size": 2,
            "page_token": paged["next_page_token"],
        },
    ).json()
    assert len(rest_page["runs"]) == 1
    assert rest_page["next_page_token"] == ""


def test_list_runs_needs_an_experiment(rest: httpx.Client) -> None:
    resp = rest.get("/v1/runs")
    assert resp.status_code == 400
    assert "experiment_ids" in resp.json()["message"]


def test_bad_filter_is_invalid_argument(rest: httpx.Client, seeded: Seeded) -> None:
    resp = rest.get(
        "/v1/runs", params={"experiment_ids": seeded.experiment_id, "filter": "metrics. >>"}
    )
    assert resp.status_code == 400
    assert resp.json()["message"]


def test_get_run_with_params_metrics_tags(rest: httpx.Client, seeded: Seeded) -> None:
    run = rest.get(f"/v1/runs/{seeded.run_ids[2]}").json()["run"]
    assert run["params"] == {"lr": "0.001"}
    assert run["tags"]["idx"] == "2"
    assert run["metrics"][0]["key"] == "val_accuracy"
    assert run["metrics"][0]["value"] == pytest.approx(0.82)


def test_metric_history(rest: httpx.Client, seeded: Seeded) -> None:
    resp = rest.get(
        f"/v1/runs/{seeded.run_ids[0]}/metric-history", params={"metric_key": "val_accuracy"}
    )
    assert resp.status_code == 200
    history = resp.json()["metrics"]
    assert [m["step"] for m in history] == ["0", "1", "2"]  # int64 is a string in proto3 JSON
    assert [m["value"] for m in history] == pytest.approx([0.5, 0.7, 0.8])


def test_list_artifacts(rest: httpx.Client, seeded: Seeded) -> None:
    root = rest.get(f"/v1/runs/{seeded.run_ids[0]}/artifacts").json()
    assert {"path": "notes", "is_dir": True, "file_size": "0"} in root["files"]
    notes = rest.get(f"/v1/runs/{seeded.run_ids[0]}/artifacts", params={"path": "notes"}).json()
    assert [f["path"] for f in notes["files"]] == ["notes/readme.txt"]
    assert (
        rest.get(f"/v1/runs/{seeded.run_ids[0]}/artifacts", params={"path": "../x"}).status_code
        == 400
    )


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_list_models_rest(rest: httpx.Client, seeded: Seeded, path: str) -> None:
    models = {m["name"]: m for m in rest.get(path).json()["registered_models"]}
    assert models[seeded.model_name]["description"] == "integration test model"


def test_model_and_versions_rest(rest: httpx.Client, seeded: Seeded) -> None:
    model = rest.get(f"/v1/models/{seeded.model_name}").json()["registered_model"]
    assert model["name"] == seeded.model_name
    versions = rest.get(f"/v1/models/{seeded.model_name}/versions").json()["model_versions"]
    assert [v["version"] for v in versions] == [3, 2, 1]
    v2 = rest.get(f"/v1/models/{seeded.model_name}/versions/2").json()["model_version"]
    assert v2["run_id"] == seeded.run_ids[1]
    assert v2["source"].startswith("models:/")  # MLflow 3: the run's logged model
    assert rest.get(f"/v1/models/{seeded.model_name}/versions/99").status_code == 404
    assert rest.get("/v1/models/no-such-model/versions").status_code == 404


# -- reads over gRPC -----------------------------------------------------------------------


def test_reads_over_grpc(registry: registry_pb2_grpc.RegistryServiceStub, seeded: Seeded) -> None:
    exps = registry.ListExperiments(
        pb.ListExperimentsRequest(filter=f"name = '{seeded.experiment_name}'")
    )
    assert [e.experiment_id for e in exps.experiments] == [seeded.experiment_id]
    run = registry.GetRun(pb.GetRunRequest(run_id=seeded.run_ids[1])).run
    assert run.params["lr"] == "0.01"
    versions = registry.ListModelVersions(pb.ListModelVersionsRequest(name=seeded.model_name))
    assert [v.version for v in versions.model_versions] == [3, 2, 1]
    with pytest.raises(grpc.RpcError) as err:
        registry.GetRegisteredModel(pb.GetRegisteredModelRequest(name="no-such-model"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        registry.ListExperiments(pb.ListExperimentsRequest(page_size=5000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in err.value.details()


# -- transitions and the audit log -----------------------------------------------------------


def test_transitions_and_audit(
    rest: httpx.Client,
    registry: registry_pb2_grpc.RegistryServiceStub,
    keys: dict[str, str],
    seeded: Seeded,
) -> None:
    name = seeded.model_name
    # The seed's route and body shape, stage in any case; a forged identity header is ignored.
    first = rest.post(
        "/models/transition",
        json={"model_name": name, "version": 1, "stage": "production"},
        headers={**key_header(keys, "alice"), "x-mlmesh-client": "mallory"},
    )
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model_version"]["stage"] == "Production"
    assert body["model_version"]["aliases"] == ["production"]
    assert body["previous_version"] == 0
    assert body["audit_event"]["client"] == "alice"

    # Over gRPC, as bob: v2 takes production and v1 is archived.
    second = registry.TransitionModelVersion(
        pb.TransitionModelVersionRequest(
            model_name=name, version=2, stage="PRODUCTION", archive_existing_versions=True
        ),
        metadata=[("x-api-key", keys["bob"]), ("x-mlmesh-client", "mallory")],
    )
    assert second.model_version.aliases == ["production"]
    assert second.previous_version == 1
    assert list(second.archived_versions) == [1]
    v1 = rest.get(f"/v1/models/{name}/versions/1").json()["model_version"]
    assert (v1["stage"], v1["aliases"]) == ("Archived", [])
    by_alias = rest.get(f"/v1/models/{name}/aliases/production").json()["model_version"]
    assert by_alias["version"] == 2
    model = rest.get(f"/v1/models/{name}").json()["registered_model"]
    assert model["aliases"] == {"production": 2}
    listed = rest.get(f"/v1/models/{name}/versions").json()["model_versions"]
    assert [(v["version"], v["stage"], v["aliases"]) for v in listed] == [
        (3, "None", []),
        (2, "Production", ["production"]),
        (1, "Archived", []),
    ]

    # The REST binding with the path parameters; Staging, then Archived drops the alias.
    staged = rest.post(
        f"/v1/models/{name}/versions/3:transition",
        json={"stage": "Staging"},
        headers=key_header(keys, "bob"),
    )
    assert staged.status_code == 200, staged.text
    assert staged.json()["model_version"]["aliases"] == ["staging"]
    archived = rest.post(
        "/models/transition",
        json={"model_name": name, "version": "3", "stage": "ARCHIVED"},
        headers=key_header(keys, "alice"),
    )
    assert archived.json()["model_version"]["aliases"] == []
    assert archived.json()["model_version"]["stage"] == "Archived"

    events = rest.get(
        "/v1/audit-events", params={"model_name": name}, headers=key_header(keys)
    ).json()["audit_events"]
    assert [(e["client"], e["version"], e["from_stage"], e["to_stage"]) for e in events] == [
        ("alice", 3, "Staging", "Archived"),
        ("bob", 3, "None", "Staging"),
        ("bob", 2, "None", "Production"),
        ("alice", 1, "None", "Production"),
    ]
    assert events[2]["previous_version"] == 1 and events[2]["archived_versions"] == [1]
    page = rest.get(
        "/v1/audit-events",
        params={"model_name": name, "page_size": 3},
        headers=key_header(keys),
    ).json()
    rest_of = rest.get(
        "/v1/audit-events",
        params={"model_name": name, "page_size": 3, "page_token": page["next_page_token"]},
        headers=key_header(keys),
    ).json()
    assert [e["event_id"] for e in page["audit_events"] + rest_of["audit_events"]] == [
        e["event_id"] for e in events
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model_name": "x", "version": 1, "stage": "Retired"}, "stage must be one of"),
        ({"model_name": "x", "stage": "Production"}, "version must be a positive number"),
        ({"version": 1, "stage": "Production"}, "model_name is required"),
        ({"model_name": "x", "version": "one", "stage": "Production"}, "version"),
    ],
)
def test_bad_transitions_are_400(
    rest: httpx.Client, keys: dict[str, str], body: dict, needle: str
) -> None:
    resp = rest.post("/models/transition", json=body, headers=key_header(keys))
    assert resp.status_code == 400, resp.text
    assert needle in resp.text


def test_transition_of_unknown_version_is_404(
    rest: httpx.Client, keys: dict[str, str], seeded: Seeded
) -> None:
    resp = rest.post(
        "/models/transition",
        json={"model_name": seeded.model_name, "version": 42, "stage": "Production"},
        headers=key_header(keys),
    )
    assert resp.status_code == 404
    assert "42" in resp.json()["message"]


def test_malformed_json_is_400(rest: httpx.Client, keys: dict[str, str]) -> None:
    resp = rest.post(
        "/models/transition",
        content=b'{"model_name": ',
        headers={**key_header(keys), "content-type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.text.strip()


def test_unknown_query_parameter_is_400(rest: httpx.Client) -> None:
    resp = rest.get("/v1/experiments", params={"colour": "red"})
    assert resp.status_code == 400
    assert "colour" in resp.text


def test_unknown_body_field_is_400(
    rest: httpx.Client, keys: dict[str, str], seeded: Seeded
) -> None:
    resp = rest.post(
        "/models/transition",
        json={"model_name": seeded.model_name, "version": 1, "stage": "Staging", "colour": 1},
        headers=key_header(keys),
    )
    assert resp.status_code == 400
    assert "colour" in resp.text


# -- what a promotion refuses ------------------------------------------------------------------


def _transition(rest: httpx.Client, keys: dict[str, str], name: str, version: int, stage: str,
                **more: object) -> httpx.Response:  # fmt: skip
    return rest.post(
        f"/v1/models/{name}/versions/{version}:transition",
        json={"stage": stage, **more},
        headers=key_header(keys),
    )


def _state(rest: httpx.Client, name: str) -> list[tuple[int, str, list[str]]]:
    listed = rest.get(f"/v1/models/{name}/versions").json()["model_versions"]
    return [(v["version"], v["stage"], v["aliases"]) for v in listed]


def _events(rest: httpx.Client, keys: dict[str, str], name: str) -> list[dict]:
    return rest.get(
        "/v1/audit-events", params={"model_name": name}, headers=key_header(keys)
    ).json()["audit_events"]


def _scrape(mesh: Mesh) -> str:
    return httpx.get(f"http://127.0.0.1:{mesh.settings.registry_ops_port}/metrics").text


def test_a_version_inference_cannot_load_is_never_promoted(
    rest: httpx.Client, keys: dict[str, str], mesh: Mesh
) -> None:
    uri, name = mesh.settings.mlflow_tracking_uri, f"it-unservable-{secrets.token_hex(3)}"
    assert log_classifier(uri, name) == 1
    assert _transition(rest, keys, name, 1, "Production").status_code == 200
    assert register_without_artifacts(uri, name) == 2
    refused_before = metric_sample(
        _scrape(mesh), "registry_transitions_refused_total", reason="cannot_serve"
    )
    for stage in ("Production", "Staging"):
        refused = _transition(rest, keys, name, 2, stage)
        assert refused.status_code == 400, refused.text
        body = refused.json()
        assert body["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert f"version 2 of {name!r} cannot be served" in body["message"]
        assert "files are missing from the artifact store" in body["message"]
    # Nothing moved, nothing was audited, and production answers as before.
    assert _state(rest, name) == [(2, "None", []), (1, "Production", ["production"])]
    assert [e["version"] for e in _events(rest, keys, name)] == [1]
    answer = rest.post(
        "/v1/predict", json={"image": [0.0] * 784, "model_name": name}, headers=key_header(keys)
    )
    assert answer.status_code == 200 and answer.json()["model_version"] == 1
    refused_after = metric_sample(
        _scrape(mesh), "registry_transitions_refused_total", reason="cannot_serve"
    )
    assert refused_after == refused_before + 2


def test_moving_production_away_needs_force(
    rest: httpx.Client, keys: dict[str, str], mesh: Mesh
) -> None:
    uri, name = mesh.settings.mlflow_tracking_uri, f"it-aliases-{secrets.token_hex(3)}"
    for favourite in (1, 2):
        log_classifier(uri, name, favourite=favourite)
    assert _transition(rest, keys, name, 1, "Production").status_code == 200
    for stage in ("Staging", "Archived"):
        refused = _transition(rest, keys, name, 1, stage)
        assert refused.status_code == 400, refused.text
        assert "would leave" in refused.json()["message"]
        assert "without a production version" in refused.json()["message"]
    assert _state(rest, name) == [(2, "None", []), (1, "Production", ["production"])]

    # Stages follow the aliases: one version per stage, the one holding its alias.
    assert _transition(rest, keys, name, 2, "Staging").status_code == 200
    assert _transition(rest, keys, name, 2, "Production").status_code == 200
    assert _state(rest, name) == [(2, "Production", ["production"]), (1, "None", [])]
    assert _transition(rest, keys, name, 1, "Staging").status_code == 200
    assert _transition(rest, keys, name, 2, "Staging", force=True).status_code == 200
    assert _state(rest, name) == [(2, "Staging", ["staging"]), (1, "None", [])]
    forced = _events(rest, keys, name)[0]
    assert forced["version"] == 2 and forced["to_stage"] == "Staging"
    assert forced["note"].startswith("forced: v2 is")


def test_a_worse_production_candidate_needs_force(
    rest: httpx.Client, keys: dict[str, str], mesh: Mesh
) -> None:
    uri, name = mesh.settings.mlflow_tracking_uri, f"it-worse-{secrets.token_hex(3)}"
    for accuracy in (0.987, 0.11, 0.99):
        log_classifier(uri, name, metrics={"test_accuracy": accuracy})
    first = _transition(rest, keys, name, 1, "Production").json()
    assert first["comparison"]["production_version"] == 0
    assert first["comparison"]["candidate_value"] == pytest.approx(0.987)

    refused = _transition(rest, keys, name, 2, "Production")
    assert refused.status_code == 400
    message = refused.json()["message"]
    assert "v2's test_accuracy 0.11 is worse than production v1's 0.987" in message
    assert "force" in message
    assert _state(rest, name)[1:] == [(2, "None", []), (1, "Production", ["production"])]

    forced = _transition(rest, keys, name, 2, "Production", force=True)
    assert forced.status_code == 200, forced.text
    body = forced.json()
    assert body["forced"] is True
    assert body["comparison"] == {
        "metric_key": "test_accuracy",
        "higher_is_better": True,
        "candidate_value": pytest.approx(0.11),
        "production_version": 1,
        "production_value": pytest.approx(0.987),
        "worse": True,
    }
    assert "worse than production v1" in body["audit_event"]["note"]

    better = _transition(rest, keys, name, 3, "Production").json()
    assert better["forced"] is False and better["comparison"]["worse"] is False


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/models/%00/versions/1", "name"),  # MLflow answered 500 to it: CI saw a 503
        ("/v1/models/a%00b", "name"),
        ("/v1/runs/%00", "run_id"),
        ("/v1/experiments/%00", "experiment_id"),
        ("/v1/audit-events?model_name=%00", "model_name"),
    ],
)
def test_a_nul_in_any_name_is_400_naming_the_field(
    rest: httpx.Client, keys: dict[str, str], path: str, field: str
) -> None:
    resp = rest.get(path, headers=key_header(keys))
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"].startswith(f"{field} contains a NUL character")
