"""Write sample datasets in the forms a team's own data comes in, from what packages ship
offline, for the README's "Train on your own data" and the tests.

    python scripts/sample_data.py digits digits.zip         # 1,797 8x8 grey PNGs by class
    python scripts/sample_data.py fashion fashion.zip --size 32 --count 4000   # RGB PNGs
    python scripts/sample_data.py breast-cancer cancer.csv  # 30 feature columns and "diagnosis"
    python scripts/sample_data.py wine wine.csv             # 13 feature columns and "cultivar"
    python scripts/sample_data.py wine wine.npz             # the same as x and y arrays
    python scripts/sample_data.py digit-picture seven.png --index 7 --size 64
    python scripts/sample_data.py infer-request cancer.csv request.json --label diagnosis --rows 3

digits, wine and breast cancer are scikit-learn's bundled datasets; fashion is Fashion-MNIST
from the offline copy that mlmesh's built-in dataset reads. ``digit-picture`` writes one digit
upscaled, as a photo of one would be larger than the model's input. ``infer-request`` writes
rows of a CSV (the first, the last and some between), without the label, as an Open Inference
Protocol request body with one input per column (what a model trained on a table takes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(path: Path, root: str, images: list[tuple[str, str, Image.Image]]) -> Path:
    """A zip of ``root/<class>/<name>.png`` for (class, name, picture) triples."""
    with zipfile.ZipFile(path, "w") as archive:
        for label, name, picture in images:
            out = io.BytesIO()
            picture.save(out, format="PNG")
            archive.writestr(f"{root}/{label}/{name}.png", out.getvalue())
    return path


def digit_pictures() -> list[tuple[int, Image.Image]]:
    """scikit-learn's digits as 8x8 grey pictures (its 16 grey levels as 0-255), labelled."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    return [
        (int(label), Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8), mode="L"))
        for image, label in zip(loaded.images, loaded.target, strict=True)
    ]


def digits(path: Path) -> Path:
    images = [(str(label), str(i), p) for i, (label, p) in enumerate(digit_pictures())]
    return write_folder(path, "digits", images)


def fashion(path: Path, size: int = 32, count: int = 4000, seed: int = 0) -> Path:
    """``count`` Fashion-MNIST images, chosen at random, as RGB pictures of size x size in
    folders named for their classes."""
    from services.datasets.builtin import load_builtin

    arrays = load_builtin("fashion_mnist", None)[0]
    chosen = np.random.default_rng(seed).permutation(len(arrays.y))[:count]
    images = []
    for i in chosen:
        grey = Image.fromarray(arrays.x[i].reshape(28, 28), mode="L")
        picture = grey.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        label = arrays.class_names[int(arrays.y[i])].replace("/", "-")  # "T-shirt/top"
        images.append((label, str(i), picture))
    return write_folder(path, "fashion", images)


def _table(name: str) -> tuple[list[str], np.ndarray, np.ndarray, str]:
    """(feature columns, features, labels, label column) of a scikit-learn table; the column
    names as identifiers (wine's "od280/od315_of_diluted_wines" has a slash)."""
    from sklearn.datasets import load_breast_cancer, load_wine

    loaded, label = (
        (load_wine(), "cultivar") if name == "wine" else (load_breast_cancer(), "diagnosis")
    )
    columns = [c.replace("/", "_").replace(" ", "_") for c in loaded.feature_names]
    return columns, loaded.data, loaded.target, label


def table(name: str, path: Path) -> Path:
    """A CSV with a header and the label last, or an .npz of ``x`` and ``y``."""
    columns, x, y, label = _table(name)
    if path.suffix == ".npz":
        np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
        return path
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*columns, label])
        for features, target in zip(x, y, strict=True):
            out.writerow([*(f"{v:g}" for v in features), int(target)])
    return path


def digit_picture(path: Path, index: int, size: int) -> Path:
    """Digit ``index`` as a grey PNG of size x size."""
    label, picture = digit_pictures()[index]
    picture.resize((size, size), Image.Resampling.NEAREST).save(path)
    print(f"{path}: a {label}")
    return path


def infer_request(table_path: Path, path: Path, label: str, rows: int) -> Path:
    """``rows`` rows of a CSV spread evenly from its first to its last (so that sorted data
    gives several classes), without ``label``, as an Open Inference Protocol body."""
    with table_path.open(newline="") as f:
        every = list(csv.DictReader(f))
    if not every or label not in every[0]:
        raise SystemExit(f"{table_path}: no rows, or no column {label!r}")
    records = [every[int(i)] for i in np.linspace(0, len(every) - 1, min(rows, len(every)))]
    inputs = [
        {
            "name": column,
            "datatype": "FP64",
            "shape": [len(records), 1],
            "data": [float(r[column]) for r in records],
        }
        for column in records[0]
        if column != label
    ]
    path.write_text(json.dumps({"inputs": inputs}) + "\n")
    print(f"{path}: {len(records)} rows; their labels: {[int(r[label]) for r in records]}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("digits", help="scikit-learn's digits as a zip of 8x8 PNG folders")
    p.add_argument("out", type=Path)
    p = kinds.add_parser("fashion", help="Fashion-MNIST as a zip of RGB PNG folders")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--count", type=int, default=4000)
    for name in ("wine", "breast-cancer"):
        p = kinds.add_parser(name, help=f"scikit-learn's {name} table as .csv or .npz")
        p.add_argument("out", type=Path)
    p = kinds.add_parser("digit-picture", help="one digit as a larger PNG")
    p.add_argument("out", type=Path)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p = kinds.add_parser("infer-request", help="a CSV's first rows as an OIP request body")
    p.add_argument("table", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--label", required=True)
    p.add_argument("--rows", type=int, default=3)
    args = parser.parse_args()
    if args.kind == "digits":
        digits(args.out)
    elif args.kind == "fashion":
        fashion(args.out, args.size, args.count)
    elif args.kind in ("wine", "breast-cancer"):
        table(args.kind, args.out)
    elif args.kind == "digit-picture":
        digit_picture(args.out, args.index, args.size)
    else:
        infer_request(args.table, args.out, args.label, args.rows)


if __name__ == "__main__":
    main()
