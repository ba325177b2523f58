"""Turning Predict's images into an image classifier's input: (N, 784) float32 in [0, 1], or a
clear error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.common.errors import InvalidArgument

# An image whose request gives no size: 28x28 grey, MNIST's (the seed API's 784 values).
DEFAULT_SHAPE = (28, 28, 1)
IMAGE_PIXELS = 784
MAX_SIDE = 4096

Shape = tuple[int, int, int]


def image_shape(height: int, width: int, channels: int, field: str) -> Shape:
    """An image's (height, width, channels) as a request gives it; all 0 is 28x28 grey."""
    if (height, width, channels) == (0, 0, 0):
        return DEFAULT_SHAPE
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise InvalidArgument(
            f"{field} height and width must be 1-{MAX_SIDE} (or, with channels, all 0 for "
            f"28x28 grey), got {height}x{width}"
        )
    if channels not in (1, 3):
        raise InvalidArgument(f"{field} channels must be 1 (grey) or 3 (RGB), got {channels}")
    return height, width, channels


def image_array(
    pixels: Sequence[float], raw: bytes, shape: Shape, field: str, raw_field: str
) -> np.ndarray:
    """One image given as ``pixels`` (floats in [0, 1]) or ``raw`` (uint8 bytes), flat,
    row-major with channels last, with height x width x channels values.

    ``field``/``raw_field`` are the request's names for the two forms, used in errors.
    """
    size = shape[0] * shape[1] * shape[2]
    what = f"a {shape[0]}x{shape[1]}{' RGB' if shape[2] == 3 else ''} image needs {size}"
    if len(pixels) and len(raw):
        raise InvalidArgument(f"give {field} or {raw_field}, not both")
    if len(raw):
        if len(raw) != size:
            raise InvalidArgument(f"{raw_field} has {len(raw)} bytes; {what}")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    if not len(pixels):
        raise InvalidArgument(
            f"{field} is empty: give {size} pixel intensities in [0, 1] "
            f"(or {raw_field}: {size} bytes)"
        )
    if len(pixels) != size:
        raise InvalidArgument(f"{field} has {len(pixels)} values; {what}")
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
