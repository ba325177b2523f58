"""Reading uploaded dataset files (services/datasets/formats.py), with data mlmesh did not
make: scikit-learn's digits as an image folder, its wine data as CSV and Parquet, arrays as an
.npz; and every bad upload named."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_wine

from services.common.errors import InvalidArgument
from services.datasets.arrays import IMAGES, TABLE, TEST, TRAIN, VALIDATION, DatasetArrays
from services.datasets.formats import (
    CSV,
    IMAGE_FOLDER,
    NPZ,
    PARQUET,
    UploadOptions,
    detect_format,
    read_upload,
)


def png(array: np.ndarray, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(out, format="PNG")
    return out.getvalue()


def zipped(path: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in dirs:
            archive.writestr(name, b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def digits_folder(limit: int = 300) -> dict[str, bytes]:
    digits = load_digits()
    images = np.rint(digits.images[:limit] * 255 / 16)
    return {
        f"digits/{label}/{i}.png": png(image)
        for i, (image, label) in enumerate(zip(images, digits.target[:limit], strict=True))
    }


def read(path: Path, **options: object) -> DatasetArrays:
    return read_upload(path, UploadOptions(**options), None)  # type: ignore[arg-type]


def test_an_image_folder_zip_is_read_and_split_stratified(tmp_path: Path) -> None:
    path = zipped(tmp_path / "digits.zip", digits_folder())
    assert detect_format(path) == IMAGE_FOLDER
    data = read(path, split_seed=7)
    assert data.kind == IMAGES and data.x.shape == (300, 8, 8, 1) and data.x.dtype == np.uint8
    assert data.class_names == [str(d) for d in range(10)]
    assert sum(data.class_counts()) == 300 and not data.split_from_upload
    train, validation, test = data.split_sizes()
    assert (train, validation, test) == (240, 30, 30)
    for which in (VALIDATION, TEST):  # every class in every part
        assert set(data.part(which)[1].tolist()) == set(range(10))
    again = read(path, split_seed=7)
    np.testing.assert_array_equal(again.split, data.split)  # seeded


def test_a_tar_with_its_own_split_and_rgb_images_of_one_size(tmp_path: Path) -> None:
    path = tmp_path / "pets.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for split in ("train", "test"):
            for label in ("cat", "dog"):
                for i in range(3):
                    data = png(rng.integers(0, 255, (5, 6, 3)), "RGB")
                    info = tarfile.TarInfo(f"{split}/{label}/{i}.png")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    data = read(path)
    assert data.x.shape == (12, 5, 6, 3) and data.split_from_upload
    assert data.class_names == ["cat", "dog"]
    assert (data.split == TRAIN).sum() == 6 and (data.split == TEST).sum() == 6


def test_mixed_sizes_are_refused_unless_a_resize_is_asked(tmp_path: Path) -> None:
    files = digits_folder(20)
    files["digits/3/big.png"] = png(np.zeros((16, 16)))
    path = zipped(tmp_path / "mixed.zip", files)
    with pytest.raises(
        InvalidArgument,
        match=r"different sizes \(8x8 and 16x16, e\.g\. 'digits/3/big.png'\); ask for a resize",
    ):
        read(path)
    resized = read(path, resize=(12, 10))
    assert resized.x.shape[1:] == (12, 10, 1)


@pytest.mark.parametrize(
    ("files", "dirs", "words"),
    [
        ({"../evil/1.png": b"x", "a/1.png": b"y"}, (), r"'\.\./evil/1\.png' points outside"),
        ({"/etc/1.png": b"x"}, (), "points outside the archive's root"),
        ({"a/1.png": None, "b/2.png": None}, ("c/",), "class 'c' has no images"),
        ({"a/1.png": None, "b/2.png": b"not a png"}, (), r"'b/2\.png' is not a readable image"),
        ({"a/1.png": None, "b/2.txt": b"hello"}, (), r"'b/2\.txt' is not a PNG or JPEG"),
        ({"a/1.png": None, "2.png": None}, (), r"'2\.png' is not in a class folder"),
        ({"a/1.png": None}, (), "one class"),
        ({}, (), "holds no files"),
    ],
)
def test_bad_archives_are_named(
    tmp_path: Path, files: dict[str, bytes | None], dirs: tuple[str, ...], words: str
) -> None:
    good = png(np.zeros((8, 8)))
    path = zipped(
        tmp_path / "bad.zip", {n: d if d is not None else good for n, d in files.items()}, dirs
    )
    with pytest.raises(InvalidArgument, match=words):
        read(path, format=IMAGE_FOLDER)


def test_too_many_classes(tmp_path: Path) -> None:
    path = zipped(tmp_path / "many.zip", digits_folder(100))
    with pytest.raises(InvalidArgument, match="10 classes; at most 5 are allowed"):
        read(path, max_classes=5)


def test_a_symbolic_link_in_a_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("a/evil.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(InvalidArgument, match="is a link or a device"):
        read(path)


def wine_frame() -> pd.DataFrame:
    wine = load_wine(as_frame=True)
    frame = wine.data.rename(columns=lambda c: c.replace("/", "_"))
    frame["cultivar"] = [f"c{t}" for t in wine.target]
    return frame


def test_a_csv_and_a_parquet_table_with_a_label_column(tmp_path: Path) -> None:
    frame = wine_frame()
    frame.to_csv(tmp_path / "wine.csv", index=False)
    frame.to_parquet(tmp_path / "wine.parquet")
    assert detect_format(tmp_path / "wine.csv") == CSV
    assert detect_format(tmp_path / "wine.parquet") == PARQUET
    for name in ("wine.csv", "wine.parquet"):
        data = read(tmp_path / name, label_column="cultivar")
        assert data.kind == TABLE and data.x.shape == (178, 13) and data.x.dtype == np.float32
        assert data.class_names == ["c0", "c1", "c2"]
        assert data.columns[0] == ("alcohol", "float64")


@pytest.mark.parametrize(
    ("change", "label", "words"),
    [
        (lambda f: f, "", "label_column is required for a table; its columns are alcohol"),
        (lambda f: f, "colour", "label_column 'colour' is not a column of the table"),
        (lambda f: f.assign(alcohol="high"), "cultivar", "column 'alcohol' holds str values"),
        (lambda f: f.assign(hue=np.nan), "cultivar", "column 'hue' has missing values"),
    ],
)
def test_bad_tables_are_named(tmp_path: Path, change, label: str, words: str) -> None:
    change(wine_frame()).to_csv(tmp_path / "wine.csv", index=False)
    with pytest.raises(InvalidArgument, match=words):
        read(tmp_path / "wine.csv", label_column=label)


def test_npz_images_and_tables(tmp_path: Path) -> None:
    digits = load_digits()
    np.savez(tmp_path / "images.npz", x=digits.images / 16.0, y=digits.target)
    assert detect_format(tmp_path / "images.npz") == NPZ
    images = read(tmp_path / "images.npz")
    assert images.kind == IMAGES and images.x.shape == (1797, 8, 8, 1)
    assert images.x.max() == 255
    np.savez(
        tmp_path / "split.npz",
        x_train=digits.data[:1500],
        y_train=digits.target[:1500],
        x_test=digits.data[1500:],
        y_test=digits.target[1500:],
    )
    table = read(tmp_path / "split.npz")
    assert table.kind == TABLE and table.split_from_upload and table.split_sizes()[2] == 297
    np.savez(tmp_path / "bad.npz", data=digits.data)
    with pytest.raises(InvalidArgument, match=r"an \.npz needs arrays x and y"):
        read(tmp_path / "bad.npz")
    np.savez(tmp_path / "ragged.npz", x=digits.data, y=digits.target[:10])
    with pytest.raises(InvalidArgument, match="x has 1797 rows and y 10"):
        read(tmp_path / "ragged.npz")


def test_the_canonical_file_round_trips(tmp_path: Path) -> None:
    data = read(zipped(tmp_path / "d.zip", digits_folder(50)))
    data.to_npz(tmp_path / "d.npz")
    back = DatasetArrays.from_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(back.x, data.x)
    np.testing.assert_array_equal(back.split, data.split)
    assert back.class_names == data.class_names and back.kind == IMAGES
