"""The artifacts a training run leaves beside its model: curves, confusion matrix, reports.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no global backend
switch, no display needed, nothing shared between jobs of one process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import classification_report, confusion_matrix

REFERENCE_BINS = 10

TRAINING_CURVES = "training_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
REPORT_JSON = "classification_report.json"
REPORT_TEXT = "classification_report.txt"
INPUT_REFERENCE = "input_reference.json"
ARTIFACTS = (TRAINING_CURVES, CONFUSION_MATRIX, REPORT_JSON, REPORT_TEXT, INPUT_REFERENCE)


def write_training_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Loss (train, validation) and validation accuracy per epoch, side by side."""
    epochs = list(range(1, len(history) + 1))
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss, accuracy = fig.subplots(1, 2)
    loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    loss.legend()
    accuracy.plot(epochs, [h["val_accuracy"] for h in history], "s-", color="tab:orange")
    accuracy.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss, accuracy):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], path: Path
) -> None:
    """The test split's confusion matrix, counts in every cell."""
    classes = len(class_names)
    matrix = confusion_matrix(labels, predictions, labels=list(range(classes)))
    side = min(4 + 0.35 * classes, 24)
    fig = Figure(figsize=(side + 1, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = list(range(classes))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    ax.set(title="Confusion matrix (test)", xlabel="predicted", ylabel="true")
    threshold = matrix.max() / 2 if matrix.size else 0
    if classes <= 30:  # counts in the cells while they stay legible
        for (row, col), count in np.ndenumerate(matrix):
            color = "white" if count > threshold else "black"
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_classification_report(
    labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], directory: Path
) -> None:
    """scikit-learn's classification report of the test split, as JSON and as text."""
    common = {
        "labels": list(range(len(class_names))),
        "target_names": list(class_names),
        "zero_division": 0,
        "digits": 4,
    }
    as_dict = classification_report(labels, predictions, output_dict=True, **common)
    (directory / REPORT_JSON).write_text(json.dumps(as_dict, indent=2) + "\n")
    (directory / REPORT_TEXT).write_text(classification_report(labels, predictions, **common))


def input_reference(
    rows: torch.Tensor, labels: torch.Tensor, classes: int, kind: str
) -> dict[str, object]:
    """Reference statistics of the training inputs, for drift detection at inference.

    ``inputs`` is the served model's drift reference (services/common/model_contract.py): for
    the one input (``input-0``), the share of all training values in each of its bins, over
    [0, 1] for images' pixels, over the values' range for a table's features. The rest is for
    people: means, deviations and the label distribution.
    """
    with torch.no_grad():
        rows = rows.float()
        low, high = (0.0, 1.0) if kind == "images" else (float(rows.min()), float(rows.max()))
        if high <= low:
            high = low + 1.0
        counts = torch.histc(rows, bins=REFERENCE_BINS, min=low, max=high).double()
        per_feature_mean = rows.mean(dim=0)
        per_feature_std = rows.std(dim=0) if len(rows) > 1 else torch.zeros_like(per_feature_mean)
        label_counts = torch.bincount(labels, minlength=classes).double()
        edges = np.linspace(low, high, REFERENCE_BINS + 1).round(6).tolist()
        return {
            "inputs": {
                "input-0": {"edges": edges, "shares": (counts / counts.sum()).cpu().tolist()}
            },
            "n_rows": len(rows),
            "mean": float(rows.mean()),
            "std": float(rows.std()),
            "feature_mean": per_feature_mean.cpu().round(decimals=6).tolist(),
            "feature_std": per_feature_std.cpu().round(decimals=6).tolist(),
            "label_distribution": (label_counts / label_counts.sum()).cpu().tolist(),
        }


def write_input_reference(reference: dict[str, object], path: Path) -> None:
    """``input_reference`` as JSON."""
    path.write_text(json.dumps(reference) + "\n")
