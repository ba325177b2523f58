"""What can be trained: architecture and optimizer names, and which architecture takes which
data.

Torch-free on purpose: the gRPC service imports this to validate submissions, and must stay
light. ``models.build_model`` builds the networks; ``gbm`` is scikit-learn's. The built-in
datasets and their classes are the Datasets domain's (services/datasets/builtin.py).
"""

from __future__ import annotations

from typing import Literal

ARCHITECTURES = ("cnn", "mlp", "resnet18", "mobilenet_v3_small", "gbm")
OPTIMIZERS = ("adam", "adamw", "sgd")

InputKind = Literal["images", "table"]
# What each architecture takes: images, tables or both, and the smallest image side.
_TAKES: dict[str, tuple[tuple[str, ...], int]] = {
    "cnn": (("images",), 6),
    "mlp": (("images", "table"), 1),
    "resnet18": (("images",), 8),
    "mobilenet_v3_small": (("images",), 8),
    "gbm": (("table",), 1),
}


def fits(architecture: str, kind: str, shape: tuple[int, ...]) -> str:
    """Why ``architecture`` cannot train on ``kind`` data of one sample's ``shape``; "" when
    it can."""
    if architecture not in _TAKES:
        return f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
    kinds, smallest = _TAKES[architecture]
    if kind not in kinds:
        takes = " and ".join(kinds)
        others = [a for a, (k, _) in _TAKES.items() if kind in k]
        return (
            f"architecture {architecture} takes {takes}, and this dataset is "
            f"{'a table' if kind == 'table' else 'images'}: use {' or '.join(others)}"
        )
    if kind == "images" and min(shape[:2]) < smallest:
        return (
            f"architecture {architecture} needs images of at least {smallest}x{smallest}; "
            f"these are {shape[0]}x{shape[1]} (upload them with a resize)"
        )
    return ""
