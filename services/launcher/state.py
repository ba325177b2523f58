"""The state directory and its databases: MLflow's metadata and its artifacts travel together.

MLflow keeps a model version's metadata in its PostgreSQL database and its files in the
artifact store, which the launcher keeps in the state directory (``STATE_DIR/mlartifacts``).
A database paired with another state directory's artifacts (a second checkout on the same
server, or a state directory removed and made afresh) lists versions whose files are not
there, which then cannot be served. So:

- with no database URLs configured, the databases are named after the state directory
  (``Settings``: ``mlmesh_<tag>``, ``mlflow_<tag>``), so each state directory has its own;
- the state directory holds an id (``STATE_DIR/mesh-id``) and MLflow's database is stamped
  with the id of the state directory whose artifacts it describes. Before the launcher starts
  MLflow it compares the two and refuses a mismatch, saying what to do;
- ``mlmesh-server reset`` drops the state directory's databases and artifacts,
  for a fresh start.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.common import db
from services.common.settings import Settings
from services.launcher.backing import run_async
from services.launcher.process import LaunchError

log = logging.getLogger(__name__)

MESH_ID_FILE = "mesh-id"
ARTIFACTS_DIR = "mlartifacts"
# A table of mlmesh's in MLflow's database; MLflow's own migrations leave other tables alone.
STAMP_TABLE = "mlmesh_artifact_store"


@dataclass(frozen=True)
class Stamp:
    """Which state directory's artifacts an MLflow database describes."""

    mesh_id: str
    artifact_root: str


def artifact_root(settings: Settings) -> Path:
    """Where the launcher's MLflow server keeps artifacts."""
    return Path(settings.state_dir).resolve() / ARTIFACTS_DIR


def read_mesh_id(state_dir: Path) -> str | None:
    path = Path(state_dir) / MESH_ID_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


async def _read_stamp(conn: asyncpg.Connection) -> Stamp | None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {STAMP_TABLE} ("
        " mesh_id TEXT NOT NULL, artifact_root TEXT NOT NULL,"
        " stamped_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    row = await conn.fetchrow(f"SELECT mesh_id, artifact_root FROM {STAMP_TABLE} LIMIT 1")
    return Stamp(row["mesh_id"], row["artifact_root"]) if row else None


async def _logged_runs(conn: asyncpg.Connection) -> int:
    """Runs MLflow's database holds (0 before MLflow has made its tables)."""
    if await conn.fetchval("SELECT to_regclass('public.runs')") is None:
        return 0
    return int(await conn.fetchval("SELECT count(*) FROM runs"))


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def check_state(settings: Settings) -> None:
    """Pair MLflow's database with this state directory's artifacts, or raise LaunchError.

    Runs once PostgreSQL answers and the databases exist, before MLflow starts.
    """
    state_dir = Path(settings.state_dir).resolve()
    root = artifact_root(settings)
    url = settings.mlflow_backend_store_uri
    name = db.database_name(url)

    async def pair() -> None:
        conn = await asyncpg.connect(url, timeout=10.0)
        try:
            async with conn.transaction():
                # One launcher at a time decides (two starting at once must not both stamp).
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", STAMP_TABLE)
                stamp = await _read_stamp(conn)
                mesh_id = read_mesh_id(state_dir)
                if stamp is not None and stamp.mesh_id == mesh_id:
                    if stamp.artifact_root != str(root):  # the state directory was moved
                        await conn.execute(
                            f"UPDATE {STAMP_TABLE} SET artifact_root = $1", str(root)
                        )
                    return
                if stamp is not None:
                    raise LaunchError(_mismatch(name, stamp, state_dir, mesh_id))
                runs = await _logged_runs(conn)
                if runs and not _has_files(root):
                    raise LaunchError(_unknown_artifacts(name, runs, root))
                if mesh_id is None:
                    mesh_id = _new_mesh_id(state_dir)
                await conn.execute(
                    f"INSERT INTO {STAMP_TABLE} (mesh_id, artifact_root) VALUES ($1, $2)",
                    mesh_id,
                    str(root),
                )
                log.info("paired MLflow's database %s with the artifacts in %s", name, root)
        finally:
            await conn.close()

    run_async(pair)


def reset_state(settings: Settings) -> list[str]:
    """Drop the databases and remove the artifacts and id of the state directory; returns
    what was removed, for the caller to print."""
    state_dir = Path(settings.state_dir).resolve()
    removed = []
    for url in (settings.database_url, settings.mlflow_backend_store_uri):
        run_async(lambda url=url: db.drop_database(url))
        removed.append(f"database {db.database_name(url)}")
    root = artifact_root(settings)
    if root.exists():
        shutil.rmtree(root)
        removed.append(str(root))
    mesh_id = state_dir / MESH_ID_FILE
    if mesh_id.exists():
        mesh_id.unlink()
        removed.append(str(mesh_id))
    return removed


def _new_mesh_id(state_dir: Path) -> str:
    mesh_id = secrets.token_hex(8)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MESH_ID_FILE).write_text(mesh_id + "\n")
    return mesh_id


_WHAT_TO_DO = (
    "Either set MLMESH_STATE_DIR to the state directory that holds those artifacts, if it "
    "still exists; or start afresh with `mlmesh-server reset --yes` (it drops "
    "this state directory's databases, {databases}, and its artifacts); or point "
    "MLMESH_DATABASE_URL and MLMESH_MLFLOW_BACKEND_STORE_URI at other databases."
)


def _mismatch(name: str, stamp: Stamp, state_dir: Path, mesh_id: str | None) -> str:
    here = f"this state directory {state_dir}" + (
        f" (id {mesh_id})" if mesh_id else " (new: it has no mesh-id)"
    )
    return (
        f"MLflow's database {name!r} belongs to the mesh whose artifacts are in "
        f"{stamp.artifact_root} (id {stamp.mesh_id}), not to {here}: its model versions' "
        "files are not here, so they could not be served. "
        + _WHAT_TO_DO.format(databases=f"{name!r} and mlmesh's")
    )


def _unknown_artifacts(name: str, runs: int, root: Path) -> str:
    return (
        f"MLflow's database {name!r} already holds {runs} runs, but their artifacts are not in "
        f"{root} (it is empty): the database was used with another artifact store. "
        + _WHAT_TO_DO.format(databases=f"{name!r} and mlmesh's")
    )
