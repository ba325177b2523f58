"""What a training job is called: its default registered model and its MLflow run's name."""

from __future__ import annotations

import pytest

from services.training.ml.catalog import DATASETS
from services.training.ml.tracking import run_name, sweep_run_name
from services.training.params import Submission, default_model_name


@pytest.mark.parametrize(
    ("dataset", "model"),
    [
        ("mnist", "mnist-classifier"),
        ("fashion_mnist", "fashion-mnist-classifier"),
        ("kuzushiji_mnist_49", "kuzushiji-mnist-49-classifier"),  # any future dataset
    ],
)
def test_the_default_model_name_follows_the_dataset(dataset: str, model: str) -> None:
    assert default_model_name(dataset) == model


def test_every_dataset_has_a_model_of_its_own() -> None:
    names = {default_model_name(d) for d in DATASETS}
    assert len(names) == len(DATASETS)


def test_a_job_registers_under_its_datasets_model_unless_named() -> None:
    assert Submission().validate().model_name == "mnist-classifier"
    fashion = Submission({"dataset": "Fashion_MNIST"}).validate()
    assert fashion.model_name == "fashion-mnist-classifier"
    named = Submission({"dataset": "fashion_mnist", "model_name": "my-model"}).validate()
    assert named.model_name == "my-model"
    assert Submission().validate().seed == 42  # a job's default seed stays fixed: repeatable


def test_runs_are_named_by_what_they_train() -> None:
    assert run_name("cnn", "mnist", "adam", 0.001, 128, 3) == "cnn-mnist-adam-lr0.001-bs128-e3"
    assert (
        run_name("mlp", "fashion_mnist", "sgd", 0.0125, 64, 1)
        == "mlp-fashion_mnist-sgd-lr0.013-bs64-e1"
    )
    assert (
        run_name("cnn", "mnist", "adam", 0.00131, 224, 2, trial=3)
        == "trial-3-cnn-adam-lr0.0013-bs224-e2"
    )
    assert sweep_run_name("fashion_mnist", "tpe", 10) == "sweep-fashion_mnist-tpe-10-trials"
