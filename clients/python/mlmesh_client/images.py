"""Images for the Inference service: what a caller holds, as the contract's ``Image``.

An image is height x width x channels intensities (1 channel grey, 3 RGB), row-major with
channels last, in one of two forms: floats in [0, 1] (``pixels``) or uint8 bytes (``raw``).
``to_image`` picks the form from what it is given, so uint8 data is never turned into floats on
the way, and fills in the size. ``read_image_file`` reads a picture or a ``.npy`` array from
disk, at its own size unless asked to resize.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlmesh.inference.v1 import inference_pb2 as inference

# What an image with no size given is: 28x28 grey, MNIST's (the seed API's 784 values).
DEFAULT_SHAPE = (28, 28, 1)
IMAGE_PIXELS = 784

# bytes or uint8 arrays are sent raw; any other numbers must be floats in [0, 1].
ImageLike = bytes | bytearray | memoryview | np.ndarray | Sequence[float]
Shape = tuple[int, int, int]


class ImageError(ValueError):
    """The image cannot be read, or its values or size are not an image's; the message says
    why."""


def shape_of(array: np.ndarray, shape: Shape | None = None) -> Shape:
    """An image array's (height, width, channels): given, from its own dimensions ((H, W) or
    (H, W, C)), or 28x28 grey for 784 flat values."""
    if shape is not None:
        if array.size != shape[0] * shape[1] * shape[2]:
            raise ImageError(
                f"{array.size} values are not a {shape[0]}x{shape[1]}x{shape[2]} image"
            )
        return shape
    if array.ndim == 3 and array.shape[2] in (1, 3):
        return int(array.shape[0]), int(array.shape[1]), int(array.shape[2])
    if array.ndim == 2 and array.shape != (1, IMAGE_PIXELS):
        return int(array.shape[0]), int(array.shape[1]), 1
    if array.size == IMAGE_PIXELS:
        return DEFAULT_SHAPE
    raise ImageError(
        f"cannot tell the size of an image of shape {array.shape}: give (height, width) or "
        "(height, width, channels), or its shape"
    )


def to_image(image: ImageLike, shape: Shape | None = None) -> inference.Image:
    """``image`` as the contract's Image: bytes and uint8 arrays as ``raw``, floats as
    ``pixels``; its size from ``shape``, or from the array (see ``shape_of``)."""
    if isinstance(image, bytes | bytearray | memoryview):
        raw = bytes(image)
        size = shape or DEFAULT_SHAPE
        if len(raw) != size[0] * size[1] * size[2]:
            raise ImageError(
                f"a raw {size[0]}x{size[1]}x{size[2]} image is "
                f"{size[0] * size[1] * size[2]} bytes, got {len(raw)}"
            )
        return inference.Image(raw=raw, height=size[0], width=size[1], channels=size[2])
    array = np.asarray(image)
    size = shape_of(array, shape)
    if array.dtype == np.uint8:
        return inference.Image(
            raw=np.ascontiguousarray(array).tobytes(),
            height=size[0],
            width=size[1],
            channels=size[2],
        )
    return inference.Image(
        pixels=_unit_floats(array).tolist(), height=size[0], width=size[1], channels=size[2]
    )


def read_image_file(
    path: str | Path,
    *,
    invert: bool = False,
    resize: tuple[int, int] | None = None,
    mode: str = "",
) -> np.ndarray:
    """A picture (PNG, JPEG, ... via Pillow) or a ``.npy`` array, as (height, width, channels).

    A picture keeps its size unless ``resize`` (height, width) asks for another, and its
    colours (grey stays grey, anything else is RGB) unless ``mode`` is "grey" or "rgb";
    transparent pixels count as background. A ``.npy`` keeps its type (uint8 as is, floats
    checked to lie in [0, 1]): (H, W), (H, W, C), or 784 values for 28x28. ``invert`` flips
    dark and light, for dark strokes on a light background (the MNIST datasets are light on
    dark).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        if resize is not None or mode:
            raise ImageError(f"{path}: resize and colour changes are for pictures")
        array = _read_npy(path)
        if invert:
            array = 255 - array if array.dtype == np.uint8 else np.float32(1.0) - array
        return array
    pixels = _read_picture(path, invert, resize, mode)
    return 255 - pixels if invert else pixels


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: not a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise ImageError(f"{path}: not one array")
    try:
        size = shape_of(array)
        if array.dtype == np.uint8:
            return array.reshape(size)
        return _unit_floats(array).reshape(size)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def _read_picture(
    path: Path, invert: bool, resize: tuple[int, int] | None, mode: str
) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only for pictures; the SDK needs no Pillow

    if mode not in ("", "grey", "rgb"):
        raise ImageError(f"mode must be grey or rgb, got {mode!r}")
    try:
        with Image.open(path) as picture:
            picture.load()
            grey = (
                picture.mode in ("1", "L", "LA", "I", "I;16", "F") if not mode else mode == "grey"
            )
            if picture.has_transparency_data:
                # Transparent pixels are background: dark, or light when the picture is to be
                # inverted, so that inverting makes them dark too.
                background = (255, 255, 255, 255) if invert else (0, 0, 0, 255)
                rgba = picture.convert("RGBA")
                picture = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)
            converted = picture.convert("L" if grey else "RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise ImageError(f"{path}: not a picture Pillow can read ({exc})") from None
    if resize is not None and converted.size != (resize[1], resize[0]):
        converted = converted.resize((resize[1], resize[0]), Image.Resampling.LANCZOS)
    array = np.asarray(converted, dtype=np.uint8)
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def _unit_floats(array: np.ndarray) -> np.ndarray:
    """``array`` as flat float32, checked to be finite and within [0, 1]."""
    if array.dtype.kind not in "fiu":
        raise ImageError(f"image values must be numbers, got {array.dtype}")
    floats = array.astype(np.float32).reshape(-1)
    if not np.isfinite(floats).all():
        raise ImageError("image values must be finite")
    low, high = float(floats.min()), float(floats.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"image values must lie in [0, 1], got {low:g} to {high:g} "
            "(give 0-255 intensities as a uint8 array or bytes)"
        )
    return floats
