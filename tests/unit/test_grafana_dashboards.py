"""Grafana's provisioning and dashboards (deploy/grafana) are well formed and query only
metrics the mesh exports.

``dashboard_expressions()`` (and ``promql``, ``metric_names``) are imported by a live test
that checks every dashboard's metrics against a real scrape; keep them importable here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCE_UID = "prometheus"
# Where docker-compose.yml mounts deploy/grafana/dashboards in the Grafana container.
CONTAINER_DASHBOARDS = "/etc/grafana/dashboards"

# Every metric a dashboard may query: the services' (services/*/metrics.py, the gRPC
# interceptor, the worker) and Envoy's, as its admin /stats/prometheus names them (seen on a
# running mesh, Envoy 1.40; the vhost_route ones come from each RPC route's stat_prefix).
KNOWN_METRICS = frozenset(
    {
        # every gRPC service
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        # inference
        "model_predictions_total",
        "model_prediction_duration_seconds_bucket",
        "prediction_cache_hits_total",
        "prediction_cache_misses_total",
        "prediction_cache_errors_total",
        "inference_batch_size_bucket",
        "inference_batch_size_sum",
        "inference_batch_size_count",
        "inference_forward_duration_seconds_bucket",
        "model_input_drift_psi",
        "model_input_drift_window_images",
        "inference_models_loaded",
        "model_feedback_total",
        "model_feedback_correct_total",
        "rollout_requests_total",
        "shadow_answers_total",
        "shadow_dropped_total",
        # training service
        "training_jobs_submitted_total",
        "training_sweeps_submitted_total",
        # training worker
        "training_jobs_active",
        "training_jobs_total",
        "training_epoch_duration_seconds_bucket",
        "training_epoch_duration_seconds_count",
        "training_queue_depth",
        # Envoy
        "envoy_http_downstream_rq_total",
        "envoy_http_downstream_rq_completed",
        "envoy_http_downstream_rq_xx",
        "envoy_http_downstream_rq_active",
        "envoy_http_downstream_rq_time_bucket",
        "envoy_vhost_route_upstream_rq",
        "envoy_vhost_route_upstream_rq_total",
        "envoy_vhost_route_upstream_rq_time_bucket",
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_cluster_upstream_rq_timeout",
        "envoy_cluster_upstream_rq_active",
        "envoy_cluster_upstream_cx_none_healthy",
        "envoy_cluster_membership_healthy",
    }
)

# Grafana's variables, as a Prometheus query would see them once Grafana substituted them.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}
_PROMQL_WORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)


def dashboards() -> dict[str, dict[str, Any]]:
    """Each dashboard JSON under deploy/grafana/dashboards, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included; rows themselves excluded."""
    found = []
    for p in panels:
        if p.get("type") == "row":
            found += _panels(p.get("panels", []))
        else:
            found.append(p)
    return found


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL expr) for every query of every dashboard.

    The expressions are as written, with Grafana variables such as ``$__rate_interval``;
    ``promql(expr)`` makes one a query Prometheus itself accepts.
    """
    return [
        (name, panel["title"], target["expr"])
        for name, board in dashboards().items()
        for panel in _panels(board["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def promql(expr: str) -> str:
    """``expr`` with Grafana's variables replaced by fixed durations."""
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range durations
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in _PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


# -- the tests ----------------------------------------------------------------------------------


def test_dashboards_parse_with_unique_uids() -> None:
    boards = dashboards()
    assert {"gateway", "inference", "training"} <= set(boards)
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids), uids
    for name, board in boards.items():
        assert board["title"] and board["uid"], name
        assert board["schemaVersion"] >= 39, name
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"
        for p in board["panels"]:
            pos = p["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: {p['title']} overflows the grid"


def test_every_panel_queries_the_provisioned_prometheus() -> None:
    for name, board in dashboards().items():
        for panel in _panels(board["panels"]):
            where = f"{name}: {panel['title']!r}"
            assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, where
            assert panel.get("targets"), f"{where} has no query"
            for target in panel["targets"]:
                assert target.get("datasource", {}).get("uid") == DATASOURCE_UID, where
                assert target.get("expr", "").strip(), f"{where} has an empty query"


def test_dashboards_query_only_metrics_the_mesh_exports() -> None:
    unknown = [
        (name, title, sorted(metric_names(expr) - KNOWN_METRICS))
        for name, title, expr in dashboard_expressions()
        if metric_names(expr) - KNOWN_METRICS
    ]
    assert not unknown, unknown
    assert all(metric_names(expr) for _, _, expr in dashboard_expressions())


def test_metric_names_ignores_functions_labels_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (method, le) (rate(a_bucket{x="y z"}[$__rate_interval])))'
        " / on (method) group_left b_total offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:check_{i}", "expr": promql(expr)}
        for i, (_, _, expr) in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_names_the_datasource_and_the_dashboards_dir() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/mlmesh.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == CONTAINER_DASHBOARDS
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{CONTAINER_DASHBOARDS}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
