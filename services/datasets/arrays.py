"""A dataset version in its canonical form: numpy arrays, classes and the split.

Images are uint8 ``(N, height, width, channels)`` (channels 1 or 3), tables float32
``(N, features)``; labels are class indices into ``class_names``; ``split`` assigns each
sample to train (0), validation (1) or test (2). A version is stored as one uncompressed
``.npz`` of these (``to_npz``/``from_npz``), which any worker reads back; numpy only, so the
Training service, its workers and tests share it without torch.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGES, TABLE = "images", "table"
TRAIN, VALIDATION, TEST = 0, 1, 2


@dataclass(frozen=True)
class DatasetArrays:
    """One dataset version's samples, classes and split."""

    kind: str  # IMAGES or TABLE
    format: str
    x: np.ndarray
    y: np.ndarray  # int64 class indices
    class_names: list[str]
    columns: list[tuple[str, str]] = field(default_factory=list)  # tables: (name, type)
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    split_from_upload: bool = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of an image dataset."""
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (height, width, channels) or (features,)."""
        return tuple(int(d) for d in self.x.shape[1:])

    def part(self, which: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of one split."""
        mask = self.split == which
        return self.x[mask], self.y[mask]

    def class_counts(self) -> list[int]:
        return np.bincount(self.y, minlength=len(self.class_names)).tolist()

    def split_sizes(self) -> tuple[int, int, int]:
        counts = np.bincount(self.split.astype(np.int64), minlength=3)
        return int(counts[0]), int(counts[1]), int(counts[2])

    def to_npz(self, path: Path) -> None:
        """Write the canonical file (uncompressed: fast to write and to read)."""
        meta = {
            "kind": self.kind,
            "format": self.format,
            "class_names": self.class_names,
            "columns": self.columns,
            "split_from_upload": self.split_from_upload,
        }
        with path.open("wb") as f:
            np.savez(
                f,
                x=self.x,
                y=self.y,
                split=self.split,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )

    @classmethod
    def from_npz(cls, path: Path | io.BytesIO) -> DatasetArrays:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes())
            return cls(
                kind=meta["kind"],
                format=meta["format"],
                x=npz["x"],
                y=npz["y"],
                class_names=list(meta["class_names"]),
                columns=[tuple(c) for c in meta["columns"]],
                split=npz["split"],
                split_from_upload=bool(meta["split_from_upload"]),
            )


def stratified_split(y: np.ndarray, validation: float, test: float, seed: int) -> np.ndarray:
    """A seeded split that keeps each class's share in every part: each class gives about
    ``validation`` and ``test`` of its samples (at least one each where it has three or
    more) and keeps at least one for training."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(y), dtype=np.int8)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n = len(members)
        n_val = min(max(round(n * validation), 1 if n >= 3 else 0), max(n - 1, 0))
        n_test = min(max(round(n * test), 1 if n >= 3 else 0), max(n - 1 - n_val, 0))
        split[members[:n_val]] = VALIDATION
        split[members[n_val : n_val + n_test]] = TEST
    return split


def digest_file(path: Path, options: bytes) -> str:
    """SHA-256 of a file's bytes and the options it was read with."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0options\0" + options)
    return h.hexdigest()
