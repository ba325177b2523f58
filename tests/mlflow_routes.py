"""Every route of the installed MLflow server, read from MLflow itself: its Flask app (the REST
API of mlflow.server.handlers.get_endpoints() and the UI's own routes) and the FastAPI routers
`mlflow server` mounts around it. The tests that must cover every MLflow route use this
(tests/unit/test_mlflow_policy.py, tests/integration/test_auth_matrix.py), so a route a new
MLflow adds is in them without anyone editing them."""

from __future__ import annotations

import re
import warnings
from functools import cache

_FLASK_VAR = re.compile(r"<(?:(path):)?[^>]+>")
_FASTAPI_VAR = re.compile(r"\{[^}:]+(:path)?\}")


@cache
def mlflow_server_routes() -> tuple[tuple[str, str], ...]:
    """(verb, path) of every route, with one concrete path for each (its variables filled in),
    sorted; HEAD and OPTIONS, which every route answers, left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's deprecations, on import
        from mlflow.server import app as flask_app
        from mlflow.server.fastapi_app import create_fastapi_app

        fastapi_app = create_fastapi_app(flask_app)
    found: set[tuple[str, str]] = set()
    for rule in flask_app.url_map.iter_rules():
        path = _FLASK_VAR.sub(lambda m: "a/b.txt" if m.group(1) else "x1", rule.rule)
        found |= {(verb, path) for verb in rule.methods or () if verb not in ("HEAD", "OPTIONS")}

    def walk(routes: list, prefix: str) -> None:
        for route in routes:
            context = getattr(route, "include_context", None)
            if context is not None:  # an included router
                walk(context.included_router.routes, prefix + context.prefix)
            elif hasattr(route, "methods") and hasattr(route, "path"):
                path = _FASTAPI_VAR.sub(
                    lambda m: "a/b.txt" if m.group(1) else "x1", prefix + route.path
                )
                found.update((verb, path) for verb in route.methods or ())
            # else: the mount of the Flask app at "/", read above

    walk(fastapi_app.routes, "")
    return tuple(sorted((v, p) for v, p in found if v not in ("HEAD", "OPTIONS")))
