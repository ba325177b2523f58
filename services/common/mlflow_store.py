"""MLflow's tracking store and model registry, read through a small synchronous store.

Every method blocks on HTTP; callers run them off the event loop. MLflow's exceptions are
turned into mlmesh's domain errors here (``mlflow_errors``), so nothing above this module
knows MLflow's codes. The Registry (which also changes the registry, services/registry/store.py)
and the Inference service (which reads versions and aliases) share it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import requests
from mlflow import MlflowClient
from mlflow.entities import Experiment, FileInfo, Metric, Run, ViewType
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException, RestException

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.pagination import Page

log = logging.getLogger(__name__)


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    try:
        yield
    except RestException as exc:
        code = exc.error_code
        # MLflow reports a missing alias as INVALID_PARAMETER_VALUE "... not found".
        missing = code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message.lower()
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or missing:
            raise NotFound(f"{what}: {exc.message}") from exc
        if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"):
            raise InvalidArgument(f"{what}: {exc.message}") from exc
        raise Unavailable(f"{what}: MLflow answered {code}: {exc.message}") from exc
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE":
            raise InvalidArgument(f"{what}: {exc.message}") from exc
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"{what}: {exc.message}") from exc
        raise Unavailable(f"{what}: MLflow request failed: {exc.message}") from exc
    except requests.RequestException as exc:
        raise Unavailable(f"{what}: MLflow is unreachable: {exc}") from exc


def _with_aliases(version: ModelVersion, aliases: list[str]) -> ModelVersion:
    proto = version.to_proto()
    del proto.aliases[:]
    proto.aliases.extend(sorted(aliases))
    return ModelVersion.from_proto(proto)


def quote(value: str) -> str:
    """Quote a value for an MLflow filter string."""
    if "'" in value and '"' in value:
        raise InvalidArgument(f"name {value!r} cannot contain both quote characters")
    return f'"{value}"' if "'" in value else f"'{value}'"


class MlflowStore:
    """Reads MLflow's tracking store and model registry."""

    def __init__(self, tracking_uri: str) -> None:
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- experiments and runs ---------------------------------------------------------------
    def list_experiments(
        self, page_size: int, page_token: str, filter_string: str, order_by: list[str]
    ) -> Page[Experiment]:
        with mlflow_errors("list experiments"):
            found = self._client.search_experiments(
                view_type=ViewType.ACTIVE_ONLY,
                max_results=page_size,
                filter_string=filter_string or None,
                order_by=order_by or None,
                page_token=page_token or None,
            )
        return Page(list(found), found.token or "")

    def get_experiment(self, experiment_id: str) -> Experiment:
        with mlflow_errors(f"experiment {experiment_id!r}"):
            return self._client.get_experiment(experiment_id)

    def list_runs(
        self,
        experiment_ids: list[str],
        filter_string: str,
        order_by: list[str],
        page_size: int,
        page_token: str,
    ) -> Page[Run]:
        with mlflow_errors("list runs"):
            found = self._client.search_runs(
                experiment_ids=experiment_ids,
                filter_string=filter_string,
                max_results=page_size,
                order_by=order_by or None,
                page_token=page_token or None,
            )
        return Page(list(found), found.token or "")

    def get_run(self, run_id: str) -> Run:
        with mlflow_errors(f"run {run_id!r}"):
            return self._client.get_run(run_id)

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        with mlflow_errors(f"metric {key!r} of run {run_id!r}"):
            self._client.get_run(run_id)  # a missing run is NOT_FOUND, not an empty history
            return sorted(
                self._client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
            )

    def list_artifacts(self, run_id: str, path: str) -> tuple[str, list[FileInfo]]:
        with mlflow_errors(f"artifacts of run {run_id!r}"):
            run = self._client.get_run(run_id)
            return run.info.artifact_uri, self._client.list_artifacts(run_id, path or None)

    # -- registry ---------------------------------------------------------------------------
    def list_registered_models(
        self, page_size: int, page_token: str, filter_string: str
    ) -> Page[RegisteredModel]:
        with mlflow_errors("list registered models"):
            found = self._client.search_registered_models(
                filter_string=filter_string or None,
                max_results=page_size,
                order_by=["name ASC"],
                page_token=page_token or None,
            )
        return Page(list(found), found.token or "")

    def get_registered_model(self, name: str) -> RegisteredModel:
        with mlflow_errors(f"registered model {name!r}"):
            return self._client.get_registered_model(name)

    def list_model_versions(self, name: str, page_size: int, page_token: str) -> Page[ModelVersion]:
        model = self.get_registered_model(name)  # NOT_FOUND for an unknown model, not []
        with mlflow_errors(f"versions of {name!r}"):
            found = self._client.search_model_versions(
                filter_string=f"name = {quote(name)}",
                max_results=page_size,
                order_by=["version_number DESC"],
                page_token=page_token or None,
            )
        # MLflow's version search leaves aliases out; the registered model has them all.
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        return Page(
            [_with_aliases(v, aliases.get(v.version, [])) for v in found], found.token or ""
        )

    def get_model_version(self, name: str, version: int) -> ModelVersion:
        with mlflow_errors(f"version {version} of {name!r}"):
            return self._client.get_model_version(name, str(version))

    def model_version_download_uri(self, name: str, version: int) -> str:
        """Where the artifacts of version ``version`` of ``name`` can be downloaded from."""
        with mlflow_errors(f"version {version} of {name!r}"):
            return self._client.get_model_version_download_uri(name, str(version))

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        with mlflow_errors(f"alias {alias!r} of {name!r}"):
            return self._client.get_model_version_by_alias(name, alias)

    def aliases(self, name: str) -> dict[str, int]:
        """Each alias of ``name`` and the version it points at."""
        model = self.get_registered_model(name)
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def run_metric(self, run_id: str, key: str) -> float | None:
        """The latest value of metric ``key`` of run ``run_id``, or None when it has none."""
        if not run_id:
            return None
        with mlflow_errors(f"run {run_id!r}"):
            return self._client.get_run(run_id).data.metrics.get(key)
