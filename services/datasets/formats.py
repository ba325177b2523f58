"""Reading an uploaded dataset file: an image folder archive, a table, or an .npz, checked.

Everything here raises ``InvalidArgument`` naming what is wrong (the file, the class, the
column, the archive entry) and nothing is kept of a file that fails. What comes out is the
canonical form every version is stored in (``DatasetArrays``): images as uint8
``(N, height, width, channels)``, tables as float32 ``(N, features)``, labels as class indices.
Blocking and CPU-bound: callers run it off the event loop.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument
from services.datasets.arrays import IMAGES, TABLE, DatasetArrays, stratified_split

IMAGE_FOLDER, CSV, PARQUET, NPZ = "image_folder", "csv", "parquet", "npz"
FORMATS = (IMAGE_FOLDER, CSV, PARQUET, NPZ)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Folders of an image archive that give its split, and the split each names (0 train,
# 1 validation, 2 test).
SPLIT_FOLDERS = {"train": 0, "validation": 1, "val": 1, "valid": 1, "test": 2}
# What an archive may hold beside the images, silently skipped.
_IGNORED = ("__MACOSX/", ".DS_Store", "Thumbs.db")
_DECODE_BATCH = 2000


@dataclass(frozen=True)
class UploadOptions:
    """How to read an upload, as the caller asked."""

    format: str = ""  # one of FORMATS; "" = from the file's content
    label_column: str = ""
    resize: tuple[int, int] | None = None  # (height, width)
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_classes: int = 1000


def detect_format(path: Path) -> str:
    """The format of a file from its first bytes: zip (an .npz is a zip of .npy files),
    tar (plain or gzipped), Parquet; anything else is read as CSV."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
        return NPZ if names and all(n.endswith(".npy") for n in names) else IMAGE_FOLDER
    if head.startswith(b"\x1f\x8b") or (len(head) > 262 and head[257:262] == b"ustar"):
        return IMAGE_FOLDER
    if head.startswith(b"PAR1"):
        return PARQUET
    return CSV


def read_upload(path: Path, options: UploadOptions, decode: Executor | None) -> DatasetArrays:
    """The dataset in the file at ``path``; ``decode`` runs image decoding (processes)."""
    fmt = options.format or detect_format(path)
    if fmt == IMAGE_FOLDER:
        return read_image_archive(path, options, decode)
    if fmt in (CSV, PARQUET):
        return read_table(path, fmt, options)
    if fmt == NPZ:
        return read_npz(path, options)
    raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


# -- image folders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str  # the path in the archive
    split: int  # -1: none given
    label: str  # the class folder


def _members(path: Path) -> tuple[list[str], Callable[[str], bytes], Callable[[], None]]:
    """The archive's file names, a reader of one member's bytes, and a closer. Entries that
    could write outside the archive's root (absolute paths, '..', links) are refused."""
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names = []
        for info in archive.infolist():
            _check_path(info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symbolic link
                raise InvalidArgument(f"archive entry {info.filename!r} is a link; send files")
            names.append(info.filename)
        return names, archive.read, archive.close
    try:
        tar = tarfile.open(path)
    except tarfile.TarError as exc:
        raise InvalidArgument(f"the file is neither a zip nor a tar archive ({exc})") from None
    members = {}
    names = []
    for member in tar.getmembers():
        _check_path(member.name)
        if member.issym() or member.islnk() or member.isdev():
            raise InvalidArgument(
                f"archive entry {member.name!r} is a link or a device; send files"
            )
        names.append(member.name + ("/" if member.isdir() else ""))
        if member.isfile():
            members[member.name] = member

    def read(name: str) -> bytes:
        extracted = tar.extractfile(members[name])
        assert extracted is not None
        return extracted.read()

    return names, read, tar.close


def _check_path(name: str) -> None:
    normal = posixpath.normpath(name.replace("\\", "/"))
    if (
        name.startswith(("/", "\\"))
        or normal == ".."
        or normal.startswith("../")
        or (len(name) > 1 and name[1] == ":")
    ):
        raise InvalidArgument(f"archive entry {name!r} points outside the archive's root; refused")


def _layout(names: list[str]) -> tuple[list[_Entry], set[tuple[int, str]]]:
    """The image entries with their split and class, and every (split, class) folder seen
    (to find empty ones)."""
    files = [n for n in names if not n.endswith("/") and not _ignored(n)]
    if not files:
        raise InvalidArgument("the archive holds no files; send one folder of images per class")
    parts = [posixpath.normpath(n).split("/") for n in files]
    # Folders around everything (my-dataset/cat/1.png): look inside them.
    skip = 0
    while (
        all(len(p) > skip + 2 for p in parts)
        and len({p[skip] for p in parts}) == 1
        and parts[0][skip].lower() not in SPLIT_FOLDERS
    ):
        skip += 1
    split_given = all(len(p) > skip + 2 and p[skip].lower() in SPLIT_FOLDERS for p in parts)
    entries = []
    for name, p in zip(files, parts, strict=True):
        rest = p[skip + 1 :] if split_given else p[skip:]
        if len(rest) < 2:
            raise InvalidArgument(
                f"{name!r} is not in a class folder; put each image in a folder named after "
                "its class (e.g. cat/1.png)"
            )
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise InvalidArgument(f"{name!r} is not a PNG or JPEG image (.png, .jpg, .jpeg)")
        split = SPLIT_FOLDERS[p[skip].lower()] if split_given else -1
        entries.append(_Entry(name, split, rest[0]))
    folders = {(e.split, e.label) for e in entries}
    for name in names:  # folders that hold nothing
        if not name.endswith("/") or _ignored(name):
            continue
        rel = posixpath.normpath(name).split("/")[skip:]
        if split_given and len(rel) == 2 and rel[0].lower() in SPLIT_FOLDERS:
            folders.add((SPLIT_FOLDERS[rel[0].lower()], rel[1]))
        elif not split_given and len(rel) == 1 and rel[0].lower() not in SPLIT_FOLDERS:
            folders.add((-1, rel[0]))
    return entries, folders


def _ignored(name: str) -> bool:
    base = posixpath.basename(name.rstrip("/"))
    return (
        name.startswith(_IGNORED)
        or "/__MACOSX/" in name
        or base.startswith(".")
        or (base in _IGNORED)
    )


def decode_images(
    batch: list[tuple[str, bytes]], resize: tuple[int, int] | None
) -> list[tuple[str, np.ndarray | str]]:
    """Decode each (name, bytes) to uint8 (H, W, C) with C 1 or 3, resized to (H, W) when
    asked; a failure is the error's text instead of the array. Runs in a decode process."""
    from PIL import Image, UnidentifiedImageError

    out: list[tuple[str, np.ndarray | str]] = []
    for name, data in batch:
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in ("L", "RGB"):
                    grey = image.mode in ("1", "L", "LA", "I", "I;16", "F") or (
                        image.mode == "P" and not _colour_palette(image)
                    )
                    image = image.convert("L" if grey else "RGB")
                if resize is not None and image.size != (resize[1], resize[0]):
                    image = image.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
            out.append((name, array[:, :, np.newaxis] if array.ndim == 2 else array))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            out.append((name, f"{type(exc).__name__}: {exc}"))
    return out


def _colour_palette(image: object) -> bool:
    palette = image.getpalette() or []  # type: ignore[attr-defined]
    rgb = np.asarray(palette[: 3 * 256], dtype=np.int32).reshape(-1, 3)
    return bool((rgb.max(axis=1) != rgb.min(axis=1)).any())


def _batches(
    entries: list[_Entry], read: Callable[[str], bytes]
) -> Iterator[list[tuple[str, bytes]]]:
    for start in range(0, len(entries), _DECODE_BATCH):
        yield [(e.name, read(e.name)) for e in entries[start : start + _DECODE_BATCH]]


def read_image_archive(
    path: Path, options: UploadOptions, decode: Executor | None
) -> DatasetArrays:
    names, read, close = _members(path)
    try:
        entries, folders = _layout(names)
        labels = sorted({e.label for e in entries} | {label for _, label in folders})
        if len(labels) > options.max_classes:
            raise InvalidArgument(
                f"the archive has {len(labels)} classes; at most {options.max_classes} are "
                "allowed (MLMESH_DATASET_MAX_CLASSES)"
            )
        counts = Counter((e.split, e.label) for e in entries)
        for folder in sorted(folders):
            if not counts[folder]:
                where = f"{folder[1]!r}" + (
                    f" in the {_split_name(folder[0])} split" if folder[0] >= 0 else ""
                )
                raise InvalidArgument(f"class {where} has no images")
        if len(labels) < 2:
            raise InvalidArgument(
                f"the archive has one class ({labels[0]!r}); a classifier needs two"
            )
        decoded: dict[str, np.ndarray] = {}
        jobs = [
            decode.submit(decode_images, batch, options.resize) if decode is not None else None
            for batch in ([] if decode is None else _batches(entries, read))
        ]
        results = (
            (job.result() for job in jobs)  # type: ignore[union-attr]
            if decode is not None
            else (decode_images(b, options.resize) for b in _batches(entries, read))
        )
        for batch in results:
            for name, image in batch:
                if isinstance(image, str):
                    raise InvalidArgument(f"{name!r} is not a readable image: {image}")
                decoded[name] = image
    finally:
        close()
    shapes = Counter(image.shape[:2] for image in decoded.values())
    if len(shapes) > 1:
        (common, _), (other, _) = shapes.most_common(2)
        odd = next(n for n, im in decoded.items() if im.shape[:2] == other)
        raise InvalidArgument(
            f"images have different sizes ({common[0]}x{common[1]} and {other[0]}x{other[1]}, "
            f"e.g. {odd!r}); ask for a resize (resize_height, resize_width) to make them one"
        )
    channels = 3 if any(im.shape[2] == 3 for im in decoded.values()) else 1
    x = np.stack(
        [np.repeat(decoded[e.name], channels // decoded[e.name].shape[2], axis=2) for e in entries]
    )
    y = np.array([labels.index(e.label) for e in entries], dtype=np.int64)
    split = np.array([e.split for e in entries], dtype=np.int8)
    return _finish(IMAGES, IMAGE_FOLDER, x, y, labels, [], split, options)


def _split_name(split: int) -> str:
    return ("train", "validation", "test")[split]


# -- tables -------------------------------------------------------------------------------------


def read_table(path: Path, fmt: str, options: UploadOptions) -> DatasetArrays:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if fmt == CSV else pd.read_parquet(path)
    except Exception as exc:  # a parser error of any kind: the file is not that format
        raise InvalidArgument(f"the file is not a readable {fmt.upper()} table ({exc})") from None
    label = options.label_column.strip()
    if not label:
        raise InvalidArgument(
            "label_column is required for a table; its columns are "
            + ", ".join(map(str, frame.columns))
        )
    if label not in frame.columns:
        raise InvalidArgument(
            f"label_column {label!r} is not a column of the table; its columns are "
            + ", ".join(map(str, frame.columns))
        )
    split = None
    if "split" in frame.columns and label != "split":
        split = _table_split(frame.pop("split"))
    labels_raw = frame.pop(label)
    if labels_raw.isna().any():
        raise InvalidArgument(f"label column {label!r} has missing values")
    columns = []
    for name in frame.columns:
        kind = frame[name].dtype
        if kind.kind not in "biuf":
            raise InvalidArgument(
                f"column {name!r} holds {kind} values; feature columns must be numbers or "
                "booleans (encode categories as numbers first)"
            )
        if frame[name].isna().any():
            raise InvalidArgument(f"column {name!r} has missing values; fill or drop them first")
        columns.append((str(name), str(kind)))
    if not columns:
        raise InvalidArgument("the table has no feature columns beside the label")
    x = frame.to_numpy(dtype=np.float32)
    classes, y = np.unique(labels_raw.astype(str).to_numpy(), return_inverse=True)
    return _finish(
        TABLE, fmt, x, y.astype(np.int64), [str(c) for c in classes], columns, split, options
    )


def _table_split(column: object) -> np.ndarray:
    values = [str(v).strip().lower() for v in column]  # type: ignore[attr-defined]
    unknown = sorted(set(values) - set(SPLIT_FOLDERS))
    if unknown:
        raise InvalidArgument(
            f"the split column holds {unknown[0]!r}; use train, validation or test"
        )
    return np.array([SPLIT_FOLDERS[v] for v in values], dtype=np.int8)


# -- npz ----------------------------------------------------------------------------------------


def read_npz(path: Path, options: UploadOptions) -> DatasetArrays:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(f"the file is not a readable .npz ({exc})") from None
    if "x" in arrays or "y" in arrays:
        (x, y), split = _pair(arrays, "x", "y"), None
    else:
        parts = [
            (i, _pair(arrays, f"x_{name}", f"y_{name}"))
            for name, i in (("train", 0), ("validation", 1), ("val", 1), ("test", 2))
            if f"x_{name}" in arrays
        ]
        if not parts or parts[0][0] != 0:
            raise InvalidArgument(
                "an .npz needs arrays x and y (or x_train, y_train and optionally x_validation, "
                "y_validation, x_test, y_test); it holds " + ", ".join(sorted(arrays))
            )
        x = np.concatenate([p[0] for _, p in parts])
        y = np.concatenate([p[1] for _, p in parts])
        split = np.concatenate([np.full(len(p[1]), i, np.int8) for i, p in parts])
    if "split" in arrays and split is None:
        split = _table_split(arrays["split"])
    names = arrays.get("class_names")
    if y.dtype.kind in "iu" and names is not None:
        classes = [str(c) for c in names]
        if y.min() < 0 or y.max() >= len(classes):
            raise InvalidArgument(f"y holds class {int(y.max())}; class_names names {len(classes)}")
        labels = y.astype(np.int64)
    elif y.dtype.kind in "iu":
        values, labels = np.unique(y, return_inverse=True)
        classes = [str(v) for v in values]
    elif y.dtype.kind in "USO":
        values, labels = np.unique(y.astype(str), return_inverse=True)
        classes = [str(v) for v in values]
    else:
        raise InvalidArgument(f"y must hold integer or string labels, not {y.dtype}")
    if x.dtype.kind not in "biuf":
        raise InvalidArgument(f"x must hold numbers, not {x.dtype}")
    if x.ndim == 2:
        columns = [(f"feature-{i}", str(x.dtype)) for i in range(x.shape[1])]
        if not np.isfinite(x).all():
            raise InvalidArgument("x holds NaN or infinite values")
        return _finish(
            TABLE,
            NPZ,
            x.astype(np.float32),
            labels.astype(np.int64),
            classes,
            columns,
            split,
            options,
        )
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise InvalidArgument(
            f"x has shape {list(x.shape)}: give (N, features) for a table, or (N, height, "
            "width[, channels]) images with 1 or 3 channels"
        )
    if x.dtype.kind == "f":
        if not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise InvalidArgument("float images must hold values in [0, 1]")
        x = np.rint(x * 255.0).astype(np.uint8)
    elif x.dtype != np.uint8:
        if x.min() < 0 or x.max() > 255:
            raise InvalidArgument("integer images must hold values 0-255")
        x = x.astype(np.uint8)
    if options.resize is not None:
        raise InvalidArgument("resize is for image folders; resize the arrays before saving")
    return _finish(IMAGES, NPZ, x, labels.astype(np.int64), classes, [], split, options)


def _pair(arrays: dict[str, np.ndarray], xk: str, yk: str) -> tuple[np.ndarray, np.ndarray]:
    if xk not in arrays or yk not in arrays:
        raise InvalidArgument(f"an .npz with {xk} needs {yk} too (and the other way round)")
    x, y = arrays[xk], arrays[yk].reshape(-1)
    if len(x) != len(y):
        raise InvalidArgument(f"{xk} has {len(x)} rows and {yk} {len(y)}; they must match")
    return x, y


# -- common ------------------------------------------------------------------------------------


def _finish(
    kind: str,
    fmt: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    columns: list[tuple[str, str]],
    split: np.ndarray | None,
    options: UploadOptions,
) -> DatasetArrays:
    if len(classes) > options.max_classes:
        raise InvalidArgument(
            f"the dataset has {len(classes)} classes; at most {options.max_classes} are allowed "
            "(MLMESH_DATASET_MAX_CLASSES)"
        )
    if len(classes) < 2:
        raise InvalidArgument("the dataset has one class; a classifier needs two")
    counts = np.bincount(y, minlength=len(classes))
    if (counts == 0).any():
        raise InvalidArgument(f"class {classes[int(np.argmin(counts))]!r} has no samples")
    given = bool(split is not None and (split >= 0).all())
    if given:
        assert split is not None
        if not (split == 0).any():
            raise InvalidArgument("the upload's own split has no training samples")
        assignment = split
    else:
        assignment = stratified_split(
            y, options.validation_fraction, options.test_fraction, options.split_seed
        )
    return DatasetArrays(
        kind=kind,
        format=fmt,
        x=x,
        y=y,
        class_names=classes,
        columns=columns,
        split=assignment,
        split_from_upload=given,
    )


def check_fractions(validation: float, test: float) -> tuple[float, float]:
    """Split fractions as asked (0 means the default 0.1), checked."""
    validation = validation or 0.1
    test = test or 0.1
    for name, value in (("validation_fraction", validation), ("test_fraction", test)):
        if not (math.isfinite(value) and 0.0 < value < 0.5):
            raise InvalidArgument(f"{name} must be above 0 and below 0.5, got {value!r}")
    return validation, test


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
