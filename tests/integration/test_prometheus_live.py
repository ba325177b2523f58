"""The repo's Prometheus configuration against the real mesh: a real Prometheus (Debian's
package) scrapes every process on loopback, every target is up, the named metrics have samples
after real traffic, and every expression in the alert rules and dashboards names metrics the
mesh exports."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from mlmesh.training.v1 import training_pb2
from mlmesh_client import Client
from services.launcher.mesh import Mesh
from tests.conftest import free_port
from tests.unit.test_grafana_dashboards import dashboard_expressions, metric_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
T = TypeVar("T")

DEPLOY = Path(__file__).parents[2] / "deploy" / "prometheus"
JOBS = ("registry", "training", "inference", "worker", "envoy", "mlflow", "prometheus")


@pytest.fixture(scope="module")
def prometheus(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus with the repo's configuration, its targets rewritten to this mesh."""
    assert shutil.which("prometheus"), "run scripts/install-system-packages.sh (Debian prometheus)"
    s = mesh.settings
    work = tmp_path_factory.mktemp("prometheus")
    config_dir = work / "config"
    shutil.copytree(DEPLOY, config_dir)
    port = free_port()
    mlflow = urlsplit(s.mlflow_tracking_uri)
    targets = {
        "registry": [f"127.0.0.1:{s.registry_ops_port}"],
        "training": [f"127.0.0.1:{s.training_ops_port}"],
        # One target per Inference process (the launcher runs Settings.inference_endpoints()).
        "inference": [f"127.0.0.1:{e.ops_port}" for e in s.inference_endpoints()],
        "worker": [f"127.0.0.1:{s.worker_ops_port}"],
        "envoy": [f"{s.gateway_host}:{s.gateway_metrics_port}"],
        "mlflow": [f"{mlflow.hostname}:{mlflow.port}"],
        "prometheus": [f"127.0.0.1:{port}"],
    }
    for job, listed in targets.items():
        (config_dir / "targets" / f"{job}.json").write_text(json.dumps([{"targets": listed}]))
    config_path = config_dir / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    config["global"]["scrape_interval"] = "1s"  # the test waits for scrapes, not 15 s
    config["global"]["evaluation_interval"] = "1s"
    config_path.write_text(yaml.safe_dump(config))
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config_path}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def traffic(mesh: Mesh, keys: dict[str, str]) -> str:
    """Real traffic through the gateway: a training job, a promotion, predictions."""
    name = f"it-prom-{secrets.token_hex(3)}"
    target = f"127.0.0.1:{mesh.settings.gateway_port}"
    with Client(target, api_key=keys["alice"]) as sdk:
        job = sdk.train(
            epochs=1, architecture="mlp", train_subset=2000, model_name=name,
            experiment_name=name,
        )  # fmt: skip
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
        sdk.promote(name, job.model_version)
        for _ in range(3):
            sdk.predict([0.5] * 784, model_name=name)
        sdk.predict_batch([[0.1] * 784, [0.9] * 784], model_name=name)
    return name


def query(url: str, promql: str) -> list[dict]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def test_every_target_is_up(prometheus: str) -> None:
    def all_up() -> dict[str, str] | None:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]
        health = {t["labels"]["job"]: t["health"] for t in targets["activeTargets"]}
        return health if set(health) == set(JOBS) and set(health.values()) == {"up"} else None

    wait_for(all_up, "every target up")
    assert {r["metric"]["job"] for r in query(prometheus, "up == 1")} == set(JOBS)


NAMED = (
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
    "model_predictions_total",
    "model_prediction_duration_seconds_bucket",
    "prediction_cache_hits_total",
    "prediction_cache_misses_total",
    "inference_batch_size_bucket",
    "model_input_drift_psi",
    "model_alias_version",
    "training_jobs_active",
    "training_jobs_total",
    "training_epoch_duration_seconds_bucket",
    "training_queue_depth",
    "envoy_http_downstream_rq_total",
)


@pytest.mark.parametrize("name", NAMED)
def test_named_metrics_have_samples_after_traffic(prometheus: str, traffic: str, name: str) -> None:
    wait_for(lambda: query(prometheus, name), f"samples of {name}", timeout_s=30)


def test_predictions_are_counted_by_version(prometheus: str, traffic: str) -> None:
    found = wait_for(
        lambda: query(prometheus, f'model_predictions_total{{model_name="{traffic}"}}'),
        "the test model's predictions",
    )
    assert {r["metric"]["model_version"] for r in found} == {"1"}
    assert sum(float(r["value"][1]) for r in found) == 5


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def test_every_rule_and_dashboard_expression_names_exported_metrics(
    prometheus: str, traffic: str
) -> None:
    wait_for(lambda: query(prometheus, "model_predictions_total"), "a scrape after traffic")
    series = set(httpx.get(f"{prometheus}/api/v1/label/__name__/values").json()["data"])
    metadata = httpx.get(f"{prometheus}/api/v1/metadata").json()["data"]
    exported = set(series)
    for family in metadata:  # families with no sample yet (a labelled counter never hit)
        for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created"):
            exported.add(family + suffix)
    recorded = {
        rule["record"]
        for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    expressions = [(f"rule {n}", e) for n, e in rule_expressions()] + [
        (f"dashboard {d} / {p}", e) for d, p, e in dashboard_expressions()
    ]
    assert expressions
    unknown = {
        (where, name)
        for where, expression in expressions
        for name in metric_names(expression)
        if name not in exported and name not in recorded
    }
    assert not unknown, sorted(unknown)
