"""The Datasets domain: upload, read, list, sample and delete dataset versions. No gRPC here.

An upload arrives as options and then chunks of a file. The chunks go to a temporary file
(refused past ``max_bytes``); identical bytes and options give back the version they made
before; otherwise the file is read and checked (services/datasets/formats.py, images decoded
in a pool of processes), stored (services/datasets/store.py), and numbered. Whatever fails,
nothing is left behind: the temporary file goes, and a half-stored version's MLflow run is
deleted. The built-in datasets (mnist, fashion_mnist) answer through the same calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg
import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, check_page_size
from services.common.pagination import Page
from services.common.settings import Settings
from services.datasets import builtin
from services.datasets.arrays import IMAGES, TABLE, TEST, DatasetArrays, digest_file
from services.datasets.formats import UploadOptions, check_fractions, read_upload
from services.datasets.store import ArtifactStore, DatasetRecord, DatasetStore

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
# Jobs (or sweeps) that use a version, by reference "name@version": who may not delete it.
InUse = Callable[[str], Awaitable[list[str]]]


def check_name(name: str, field: str = "name") -> str:
    """A dataset's name, checked; names are compared in lower case (``Digits`` is ``digits``)."""
    name = name.strip().lower()
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{field} must be 1-100 letters, digits, '_' or '-' (starting with a letter or "
            f"digit), got {name!r}"
        )
    return name


def parse_reference(reference: str, field: str = "dataset") -> tuple[str, int]:
    """``name`` or ``name@version`` as (name, version); version 0 means the latest."""
    name, sep, version = reference.strip().partition("@")
    check_name(name, field)
    if not sep:
        return name, 0
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"{field} version must be a number from 1, got {reference!r}")
    return name, int(version)


@dataclass(frozen=True)
class Upload:
    """The first message of an upload: the dataset's name and how to read the file."""

    name: str
    options: UploadOptions
    filename: str = ""


@dataclass(frozen=True)
class Sample:
    """One sample of a split and its label."""

    dataset: DatasetRecord
    x: np.ndarray  # an image in [0, 1] (H, W, C) float32, or a table row
    label: int
    class_name: str


class Datasets:
    """What the Datasets service does, over its PostgreSQL table and MLflow."""

    @classmethod
    def from_settings(
        cls, settings: Settings, pool: asyncpg.Pool, in_use: InUse, decode: Executor | None = None
    ) -> Datasets:
        """The domain as the settings configure it; ``decode`` runs image decoding (None: in
        this process, for callers that only read and check against datasets)."""
        return cls(
            DatasetStore(pool),
            ArtifactStore(settings.mlflow_tracking_uri),
            decode,
            max_bytes=settings.dataset_max_bytes,
            max_classes=settings.dataset_max_classes,
            cache_dir=Path(settings.dataset_cache_dir).expanduser(),
            data_dir=settings.data_dir,
            in_use=in_use,
        )

    def __init__(
        self,
        store: DatasetStore,
        artifacts: ArtifactStore,
        decode: Executor | None,
        *,
        max_bytes: int,
        max_classes: int,
        cache_dir: Path,
        data_dir: Path | None,
        in_use: InUse,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._decode = decode
        self._max_bytes = max_bytes
        self._max_classes = max_classes
        self._cache_dir = cache_dir
        self._data_dir = data_dir
        self._in_use = in_use

    def options(
        self,
        fmt: str,
        label_column: str,
        resize: tuple[int, int],
        validation_fraction: float,
        test_fraction: float,
        split_seed: int,
    ) -> UploadOptions:
        """An upload's options, checked."""
        if resize != (0, 0) and (min(resize) < 1 or max(resize) > 4096):
            raise InvalidArgument(
                f"resize_height and resize_width must both be 1-4096 (or both 0), got {resize}"
            )
        validation, test = check_fractions(validation_fraction, test_fraction)
        return UploadOptions(
            format=fmt,
            label_column=label_column,
            resize=resize if resize != (0, 0) else None,
            validation_fraction=validation,
            test_fraction=test,
            split_seed=split_seed,
            max_classes=self._max_classes,
        )

    async def upload(
        self, upload: Upload, chunks: AsyncIterator[bytes], client: str
    ) -> tuple[DatasetRecord, bool]:
        """Store the uploaded file as a new version (or find the one it made before)."""
        name = check_name(upload.name)
        if name in builtin.BUILTIN:
            raise InvalidArgument(f"{name!r} is a built-in dataset; upload under another name")
        with tempfile.TemporaryDirectory(prefix="mlmesh-upload-") as tmp:
            path = Path(tmp) / "upload"
            size = await self._receive(chunks, path)
            if size == 0:
                raise InvalidArgument("the upload is empty: send the file's bytes")
            options_key = json.dumps(asdict(upload.options), sort_keys=True).encode()
            digest = await asyncio.to_thread(digest_file, path, options_key)
            found = await self._store.by_digest(name, digest)
            if found is not None:
                return found, False
            arrays = await asyncio.to_thread(read_upload, path, upload.options, self._decode)
            summary = _summary(name, digest, arrays, upload, size)
            run_id = await asyncio.to_thread(self._artifacts.save, name, digest, arrays, summary)
        record = _record_of(name, digest, arrays, upload, size, run_id, client)
        try:
            saved, created = await self._store.create(record)
        except BaseException:
            await asyncio.to_thread(self._artifacts.discard, run_id)
            raise
        if created:
            await asyncio.to_thread(self._artifacts.name_version, run_id, name, saved.version)
            log.info(
                "client=%s uploaded %s (%d samples, %d classes)",
                client,
                saved.reference,
                saved.samples,
                len(saved.class_names),
            )
        else:  # the same bytes were stored by a concurrent upload
            await asyncio.to_thread(self._artifacts.discard, run_id)
        return saved, created

    async def _receive(self, chunks: AsyncIterator[bytes], path: Path) -> int:
        size = 0
        with path.open("wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > self._max_bytes:
                    raise InvalidArgument(
                        f"the upload is over the size limit of {self._max_bytes} bytes "
                        "(MLMESH_DATASET_MAX_BYTES)"
                    )
                f.write(chunk)
        return size

    async def get(self, name: str, version: int) -> DatasetRecord:
        name = check_name(name)
        if version < 0:
            raise InvalidArgument(f"version must be 0 (the latest) or more, got {version}")
        if name in builtin.BUILTIN:
            if version > 1:
                raise NotFound(f"built-in dataset {name!r} has one version, 1")
            return await asyncio.to_thread(self._builtin_record, name)
        found = await self._store.get(name, version)
        if found is None:
            what = f"version {version} of dataset {name!r}" if version else f"dataset {name!r}"
            raise NotFound(f"{what} does not exist; `mlmesh datasets list` shows what does")
        return found

    async def resolve(self, reference: str) -> DatasetRecord:
        """The version a job's ``dataset`` (``name`` or ``name@version``) stands for."""
        return await self.get(*parse_reference(reference))

    async def list(self, page_size: int, page_token: str) -> Page[DatasetRecord]:
        size = check_page_size(page_size)
        page = await self._store.list_latest(size, page_token)
        if page_token:
            return page
        builtins = [await asyncio.to_thread(self._builtin_record, n) for n in builtin.BUILTIN]
        return Page([*builtins, *page.items], page.next_page_token)

    async def versions(self, name: str, page_size: int, page_token: str) -> Page[DatasetRecord]:
        name = check_name(name)
        if name in builtin.BUILTIN:
            return Page([await self.get(name, 1)], "")
        page = await self._store.list_versions(name, check_page_size(page_size), page_token)
        if not page.items and not page_token:
            raise NotFound(f"dataset {name!r} does not exist")
        return page

    async def delete(self, name: str, version: int) -> DatasetRecord:
        if version < 1:
            raise InvalidArgument(f"version must be a number from 1, got {version}")
        found = await self.get(name, version)
        if found.builtin:
            raise FailedPrecondition(f"{found.name!r} is built in; it cannot be deleted")
        users = await self._in_use(found.reference)
        if users:
            raise FailedPrecondition(
                f"{found.reference} is used by {len(users)} queued or running "
                f"job(s) ({', '.join(users[:5])}); cancel them or wait for them to end"
            )
        await self._store.delete(found.name, found.version)
        await asyncio.to_thread(self._artifacts.discard, found.mlflow_run_id)
        return found

    async def arrays(self, record: DatasetRecord) -> DatasetArrays:
        """A version's samples (downloaded once per machine)."""
        if record.builtin:
            data_dir = str(self._data_dir) if self._data_dir else None
            return (await asyncio.to_thread(builtin.load_builtin, record.name, data_dir))[0]
        return await asyncio.to_thread(self._artifacts.load, record.mlflow_run_id, self._cache_dir)

    async def sample(self, name: str, version: int, index: int, split: int = TEST) -> Sample:
        record = await self.get(name, version)
        arrays = await self.arrays(record)
        x, y = arrays.part(split)
        if not 0 <= index < len(y):
            raise InvalidArgument(
                f"index must be 0 to {len(y) - 1} (the split has {len(y)} samples), got {index}"
            )
        value = x[index].astype(np.float32) / 255.0 if arrays.kind == IMAGES else x[index]
        label = int(y[index])
        return Sample(record, value, label, arrays.class_names[label])

    def _builtin_record(self, name: str) -> DatasetRecord:
        arrays, source, digest = builtin.load_builtin(
            name, str(self._data_dir) if self._data_dir else None
        )
        return DatasetRecord(
            name=name,
            version=1,
            digest=digest,
            kind=IMAGES,
            format="idx",
            samples=len(arrays.y),
            class_names=arrays.class_names,
            class_counts=arrays.class_counts(),
            input_shape=list(arrays.input_shape),
            columns=[],
            label_column="",
            split_sizes=arrays.split_sizes(),
            split_from_upload=True,
            mlflow_run_id="",
            size_bytes=int(arrays.x.nbytes),
            filename=source,
            created_by="mlmesh",
            create_time=None,
            builtin=True,
        )


def _summary(
    name: str, digest: str, arrays: DatasetArrays, upload: Upload, size: int
) -> dict[str, object]:
    train, validation, test = arrays.split_sizes()
    return {
        "name": name,
        "digest": digest,
        "kind": arrays.kind,
        "format": arrays.format,
        "samples": len(arrays.y),
        "classes": dict(zip(arrays.class_names, arrays.class_counts(), strict=True)),
        "input_shape": list(arrays.input_shape),
        "columns": [list(c) for c in arrays.columns],
        "label_column": upload.options.label_column if arrays.kind == TABLE else "",
        "splits": {
            "train": train,
            "validation": validation,
            "test": test,
            "from_upload": arrays.split_from_upload,
        },
        "filename": upload.filename,
        "size_bytes": size,
    }


def _record_of(
    name: str,
    digest: str,
    arrays: DatasetArrays,
    upload: Upload,
    size: int,
    run_id: str,
    client: str,
) -> DatasetRecord:
    return DatasetRecord(
        name=name,
        version=0,
        digest=digest,
        kind=arrays.kind,
        format=arrays.format,
        samples=len(arrays.y),
        class_names=arrays.class_names,
        class_counts=arrays.class_counts(),
        input_shape=list(arrays.input_shape),
        columns=arrays.columns,
        label_column=upload.options.label_column if arrays.kind == TABLE else "",
        split_sizes=arrays.split_sizes(),
        split_from_upload=arrays.split_from_upload,
        mlflow_run_id=run_id,
        size_bytes=size,
        filename=upload.filename,
        create_time=None,
        created_by=client,
    )
