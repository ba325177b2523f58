"""The production and staging aliases as mlmesh recorded them, read from the audit log.

Every change of these aliases made through mlmesh is a TransitionModelVersion, recorded in
the Registry's audit log (PostgreSQL) in the transaction that moves MLflow's alias. Replaying
those records gives where each alias points by mlmesh's account, whatever MLflow says: the
Inference service serves that (unless MLMESH_INFERENCE_FOLLOW_MLFLOW_ALIASES), and the
Registry compares MLflow's aliases with it to find changes made around mlmesh.

A transition to a stage points the stage's alias at the version and takes the version's other
stage aliases away (services/registry/store.py); so an alias points at the version of the
latest transition to its stage, unless a later transition moved that version elsewhere.
"""

from __future__ import annotations

import asyncpg

from services.common.errors import Unavailable

# The aliases mlmesh governs, and the stage each one carries.
STAGE_OF_ALIAS: dict[str, str] = {"production": "Production", "staging": "Staging"}

_RECORDED = """
    WITH latest AS (
        SELECT event_id, version FROM audit_events
        WHERE model_name = $1 AND action = 'transition' AND to_stage = $2
        ORDER BY event_id DESC
        LIMIT 1
    )
    SELECT latest.version FROM latest
    WHERE NOT EXISTS (
        SELECT 1 FROM audit_events later
        WHERE later.model_name = $1 AND later.action = 'transition'
          AND later.event_id > latest.event_id AND later.version = latest.version
    )
"""

DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def recorded_alias(
    db: asyncpg.Pool | asyncpg.Connection, model_name: str, alias: str
) -> int | None:
    """The version ``alias`` (production or staging) of ``model_name`` points at by the audit
    log, or None when no transition put one there; Unavailable when PostgreSQL cannot say."""
    try:
        return await db.fetchval(_RECORDED, model_name, STAGE_OF_ALIAS[alias])
    except DB_ERRORS as exc:
        raise Unavailable(
            f"cannot read the recorded {alias} alias of {model_name!r} from PostgreSQL: {exc}"
        ) from exc


async def audited_models(db: asyncpg.Pool | asyncpg.Connection) -> list[str]:
    """Every model a transition was recorded for."""
    try:
        rows = await db.fetch(
            "SELECT DISTINCT model_name FROM audit_events WHERE action = 'transition'"
        )
    except DB_ERRORS as exc:
        raise Unavailable(f"cannot read the audit log from PostgreSQL: {exc}") from exc
    return [r["model_name"] for r in rows]
