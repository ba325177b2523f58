"""Images for the Inference service: what a caller holds, as the contract's 28x28 ``Image``.

The contract takes an image in one of two forms: 784 floats in [0, 1] (``pixels``) or 784
uint8 bytes (``raw``). ``to_image`` picks the form from what it is given, so uint8 data is
never turned into floats on the way. ``read_image_file`` reads a picture or a ``.npy`` array
from disk into the same 784 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlmesh.inference.v1 import inference_pb2 as inference

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

# bytes or uint8 arrays are sent raw; any other numbers must be floats in [0, 1].
ImageLike = bytes | bytearray | memoryview | np.ndarray | Sequence[float]


class ImageError(ValueError):
    """The image cannot be read or is not 784 intensities; the message says why."""


def to_image(image: ImageLike) -> inference.Image:
    """``image`` as the contract's Image: bytes and uint8 arrays as ``raw``, floats as ``pixels``.

    Any shape with 784 elements is taken (784, 28x28, 1x28x28), read row-major.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        raw = bytes(image)
        if len(raw) != IMAGE_PIXELS:
            raise ImageError(f"a raw image is {IMAGE_PIXELS} bytes, got {len(raw)}")
        return inference.Image(raw=raw)
    array = np.asarray(image)
    if array.size != IMAGE_PIXELS:
        raise ImageError(
            f"an image is {IMAGE_PIXELS} values ({IMAGE_SIDE}x{IMAGE_SIDE}), "
            f"got {array.size} (shape {array.shape})"
        )
    if array.dtype == np.uint8:
        return inference.Image(raw=np.ascontiguousarray(array).tobytes())
    return inference.Image(pixels=_unit_floats(array).tolist())


def read_image_file(path: str | Path, *, invert: bool = False) -> np.ndarray:
    """The 784 intensities of a picture (PNG, JPEG, ... via Pillow) or of a ``.npy`` array.

    A picture becomes 8-bit grayscale, resized to 28x28 when it is another size; transparent
    pixels count as background. A ``.npy`` keeps its type: uint8 as is, floats checked to lie
    in [0, 1]. ``invert`` flips dark and light, for dark strokes on a light background (the
    MNIST datasets are light on dark). Returns a flat uint8 or float32 array of 784.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        array = _read_npy(path)
        if invert:
            array = 255 - array if array.dtype == np.uint8 else np.float32(1.0) - array
        return array
    pixels = _read_picture(path, invert)
    return 255 - pixels if invert else pixels


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: not a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.size != IMAGE_PIXELS:
        shape = getattr(array, "shape", "?")
        raise ImageError(
            f"{path}: an image is {IMAGE_PIXELS} values ({IMAGE_SIDE}x{IMAGE_SIDE}), "
            f"the array has shape {shape}"
        )
    if array.dtype == np.uint8:
        return array.reshape(IMAGE_PIXELS)
    try:
        return _unit_floats(array)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def _read_picture(path: Path, invert: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only for pictures; the SDK needs no Pillow

    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.has_transparency_data:
                # Transparent pixels are background: dark, or light when the picture is to be
                # inverted, so that inverting makes them dark too.
                background = (255, 255, 255, 255) if invert else (0, 0, 0, 255)
                rgba = picture.convert("RGBA")
                picture = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)
            gray = picture.convert("L")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise ImageError(f"{path}: not a picture Pillow can read ({exc})") from None
    if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
        gray = gray.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8).reshape(IMAGE_PIXELS)


def _unit_floats(array: np.ndarray) -> np.ndarray:
    """``array`` as flat float32, checked to be finite and within [0, 1]."""
    if array.dtype.kind not in "fiu":
        raise ImageError(f"image values must be numbers, got {array.dtype}")
    floats = array.astype(np.float32).reshape(IMAGE_PIXELS)
    if not np.isfinite(floats).all():
        raise ImageError("image values must be finite")
    low, high = float(floats.min()), float(floats.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"image values must lie in [0, 1], got {low:g} to {high:g} "
            "(give 0-255 intensities as a uint8 array or bytes)"
        )
    return floats
