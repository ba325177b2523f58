"""MLflow's database and the artifacts in the state directory travel together (state.py).

Against the real PostgreSQL server, with databases of this test's own.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from services.common import db
from services.common.settings import LOCAL_POSTGRES, Settings
from services.launcher.backing import postgres_answers
from services.launcher.process import LaunchError
from services.launcher.state import MESH_ID_FILE, check_state, read_mesh_id, reset_state

pytestmark = pytest.mark.skipif(
    not postgres_answers(f"{LOCAL_POSTGRES}/postgres"), reason="needs PostgreSQL at :5432"
)


@pytest.fixture
def urls() -> Iterator[dict[str, str]]:
    tag = secrets.token_hex(4)
    urls = {
        "database_url": f"{LOCAL_POSTGRES}/mlmesh_t_{tag}",
        "mlflow_backend_store_uri": f"{LOCAL_POSTGRES}/mlflow_t_{tag}",
    }
    for url in urls.values():
        asyncio.run(db.ensure_database(url))
    yield urls
    for url in urls.values():
        asyncio.run(db.drop_database(url))


def settings(state_dir: Path, urls: dict[str, str]) -> Settings:
    return Settings(state_dir=state_dir, **urls)


def test_each_state_directory_has_databases_of_its_own(tmp_path: Path) -> None:
    a, b = Settings(state_dir=tmp_path / "a"), Settings(state_dir=tmp_path / "b")
    assert a.database_url != b.database_url
    assert a.mlflow_backend_store_uri != b.mlflow_backend_store_uri
    again = Settings(state_dir=tmp_path / "a")
    assert (again.database_url, again.mlflow_backend_store_uri) == (
        a.database_url,
        a.mlflow_backend_store_uri,
    )
    assert a.database_url.startswith(f"{LOCAL_POSTGRES}/mlmesh_")
    assert a.mlflow_backend_store_uri.startswith(f"{LOCAL_POSTGRES}/mlflow_")
    chosen = Settings(state_dir=tmp_path / "a", database_url="postgresql://db.example/mine")
    assert chosen.database_url == "postgresql://db.example/mine"


def test_the_database_is_paired_with_one_state_directory(
    tmp_path: Path, urls: dict[str, str]
) -> None:
    first = settings(tmp_path / "first", urls)
    check_state(first)
    mesh_id = read_mesh_id(first.state_dir)
    assert mesh_id
    check_state(first)  # the same pair again: fine
    assert read_mesh_id(first.state_dir) == mesh_id

    # A second state directory (another checkout) on the same databases is refused.
    with pytest.raises(LaunchError) as refused:
        check_state(settings(tmp_path / "second", urls))
    message = str(refused.value)
    assert f"artifacts are in {(tmp_path / 'first' / 'mlartifacts').resolve()}" in message
    assert "mlmesh-server reset --yes" in message
    assert "MLMESH_STATE_DIR" in message

    # So is the first one made afresh (its directory removed, its databases still there).
    (first.state_dir / MESH_ID_FILE).unlink()
    with pytest.raises(LaunchError, match="new: it has no mesh-id"):
        check_state(first)

    # reset drops the databases and the artifacts: the directory starts afresh.
    (first.state_dir / "mlartifacts").mkdir()
    removed = reset_state(first)
    assert any(db.database_name(urls["mlflow_backend_store_uri"]) in r for r in removed)
    assert not (first.state_dir / "mlartifacts").exists()
    for url in urls.values():
        asyncio.run(db.ensure_database(url))
    check_state(first)
    assert read_mesh_id(first.state_dir) not in (None, mesh_id)


def test_a_database_with_runs_but_no_artifacts_here_is_refused(
    tmp_path: Path, urls: dict[str, str]
) -> None:
    async def an_mlflow_database_with_a_run() -> None:
        conn = await asyncpg.connect(urls["mlflow_backend_store_uri"])
        try:
            await conn.execute("CREATE TABLE runs (run_uuid TEXT PRIMARY KEY)")
            await conn.execute("INSERT INTO runs VALUES ('r1')")
        finally:
            await conn.close()

    asyncio.run(an_mlflow_database_with_a_run())
    with pytest.raises(LaunchError, match="already holds 1 runs, but their artifacts are not in"):
        check_state(settings(tmp_path / "empty", urls))
    # With its artifacts in place (an existing mesh's database configured by URL), it pairs.
    (tmp_path / "full" / "mlartifacts" / "1").mkdir(parents=True)
    check_state(settings(tmp_path / "full", urls))
