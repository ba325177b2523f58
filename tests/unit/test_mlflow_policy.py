"""gateway/policy.py's MLflow table against the installed MLflow's own list of routes: every
route classified, every line of the table still one of MLflow's, and the classes the issue
promises (serving changes refused naming the RPC to use, registering with a key, reads
public). What Envoy does with them is tests/integration/test_auth_matrix.py."""

from __future__ import annotations

import re

import pytest

from gateway.policy import MLFLOW_ROUTES
from gateway.render import classify_mlflow, mlflow_path_regex, mlflow_routes
from tests.mlflow_routes import mlflow_server_routes

ROUTES = mlflow_routes()
SERVED = mlflow_server_routes()


def example(key: str) -> tuple[str, str]:
    """A (verb, path) the table line ``key`` is written for."""
    verb, template = key.split(" ", 1)
    path = (
        template.replace("{api}", "/api/2.0/mlflow/")
        .replace("{artifacts}", "/api/2.0/mlflow-artifacts/")
    )  # fmt: skip
    path = re.sub(r"\{[^}=]+=\*\*\}", "a/b.txt", path)
    return verb, re.sub(r"\{[^}]+\}", "x1", path)


def test_mlflow_has_routes_to_check() -> None:
    assert len(SERVED) > 400, len(SERVED)
    assert ("POST", "/api/2.0/mlflow/registered-models/alias") in SERVED
    assert ("GET", "/") in SERVED


def test_every_route_of_mlflow_is_classified() -> None:
    missing = [f"{v} {p}" for v, p in SERVED if classify_mlflow(v, p, ROUTES) is None]
    assert not missing, f"MLflow routes missing from gateway/policy.py MLFLOW_ROUTES: {missing}"


def test_every_line_of_the_table_is_a_route_of_mlflow() -> None:
    used = {route.key for v, p in SERVED if (route := classify_mlflow(v, p, ROUTES))}
    stale = sorted(set(MLFLOW_ROUTES) - used)
    assert not stale, f"MLFLOW_ROUTES lists routes the installed MLflow does not have: {stale}"


@pytest.mark.parametrize("key", sorted(MLFLOW_ROUTES))
def test_each_line_takes_its_own_paths(key: str) -> None:
    # The listener tries lines in order: none may be shadowed by an earlier one.
    route = classify_mlflow(*example(key), ROUTES)
    assert route is not None and route.key == key, (key, route)
    assert route.rule.access in ("public", "protected", "refused")
    assert (route.rule.access == "refused") == bool(route.rule.why), key


@pytest.mark.parametrize(
    "key",
    [
        "POST {api}registered-models/alias",
        "DELETE {api}registered-models/alias",
        "POST {api}model-versions/transition-stage",
        "DELETE {api}model-versions/delete",
        "DELETE {api}registered-models/delete",
        "POST {api}registered-models/rename",
        "DELETE {artifacts}artifacts/{artifact_path=**}",
    ],
)
def test_what_changes_serving_is_refused_naming_the_rpc(key: str) -> None:
    rule = MLFLOW_ROUTES[key]
    assert rule.access == "refused"
    assert "TransitionModelVersion" in rule.why and "mlmesh promote" in rule.why


@pytest.mark.parametrize(
    ("verb", "path", "access"),
    [
        # what the UI reads and searches
        ("GET", "/", "public"),
        ("GET", "/static-files/static/js/main.js", "public"),
        ("POST", "/ajax-api/2.0/mlflow/experiments/search", "public"),
        ("POST", "/ajax-api/2.0/mlflow/runs/search", "public"),
        ("GET", "/ajax-api/2.0/mlflow/registered-models/search", "public"),
        ("GET", "/ajax-api/2.0/mlflow/model-versions/search", "public"),
        ("GET", "/ajax-api/2.0/mlflow/metrics/get-history", "public"),
        ("GET", "/get-artifact", "public"),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model/MLmodel", "public"),
        ("GET", "/api/2.0/mlflow/registered-models/alias", "public"),
        # what logs experiments, runs and models: a key
        ("POST", "/api/2.0/mlflow/experiments/create", "protected"),
        ("POST", "/api/2.0/mlflow/experiments/delete", "protected"),
        ("POST", "/api/2.0/mlflow/runs/create", "protected"),
        ("POST", "/api/2.0/mlflow/runs/delete", "protected"),
        ("POST", "/api/2.0/mlflow/runs/log-batch", "protected"),
        ("POST", "/api/2.0/mlflow/runs/log-metric", "protected"),
        ("POST", "/api/2.0/mlflow/runs/log-parameter", "protected"),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model/MLmodel", "protected"),
        ("POST", "/api/2.0/mlflow/registered-models/create", "protected"),
        ("POST", "/api/2.0/mlflow/model-versions/create", "protected"),
        # and the rest
        ("POST", "/api/2.0/mlflow/registered-models/alias", "refused"),
        ("POST", "/ajax-api/3.0/mlflow/assistant/message", "refused"),
        ("POST", "/gateway/openai/v1/chat/completions", "refused"),
    ],
)
def test_the_issue_s_classes(verb: str, path: str, access: str) -> None:
    route = classify_mlflow(verb, path, ROUTES)
    assert route is not None and route.rule.access == access, (verb, path, route)


def test_what_the_table_does_not_name_is_refused() -> None:
    for verb, path in [
        ("GET", "/metrics"),
        ("GET", "/api/2.0/mlflow/no-such-thing"),
        ("HEAD", "/"),
        ("OPTIONS", "/api/2.0/mlflow/registered-models/alias"),
        ("POST", "/api/2.0/mlflow/registered-models/alias/"),
        ("PUT", "/api/2.0/mlflow/registered-models/alias"),
    ]:
        assert classify_mlflow(verb, path, ROUTES) is None, (verb, path)


def test_prefixes_cover_mlflow_s_and_nothing_else() -> None:
    regex = re.compile(mlflow_path_regex("{api}runs/get"))
    for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/", "/api/3.0/mlflow/"):
        assert regex.fullmatch(prefix + "runs/get")
    for path in (
        "/api/2.0/mlflowruns/get",
        "/xapi/2.0/mlflow/runs/get",
        "/api/2.0/mlflow/runs/gets",
    ):
        assert not regex.fullmatch(path), path
