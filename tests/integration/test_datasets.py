"""Datasets as versioned resources, through the gateway: uploads over gRPC (the SDK, in
chunks) and REST (the raw body), what the server found, re-uploads, samples, deletion, and
every bad upload leaving nothing behind. With data mlmesh did not make: scikit-learn's digits
as an image folder and its wine data as a CSV."""

from __future__ import annotations

import io
import secrets
import zipfile
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits, load_wine

from mlmesh_client import Client, MeshError
from services.datasets.store import EXPERIMENT
from services.launcher.mesh import Mesh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def digits_zip(path: Path) -> Path:
    digits = load_digits()
    with zipfile.ZipFile(path, "w") as archive:
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            out = io.BytesIO()
            Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8)).save(out, format="PNG")
            archive.writestr(f"digits/{label}/{i}.png", out.getvalue())
    return path


@pytest.fixture(scope="module")
def sdk(mesh: Mesh, keys: dict[str, str]):
    with Client(f"127.0.0.1:{mesh.settings.gateway_port}", api_key=keys["alice"]) as client:
        yield client


def test_an_image_folder_uploads_over_grpc_and_identical_bytes_give_the_same_version(
    sdk: Client, tmp_path: Path, mesh: Mesh
) -> None:
    name = f"digits-{secrets.token_hex(3)}"
    path = digits_zip(tmp_path / "digits.zip")
    seen: list[tuple[int, int]] = []
    first = sdk.upload_dataset(name, path, on_progress=lambda s, t: seen.append((s, t)))
    assert first.created and seen[-1] == (path.stat().st_size, path.stat().st_size)
    d = first.dataset
    assert (d.name, d.version, d.samples) == (name, 1, 1797)
    assert (d.height, d.width, d.channels) == (8, 8, 1)
    assert [c.name for c in d.classes] == [str(i) for i in range(10)]
    assert sum(c.count for c in d.classes) == 1797
    assert d.splits.train + d.splits.validation + d.splits.test == 1797 and d.splits.test > 0
    again = sdk.upload_dataset(name, path)
    assert not again.created and again.dataset.version == 1
    other_split = sdk.upload_dataset(name, path, split_seed=3)
    assert other_split.created and other_split.dataset.version == 2
    # Stored in MLflow: the canonical file and the dataset as the run's input.
    client = MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    run = client.get_run(d.mlflow_run_id)
    assert run.info.run_name == f"{name}@v1"
    assert {f.path for f in client.list_artifacts(d.mlflow_run_id)} >= {"dataset.npz"}
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == name and d.digest.startswith(logged.dataset.digest)
    # Samples come back as pixels in [0, 1] with their class.
    sample = sdk.dataset_sample(name, 0, version=1)
    assert len(sample.pixels) == 64 and 0.0 <= min(sample.pixels) <= max(sample.pixels) <= 1.0
    assert sample.class_name == str(sample.label)
    versions = sdk.list_dataset_versions(name)
    assert [v.version for v in versions] == [2, 1]
    gone = sdk.delete_dataset_version(name, 2)
    assert gone.version == 2 and [v.version for v in sdk.list_dataset_versions(name)] == [1]
    assert client.get_run(other_split.dataset.mlflow_run_id).info.lifecycle_stage == "deleted"


def test_a_csv_uploads_over_rest_as_the_raw_body(
    rest: httpx.Client, keys: dict[str, str], tmp_path: Path
) -> None:
    wine = load_wine(as_frame=True)
    frame = wine.data.rename(columns=lambda c: c.replace("/", "_"))
    frame["cultivar"] = wine.target
    name = f"wine-{secrets.token_hex(3)}"
    answer = rest.post(
        f"/v1/datasets/{name}:upload",
        params={"label_column": "cultivar", "format": "DATASET_FORMAT_CSV"},
        content=frame.to_csv(index=False).encode(),
        headers={"x-api-key": keys["alice"], "content-type": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    d = answer.json()["dataset"]
    assert d["kind"] == "DATASET_KIND_TABLE" and d["samples"] == "178"
    assert d["label_column"] == "cultivar" and len(d["columns"]) == 13
    listed = rest.get("/v1/datasets", headers={"x-api-key": keys["alice"]}).json()["datasets"]
    names = [x["name"] for x in listed]
    assert names[:2] == ["mnist", "fashion_mnist"] and name in names


def test_the_built_in_datasets_answer_through_the_same_api(sdk: Client) -> None:
    mnist = sdk.get_dataset("mnist")
    assert mnist.builtin and mnist.samples == 70_000 and mnist.splits.test == 10_000
    sample = sdk.dataset_sample("mnist", 0)
    assert sample.class_name == "7" and len(sample.pixels) == 784
    with pytest.raises(MeshError) as refused:
        sdk.delete_dataset_version("mnist", 1)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("files", "options", "words"),
    [
        ({"../escape/1.png": b"x", "a/1.png": b"y"}, {}, "points outside the archive's root"),
        ({"a/1.png": b"not an image", "b/2.png": b"nor this"}, {}, "is not a readable image"),
        ({"table.csv": b"a,b\n1,2\n"}, {"format": "image_folder"}, "not in a class folder"),
    ],
)
def test_a_bad_upload_is_named_and_leaves_nothing_behind(
    sdk: Client, mesh: Mesh, tmp_path: Path, files: dict[str, bytes], options: dict, words: str
) -> None:
    name = f"bad-{secrets.token_hex(3)}"
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    with pytest.raises(MeshError) as refused:
        sdk.upload_dataset(name, path, **options)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(refused.value)
    with pytest.raises(MeshError) as missing:
        sdk.list_dataset_versions(name)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    client = MlflowClient(tracking_uri=mesh.settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        runs = client.search_runs([experiment.experiment_id], f"tags.`mlmesh.dataset` = '{name}'")
        assert runs == []


def test_an_upload_over_the_size_limit_is_refused(sdk: Client, mesh: Mesh, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\0" * (mesh.settings.dataset_max_bytes + 1))
    with pytest.raises(MeshError) as refused:
        sdk.upload_dataset(f"big-{secrets.token_hex(3)}", path)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the size limit" in str(refused.value)


def test_a_rest_upload_larger_than_one_grpc_message_streams_through(
    rest: httpx.Client, keys: dict[str, str], mesh: Mesh
) -> None:
    rng = np.random.default_rng(0)
    rows = 160_000  # about 6 MB of CSV: more than a gRPC message (4 MiB) may carry
    table = "a,b,c,label\n" + "".join(
        f"{a:.6f},{b:.6f},{c:.6f},{int(a > 0.5)}\n" for a, b, c in rng.random((rows, 3))
    )
    body = table.encode()
    assert mesh.settings.grpc_max_message_bytes < len(body) < mesh.settings.dataset_max_bytes
    answer = rest.post(
        f"/v1/datasets/big-csv-{secrets.token_hex(3)}:upload",
        params={"label_column": "label"},
        content=body,
        headers={"x-api-key": keys["alice"], "content-type": "text/csv"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["dataset"]["samples"] == str(rows)
