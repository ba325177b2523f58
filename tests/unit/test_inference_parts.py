"""Pure parts of the Inference service: input checks, the dynamic batcher, drift, cache keys."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.inference.batching import Batcher
from services.inference.cache import cache_key
from services.inference.drift import DriftMonitor, psi
from services.inference.inputs import check_batch_size, image_array
from services.inference.repository import parse_version

# -- inputs ---------------------------------------------------------------------------------------


def test_pixels_and_raw_bytes_give_the_same_array() -> None:
    raw = bytes(range(256)) * 3 + bytes(16)
    from_raw = image_array([], raw, "image", "image_raw")
    from_floats = image_array((np.frombuffer(raw, np.uint8) / 255).tolist(), b"", "image", "raw")
    assert from_raw.dtype == np.float32 and from_raw.shape == (784,)
    np.testing.assert_array_equal(from_raw, from_floats)
    assert cache_key("m:1:run", from_raw) == cache_key("m:1:run", from_floats)
    assert cache_key("m:2:run", from_raw) != cache_key("m:1:run", from_raw)


@pytest.mark.parametrize(
    ("pixels", "raw", "message"),
    [
        ([0.1] * 783, b"", "image has 783 values; a 28x28 image needs 784"),
        ([], b"", "image is empty"),
        ([0.0] * 783 + [float("nan")], b"", "image[783] is NaN"),
        ([float("inf")] + [0.0] * 783, b"", "image[0] is inf"),
        ([0.0] * 10 + [1.0001] + [0.0] * 773, b"", "image[10] is 1.0001"),
        ([0.0] * 784, b"\x00" * 784, "give image or image_raw, not both"),
        ([], b"\x00" * 785, "image_raw has 785 bytes"),
    ],
)
def test_bad_images_are_named(pixels: list[float], raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        image_array(pixels, raw, "image", "image_raw")


def test_batch_sizes_are_checked() -> None:
    check_batch_size(1, 4, "images")
    check_batch_size(4, 4, "images")
    with pytest.raises(InvalidArgument, match="images is empty"):
        check_batch_size(0, 4, "images")
    with pytest.raises(InvalidArgument, match="5 images; at most 4"):
        check_batch_size(5, 4, "images")


@pytest.mark.parametrize(
    ("given", "expected"), [("", "production"), (" 3 ", 3), ("staging", "staging")]
)
def test_versions_and_aliases_parse(given: str, expected: int | str) -> None:
    assert parse_version(given) == expected


@pytest.mark.parametrize("given", ["0", "-2"])
def test_non_positive_versions_are_invalid(given: str) -> None:
    with pytest.raises(InvalidArgument, match="model_version must be 1 or more"):
        parse_version(given)


# -- batching -------------------------------------------------------------------------------------


class RecordingModel:
    """A forward pass that records batch sizes; answers row i with the first pixel repeated."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self._gate = gate

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._gate is not None:
            self._gate.wait(5)
        self.batches.append(len(images))
        return np.repeat(images[:, :1], 10, axis=1)


async def test_concurrent_requests_are_coalesced_up_to_the_maximum() -> None:
    gate = threading.Event()
    model = RecordingModel(gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.predict(np.full((1, 784), 0.5, np.float32)))
        await asyncio.sleep(0.05)  # the first forward pass is running (held by the gate)
        sizes = [1, 3, 2, 4, 1, 5]
        calls = [
            asyncio.ensure_future(batcher.predict(np.full((n, 784), i / 10, np.float32)))
            for i, n in enumerate(sizes)
        ]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *calls)
        await batcher.close()
    assert model.batches[0] == 1
    assert all(size <= 8 for size in model.batches)
    assert sum(model.batches) == 1 + sum(sizes)
    assert len(model.batches) < 1 + len(sizes)  # some requests shared a pass
    for i, (n, result) in enumerate(zip(sizes, results[1:], strict=True)):
        assert result.shape == (n, 10)
        np.testing.assert_allclose(result, i / 10)  # each caller got its own rows back


async def test_the_batcher_waits_up_to_max_wait_for_company() -> None:
    model = RecordingModel()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.2)
        one = asyncio.ensure_future(batcher.predict(np.zeros((1, 784), np.float32)))
        await asyncio.sleep(0.02)
        two = asyncio.ensure_future(batcher.predict(np.zeros((2, 784), np.float32)))
        await asyncio.gather(one, two)
        await batcher.close()
    assert model.batches == [3]


async def test_a_failed_forward_pass_fails_its_callers_only() -> None:
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(broken, executor, max_size=4, max_wait_s=0.0)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.predict(np.zeros((1, 784), np.float32))
        await batcher.close()


async def test_close_answers_what_is_queued_and_later_calls_still_work() -> None:
    model = RecordingModel()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=2, max_wait_s=0.0)
        calls = [
            asyncio.ensure_future(batcher.predict(np.zeros((1, 784), np.float32))) for _ in range(5)
        ]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(call.done() for call in calls)
        late = await batcher.predict(np.ones((1, 784), np.float32))
    assert late.shape == (1, 10)
    assert sum(model.batches) == 6


# -- drift ----------------------------------------------------------------------------------------


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift() -> None:
    reference = np.array([0.7, 0.1, 0.1, 0.1])
    assert psi(reference, reference) == pytest.approx(0.0)
    assert psi(reference, np.array([0.6, 0.2, 0.1, 0.1])) < 0.1
    assert psi(reference, np.array([0.1, 0.1, 0.1, 0.7])) > 0.25


def test_the_drift_window_forgets_old_images() -> None:
    rng = np.random.default_rng(0)
    dark = (rng.random((100, 784)) * 0.1).astype(np.float32)  # all in the first bin
    monitor = DriftMonitor(np.array([1.0] + [0.0] * 9), window_images=100)
    assert np.isnan(monitor.score())
    monitor.observe(dark)
    assert monitor.score() < 0.01 and monitor.images == 100
    monitor.observe(np.ones((100, 784), np.float32))  # all in the last bin; the dark ones go
    assert monitor.images == 100
    assert monitor.score() > 1.0
