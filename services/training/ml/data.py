"""A job's data as tensors: any dataset version, built in or uploaded.

The Datasets domain (services/datasets) owns the data: the built-in MNIST and Fashion-MNIST,
found offline first (``builtin.py``), and uploaded versions, stored in MLflow as one
canonical ``.npz`` each (``store.py``). Training reads it here and turns it into what the
networks take: float32 rows, an image's pixels in [0, 1] row-major with channels last (or a
table's feature values), and int64 labels, per split. Loaded datasets are cached for the
life of the process.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.datasets import builtin
from services.datasets.arrays import IMAGES, TEST, TRAIN, VALIDATION, DatasetArrays
from services.datasets.builtin import DataNotFound, read_idx, read_idx_dir, write_idx

__all__ = [
    "DataNotFound",
    "DataSource",
    "Dataset",
    "Split",
    "load_dataset",
    "read_idx",
    "read_idx_dir",
    "write_idx",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """One split: rows float32 (N, features) (images flattened, in [0, 1]), labels int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> Split:
        """The first ``n`` examples (views, no copy)."""
        return Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device | str) -> Split:
        """This split on ``device`` (itself when it is there already)."""
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class DataSource:
    """Where a job's dataset version lives: built in (``run_id`` empty), or the MLflow run
    holding an uploaded version's file. Resolved by the worker, read by the training process."""

    reference: str  # "mnist", or "name@version"
    digest: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class Dataset:
    """A dataset version's three splits and what it is."""

    name: str  # the dataset's name
    reference: str  # what a job names it by: "mnist", or "name@version"
    source: str  # where it was read from
    digest: str
    kind: str  # images or table
    shape: tuple[int, ...]  # one sample's: (height, width, channels), or (features,)
    class_names: tuple[str, ...]
    columns: tuple[str, ...]  # a table's feature columns
    train: Split
    val: Split
    test: Split

    @property
    def features(self) -> int:
        return int(np.prod(self.shape))


def load_dataset(
    reference: str,
    data_dir: str | Path | None = None,
    *,
    source: DataSource | None = None,
    cache_dir: str | Path | None = None,
    tracking_uri: str = "",
) -> Dataset:
    """The dataset version ``reference`` names: a built-in one by name, or an uploaded one
    from the MLflow run ``source`` names (downloaded once per machine into ``cache_dir``).
    Cached per process."""
    directory = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    return _load_cached(
        reference,
        directory,
        source or DataSource(reference),
        str(Path(cache_dir).expanduser()) if cache_dir else "",
        tracking_uri,
    )


def clear_cache() -> None:
    """Forget every loaded dataset (tests; a process that must free the memory)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(
    reference: str, data_dir: str | None, source: DataSource, cache_dir: str, tracking_uri: str
) -> Dataset:
    name = reference.partition("@")[0]
    if name in builtin.BUILTIN:
        arrays, where, digest = builtin.load_builtin(name, data_dir)
    elif not source.run_id:
        raise ValueError(f"dataset {reference!r} is not built in and no stored version was named")
    else:
        from services.datasets.store import ArtifactStore

        arrays = ArtifactStore(tracking_uri).load(source.run_id, Path(cache_dir))
        where, digest = f"mlflow-run:{source.run_id}", source.digest
    return tensors(name, reference, where, digest, arrays)


def tensors(name: str, reference: str, source: str, digest: str, arrays: DatasetArrays) -> Dataset:
    """A dataset version's arrays as the splits training takes."""
    if arrays.kind == IMAGES:
        # Divide in torch, in place, to hold one float copy only.
        rows = torch.from_numpy(arrays.x.reshape(len(arrays.x), -1)).to(torch.float32).div_(255.0)
    else:
        rows = torch.from_numpy(np.ascontiguousarray(arrays.x, dtype=np.float32))
    labels = torch.from_numpy(arrays.y.astype(np.int64))
    splits = {}
    for part in (TRAIN, VALIDATION, TEST):
        index = torch.from_numpy(np.flatnonzero(arrays.split == part))
        splits[part] = Split(rows[index], labels[index])
    log.info("loaded %s from %s: %d train, %d validation, %d test", reference, source,
             len(splits[TRAIN]), len(splits[VALIDATION]), len(splits[TEST]))  # fmt: skip
    return Dataset(
        name=name,
        reference=reference,
        source=source,
        digest=digest,
        kind=arrays.kind,
        shape=arrays.input_shape,
        class_names=tuple(arrays.class_names),
        columns=tuple(c for c, _ in arrays.columns),
        train=splits[TRAIN],
        val=splits[VALIDATION],
        test=splits[TEST],
    )
