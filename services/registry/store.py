"""The Registry's changes to MLflow's model registry: transitions, with stages kept in step."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion

from services.common.errors import InvalidArgument, NotFound
from services.common.mlflow_store import MlflowStore, mlflow_errors, quote

# The stages a version can be moved to, and the alias that carries each one.
STAGE_ALIASES: dict[str, str | None] = {
    "Production": "production",
    "Staging": "staging",
    "Archived": None,
}


def parse_stage(stage: str) -> str:
    """Resolve a stage name in any case ("production", "PRODUCTION") to MLflow's spelling."""
    for name in STAGE_ALIASES:
        if stage.strip().lower() == name.lower():
            return name
    raise InvalidArgument(
        f"stage must be one of {', '.join(STAGE_ALIASES)} (any case), got {stage!r}"
    )


@dataclass(frozen=True)
class Transition:
    """What a transition changed."""

    model_version: ModelVersion
    from_stage: str
    to_stage: str
    previous_version: int
    archived_versions: list[int] = field(default_factory=list)


class RegistryStore(MlflowStore):
    """MlflowStore, plus the transitions only the Registry makes."""

    def all_aliases(self) -> dict[str, dict[str, int]]:
        """Every registered model's aliases: model name -> alias -> version."""
        found: dict[str, dict[str, int]] = {}
        token = ""
        while True:
            page = self.list_registered_models(1000, token, "")
            for model in page.items:
                found[model.name] = {a: int(v) for a, v in (model.aliases or {}).items()}
            token = page.next_page_token
            if not token:
                return found

    def aliases_if_registered(self, name: str) -> dict[str, int]:
        """The aliases of ``name``; none when MLflow no longer has the model."""
        try:
            return self.aliases(name)
        except NotFound:
            return {}

    def transition(self, name: str, version: int, stage: str, archive_existing: bool) -> Transition:
        """Move a version to a stage: aliases first (the current MLflow way), stages in step.

        Moving to Production or Staging points that stage's alias at the version and removes
        the version's other stage aliases; Archived removes them all. MLflow's stages then
        follow the aliases: a version is in Production or Staging exactly when it holds that
        alias, so the versions that were in the stage before leave it, to Archived with
        ``archive_existing`` and to None without. (The callers' guards, such as not leaving
        a model without production, are the Registry's.)
        """
        current = self.get_model_version(name, version)
        target_alias = STAGE_ALIASES[stage]
        previous = self.aliases(name).get(target_alias, 0) if target_alias else 0
        leaving: dict[int, str] = {}  # version -> the stage it goes to
        with mlflow_errors(f"transition {name!r} v{version} to {stage}"):
            if target_alias:
                self._client.set_registered_model_alias(name, target_alias, str(version))
            for alias in STAGE_ALIASES.values():
                if alias and alias != target_alias and alias in current.aliases:
                    self._client.delete_registered_model_alias(name, alias)
            if target_alias:
                others = self._client.search_model_versions(f"name = {quote(name)}")
                for v in others:
                    held = int(v.version)
                    if held != version and (v.current_stage == stage or held == previous):
                        leaving[held] = "Archived" if archive_existing else "None"
            for held, to in sorted(leaving.items()):
                self._client.transition_model_version_stage(name, str(held), to)
            self._client.transition_model_version_stage(name, str(version), stage)
            updated = self._client.get_model_version(name, str(version))
        archived = sorted(v for v, to in leaving.items() if to == "Archived")
        return Transition(updated, current.current_stage, stage, previous, archived)
