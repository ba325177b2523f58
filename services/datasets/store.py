"""Where dataset versions live: their record in mlmesh's PostgreSQL, their data in MLflow.

Each uploaded version is one MLflow run in the experiment ``mlmesh-datasets`` (named
``<name>@v<version>``), holding the canonical ``dataset.npz`` and ``summary.json`` as artifacts
and the version as an MLflow dataset input (its digest), so a worker on any machine can fetch
it and the MLflow UI shows it. Training runs log the same dataset as their input. The record
in PostgreSQL (table ``datasets``) is what the API lists; a version is numbered there, under
a lock per dataset name, so concurrent uploads number their versions apart.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
from mlflow import MlflowClient
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag

from services.common.pagination import Page, decode_token, encode_token
from services.datasets.arrays import DatasetArrays

log = logging.getLogger(__name__)

EXPERIMENT = "mlmesh-datasets"
NPZ_ARTIFACT = "dataset.npz"
SUMMARY_ARTIFACT = "summary.json"


@dataclass(frozen=True)
class DatasetRecord:
    """One stored dataset version, as recorded."""

    name: str
    version: int
    digest: str
    kind: str
    format: str
    samples: int
    class_names: list[str]
    class_counts: list[int]
    input_shape: list[int]
    columns: list[tuple[str, str]]
    label_column: str
    split_sizes: tuple[int, int, int]
    split_from_upload: bool
    mlflow_run_id: str
    size_bytes: int
    filename: str
    created_by: str
    create_time: datetime | None
    builtin: bool = False

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


def _record(row: asyncpg.Record) -> DatasetRecord:
    return DatasetRecord(
        name=row["name"],
        version=row["version"],
        digest=row["digest"],
        kind=row["kind"],
        format=row["format"],
        samples=row["samples"],
        class_names=json.loads(row["class_names"]),
        class_counts=json.loads(row["class_counts"]),
        input_shape=list(row["input_shape"]),
        columns=[tuple(c) for c in json.loads(row["columns"])],
        label_column=row["label_column"],
        split_sizes=(row["split_train"], row["split_validation"], row["split_test"]),
        split_from_upload=row["split_from_upload"],
        mlflow_run_id=row["mlflow_run_id"],
        size_bytes=row["size_bytes"],
        filename=row["filename"],
        created_by=row["created_by"],
        create_time=row["create_time"],
    )


class DatasetStore:
    """The ``datasets`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def by_digest(self, name: str, digest: str) -> DatasetRecord | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM datasets WHERE name = $1 AND digest = $2", name, digest
        )
        return _record(row) if row else None

    async def get(self, name: str, version: int) -> DatasetRecord | None:
        """Version ``version`` of ``name``; the latest when ``version`` is 0."""
        row = await self._pool.fetchrow(
            """
            SELECT * FROM datasets WHERE name = $1 AND ($2 = 0 OR version = $2)
            ORDER BY version DESC LIMIT 1
            """,
            name,
            version,
        )
        return _record(row) if row else None

    async def create(self, record: DatasetRecord) -> tuple[DatasetRecord, bool]:
        """Number and insert a version; the existing one when its digest was stored meanwhile
        (created False)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('dataset:' || $1))", record.name
            )
            existing = await conn.fetchrow(
                "SELECT * FROM datasets WHERE name = $1 AND digest = $2", record.name, record.digest
            )
            if existing is not None:
                return _record(existing), False
            row = await conn.fetchrow(
                """
                INSERT INTO datasets (name, version, digest, kind, format, samples, class_names,
                    class_counts, input_shape, columns, label_column, split_train,
                    split_validation, split_test, split_from_upload, mlflow_run_id, size_bytes,
                    filename, created_by)
                VALUES ($1, (SELECT coalesce(max(version), 0) + 1 FROM datasets
                             WHERE name = $1), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                        $13, $14, $15, $16, $17, $18)
                RETURNING *
                """,
                record.name,
                record.digest,
                record.kind,
                record.format,
                record.samples,
                json.dumps(record.class_names),
                json.dumps(record.class_counts),
                record.input_shape,
                json.dumps(record.columns),
                record.label_column,
                *record.split_sizes,
                record.split_from_upload,
                record.mlflow_run_id,
                record.size_bytes,
                record.filename,
                record.created_by,
            )
        return _record(row), True

    async def delete(self, name: str, version: int) -> None:
        await self._pool.execute(
            "DELETE FROM datasets WHERE name = $1 AND version = $2", name, version
        )

    async def list_latest(self, page_size: int, page_token: str) -> Page[DatasetRecord]:
        after = decode_token("datasets", page_token)[0] if page_token else ""
        rows = await self._pool.fetch(
            """
            SELECT DISTINCT ON (name) * FROM datasets WHERE name > $1
            ORDER BY name, version DESC LIMIT $2
            """,
            after,
            page_size + 1,
        )
        found = [_record(r) for r in rows[:page_size]]
        more = len(rows) > page_size
        return Page(found, encode_token("datasets", [found[-1].name]) if more else "")

    async def list_versions(
        self, name: str, page_size: int, page_token: str
    ) -> Page[DatasetRecord]:
        before = decode_token("dataset-versions", page_token)[0] if page_token else 2**31 - 1
        rows = await self._pool.fetch(
            """
            SELECT * FROM datasets WHERE name = $1 AND version < $2
            ORDER BY version DESC LIMIT $3
            """,
            name,
            int(before),
            page_size + 1,
        )
        found = [_record(r) for r in rows[:page_size]]
        more = len(rows) > page_size
        return Page(found, encode_token("dataset-versions", [found[-1].version]) if more else "")


class ArtifactStore:
    """A dataset version's files in MLflow (blocking; callers run it off the event loop)."""

    def __init__(self, tracking_uri: str) -> None:
        self._client = MlflowClient(tracking_uri=tracking_uri)

    def _experiment_id(self) -> str:
        found = self._client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(
                EXPERIMENT, tags={"mlflow.experimentKind": "custom_model_development"}
            )
        except Exception:  # created meanwhile by another upload
            found = self._client.get_experiment_by_name(EXPERIMENT)
            if found is None:
                raise
            return found.experiment_id

    def save(
        self, name: str, digest: str, arrays: DatasetArrays, summary: dict[str, object]
    ) -> str:
        """Store a validated version; returns its MLflow run's id. Half-stored is deleted."""
        run = self._client.create_run(
            self._experiment_id(),
            run_name=f"{name}@{digest[:12]}",
            tags={"mlmesh.dataset": name, "mlmesh.dataset_digest": digest},
        )
        run_id = run.info.run_id
        try:
            with tempfile.TemporaryDirectory(prefix="mlmesh-dataset-") as tmp:
                directory = Path(tmp)
                arrays.to_npz(directory / NPZ_ARTIFACT)
                (directory / SUMMARY_ARTIFACT).write_text(json.dumps(summary, indent=2))
                self._client.log_artifacts(run_id, str(directory))
            self._client.log_inputs(
                run_id, datasets=[dataset_input(name, digest, summary, "upload")]
            )
            self._client.set_terminated(run_id)
        except BaseException:
            self.discard(run_id)
            raise
        return run_id

    def name_version(self, run_id: str, name: str, version: int) -> None:
        """Name the run after the version it became (its number is known after the insert)."""
        self._client.set_tag(run_id, "mlflow.runName", f"{name}@v{version}")
        self._client.set_tag(run_id, "mlmesh.dataset_version", str(version))

    def load(self, run_id: str, cache_dir: Path) -> DatasetArrays:
        """The version's arrays; downloaded once per machine (cached by run id)."""
        local = cache_dir / run_id / NPZ_ARTIFACT
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                path = self._client.download_artifacts(run_id, NPZ_ARTIFACT, tmp)
                Path(path).replace(local)
            log.info("downloaded dataset run %s in %.1f s", run_id, time.monotonic() - started)
        return DatasetArrays.from_npz(local)

    def discard(self, run_id: str) -> None:
        try:
            self._client.delete_run(run_id)
        except Exception:  # the upload already failed: say so, do not hide that error
            log.warning("could not delete MLflow run %s of a failed upload", run_id, exc_info=True)


def dataset_input(name: str, digest: str, summary: dict[str, object], context: str) -> DatasetInput:
    """The MLflow dataset entity of a version, as an input of a run (``context`` is upload or
    training)."""
    dataset = MlflowDataset(
        name=name,
        digest=digest[:32],  # MLflow keeps 36 characters
        source_type="mlmesh",
        source=json.dumps({"dataset": name, "digest": digest}),
        profile=json.dumps(summary),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
