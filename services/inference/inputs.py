"""Turning Predict's images into an image classifier's input: (N, 784) float32 in [0, 1], or a
clear error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.common.errors import InvalidArgument

# What mlmesh's Predict RPCs take: one 28x28 grey image, 784 intensities.
IMAGE_PIXELS = 784


def image_array(pixels: Sequence[float], raw: bytes, field: str, raw_field: str) -> np.ndarray:
    """One image given as ``pixels`` (784 floats in [0, 1]) or ``raw`` (784 uint8 bytes).

    ``field``/``raw_field`` are the request's names for the two forms, used in errors.
    """
    if len(pixels) and len(raw):
        raise InvalidArgument(f"give {field} or {raw_field}, not both")
    if len(raw):
        if len(raw) != IMAGE_PIXELS:
            raise InvalidArgument(
                f"{raw_field} has {len(raw)} bytes; a 28x28 image needs {IMAGE_PIXELS}"
            )
        return np.frombuffer(raw, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    if not len(pixels):
        raise InvalidArgument(
            f"{field} is empty: give {IMAGE_PIXELS} pixel intensities in [0, 1] "
            f"(or {raw_field}: {IMAGE_PIXELS} bytes)"
        )
    if len(pixels) != IMAGE_PIXELS:
        raise InvalidArgument(
            f"{field} has {len(pixels)} values; a 28x28 image needs {IMAGE_PIXELS}"
        )
    image = np.asarray(pixels, dtype=np.float32)
    check_pixels(image, field)
    return image


def check_pixels(values: np.ndarray, field: str) -> None:
    """Every value of ``values`` is a pixel intensity in [0, 1]; errors name the first that
    is not by its flat (row-major) index in ``field``."""
    # NaN fails both comparisons, so one check covers NaN, infinities and the range.
    if not (values.min() >= 0.0 and values.max() <= 1.0):
        bad = int(np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))[0])
        value = float(values.flat[bad])
        what = "is NaN" if np.isnan(value) else f"is {value:g}"
        raise InvalidArgument(f"{field}[{bad}] {what}; pixel intensities must be in [0, 1]")


def check_batch_size(count: int, maximum: int, field: str, unit: str = "images") -> None:
    """A request holds 1..maximum images (or rows of another model's inputs)."""
    if count == 0:
        raise InvalidArgument(f"{field} is empty: give at least one {unit.rstrip('s')}")
    if count > maximum:
        raise InvalidArgument(
            f"{field} has {count} {unit}; at most {maximum} are allowed per request "
            "(MLMESH_INFERENCE_MAX_BATCH_IMAGES)"
        )
