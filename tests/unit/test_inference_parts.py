"""Pure parts of the Inference service: input checks, the dynamic batcher, drift, cache keys."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.model_contract import FeatureReference
from services.inference.batching import Batcher
from services.inference.cache import cache_keys, decode_outputs, encode_outputs
from services.inference.drift import DriftMonitor, psi
from services.inference.inputs import DEFAULT_SHAPE, check_batch_size, image_array, image_shape
from services.inference.repository import parse_version

# -- inputs ---------------------------------------------------------------------------------------


def test_pixels_and_raw_bytes_give_the_same_array() -> None:
    raw = bytes(range(256)) * 3 + bytes(16)
    from_raw = image_array([], raw, DEFAULT_SHAPE, "image", "image_raw")
    floats = (np.frombuffer(raw, np.uint8) / 255).tolist()
    from_floats = image_array(floats, b"", DEFAULT_SHAPE, "image", "raw")
    assert from_raw.dtype == np.float32 and from_raw.shape == (784,)
    np.testing.assert_array_equal(from_raw, from_floats)

    def key(scope: str, image: np.ndarray, outputs: tuple[str, ...] = ("output-0",)) -> str:
        return cache_keys(scope, {"input-0": image[np.newaxis]}, outputs, 1)[0]

    assert key("m:1:run", from_raw) == key("m:1:run", from_floats)
    assert key("m:2:run", from_raw) != key("m:1:run", from_raw)
    assert key("m:1:run", from_raw, ("output-1",)) != key("m:1:run", from_raw)


def test_cache_keys_name_every_input_and_values_round_trip() -> None:
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": _bytes([b"a", b"bc"])}
    keys = cache_keys("m:1:r", a, ["y"], 2)
    assert len(set(keys)) == 2
    # a row's key depends on that row alone: the same row in another batch has the same key
    single = {"x": a["x"][1:], "s": a["s"][1:]}
    assert cache_keys("m:1:r", single, ["y"], 1) == keys[1:]
    renamed = {"x2": a["x"], "s": a["s"]}
    assert cache_keys("m:1:r", renamed, ["y"], 2) != keys
    widened = {"x": a["x"].astype(np.float64), "s": a["s"]}
    assert cache_keys("m:1:r", widened, ["y"], 2) != keys
    # a model without a batch dimension: one key for the whole request
    assert len(cache_keys("m:1:r", a, ["y"], None)) == 1
    outputs = {"p": np.array([0.25, 0.75], np.float32), "label": _bytes([b"red"]), "n": np.int64(3)}
    back = decode_outputs(encode_outputs(outputs))
    assert back is not None and list(back) == ["p", "label", "n"]
    np.testing.assert_array_equal(back["p"], outputs["p"])
    assert back["label"].tolist() == [b"red"] and back["n"] == 3
    assert decode_outputs(b"\x01garbage") is None


def _bytes(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


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
        image_array(pixels, raw, DEFAULT_SHAPE, "image", "image_raw")


def test_images_of_any_size_and_their_shapes_are_checked() -> None:
    assert image_shape(0, 0, 0, "image") == (28, 28, 1)
    rgb = image_array([0.5] * 12, b"", image_shape(2, 2, 3, "image"), "image", "raw")
    assert rgb.shape == (12,)
    with pytest.raises(InvalidArgument, match="image has 11 values; a 2x2 RGB image needs 12"):
        image_array([0.5] * 11, b"", (2, 2, 3), "image", "raw")
    with pytest.raises(InvalidArgument, match="channels must be 1 \\(grey\\) or 3"):
        image_shape(2, 2, 4, "image")
    with pytest.raises(InvalidArgument, match="height and width must be 1-4096"):
        image_shape(0, 2, 1, "image")


def test_batch_sizes_are_checked() -> None:
    check_batch_size(1, 4, "images")
    check_batch_size(4, 4, "images")
    with pytest.raises(InvalidArgument, match="images is empty: give at least one image"):
        check_batch_size(0, 4, "images")
    with pytest.raises(InvalidArgument, match="5 images; at most 4"):
        check_batch_size(5, 4, "images")
    with pytest.raises(InvalidArgument, match="inputs has 5 rows; at most 4"):
        check_batch_size(5, 4, "inputs", "rows")


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
    """A forward pass that records batch sizes; answers each row with its first value
    repeated ten times."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self._gate = gate

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._gate is not None:
            self._gate.wait(5)
        images = inputs["x"]
        self.batches.append(len(images))
        return {"y": np.repeat(images[:, :1], 10, axis=1)}


def rows(n: int, value: float, width: int = 784) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, np.float32)}


async def test_concurrent_requests_are_coalesced_up_to_the_maximum() -> None:
    gate = threading.Event()
    model = RecordingModel(gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.predict(rows(1, 0.5), 1))
        await asyncio.sleep(0.05)  # the first forward pass is running (held by the gate)
        sizes = [1, 3, 2, 4, 1, 5]
        calls = [
            asyncio.ensure_future(batcher.predict(rows(n, i / 10), n)) for i, n in enumerate(sizes)
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
        assert result["y"].shape == (n, 10)
        np.testing.assert_allclose(result["y"], i / 10)  # each caller got its own rows back


async def test_the_batcher_waits_up_to_max_wait_for_company_on_its_way() -> None:
    model = RecordingModel()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.2)
        batcher.expect()  # a second request is being prepared (its cache read, say)
        one = asyncio.ensure_future(batcher.predict(rows(1, 0.0), 1))
        await asyncio.sleep(0.02)
        batcher.arrived()
        two = asyncio.ensure_future(batcher.predict(rows(2, 0.0), 2))
        await asyncio.gather(one, two)
        await batcher.close()
    assert model.batches == [3]


async def test_a_lone_request_does_not_wait_for_company() -> None:
    model = RecordingModel()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=8, max_wait_s=5.0)
        started = asyncio.get_running_loop().time()
        await batcher.predict(rows(1, 0.0), 1)
        assert asyncio.get_running_loop().time() - started < 1.0  # not the 5 s max wait
        await batcher.close()
    assert model.batches == [1]


async def test_inputs_of_other_shapes_do_not_share_a_pass() -> None:
    model = RecordingModel()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.2)
        wide = asyncio.ensure_future(batcher.predict(rows(1, 0.1, 784), 1))
        await asyncio.sleep(0.02)
        narrow = asyncio.ensure_future(batcher.predict(rows(2, 0.2, 10), 2))
        results = await asyncio.gather(wide, narrow)
        await batcher.close()
    assert sorted(model.batches) == [1, 2]
    np.testing.assert_allclose(results[1]["y"], 0.2)


async def test_a_failed_pass_is_retried_per_request_so_only_the_bad_one_fails() -> None:
    def picky(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"][:, :1]}

    gate = threading.Event()

    def slow_first(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(5)
        return picky(inputs)

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(slow_first, executor, max_size=8, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.predict(rows(1, 0.5), 1))
        await asyncio.sleep(0.05)
        good = asyncio.ensure_future(batcher.predict(rows(2, 0.3), 2))
        bad = asyncio.ensure_future(batcher.predict(rows(1, -1.0), 1))
        await asyncio.sleep(0.05)
        gate.set()
        assert (await first)["y"].tolist() == [[0.5]]
        np.testing.assert_allclose((await good)["y"], 0.3)
        with pytest.raises(ValueError, match="negative input"):
            await bad
        await batcher.close()


async def test_close_answers_what_is_queued_and_later_calls_still_work() -> None:
    model = RecordingModel()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_size=2, max_wait_s=0.0)
        calls = [asyncio.ensure_future(batcher.predict(rows(1, 0.0), 1)) for _ in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(call.done() for call in calls)
        late = await batcher.predict(rows(1, 1.0), 1)
    assert late["y"].shape == (1, 10)
    assert sum(model.batches) == 6


# -- drift ----------------------------------------------------------------------------------------


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift() -> None:
    reference = np.array([0.7, 0.1, 0.1, 0.1])
    assert psi(reference, reference) == pytest.approx(0.0)
    assert psi(reference, np.array([0.6, 0.2, 0.1, 0.1])) < 0.1
    assert psi(reference, np.array([0.1, 0.1, 0.1, 0.7])) > 0.25


def test_the_drift_window_forgets_old_rows() -> None:
    rng = np.random.default_rng(0)
    dark = (rng.random((100, 784)) * 0.1).astype(np.float32)  # all in the first bin
    pixels = FeatureReference(np.linspace(0, 1, 11), np.array([1.0] + [0.0] * 9))
    monitor = DriftMonitor(pixels, window_rows=100)
    assert np.isnan(monitor.score())
    monitor.observe(dark)
    assert monitor.score() < 0.01 and monitor.rows == 100
    monitor.observe(np.ones((100, 784), np.float32))  # all in the last bin; the dark ones go
    assert monitor.rows == 100
    assert monitor.score() > 1.0


def test_single_rows_are_binned_together_and_the_window_still_forgets_row_by_row() -> None:
    rng = np.random.default_rng(1)
    rows = rng.random((150, 784)).astype(np.float32) ** 2  # skewed dark: far from uniform
    pixels = FeatureReference(np.linspace(0, 1, 11), np.ones(10))
    one_by_one = DriftMonitor(pixels, window_rows=100)
    for row in rows:  # 150 requests of one image: binned FOLD_ROWS at a time, or when read
        one_by_one.observe(row[np.newaxis])
    assert one_by_one.rows == 100  # the oldest 50 single-row batches are gone, no more
    last = DriftMonitor(pixels, window_rows=100)
    last.observe(rows[50:])
    assert one_by_one.score() == pytest.approx(last.score(), rel=1e-12)
    assert one_by_one.score() > 0.1
    one_by_one.observe(rows[:3])  # read at once: not left pending
    assert one_by_one.rows == 100 and one_by_one.score() != pytest.approx(last.score())


def test_uneven_bins_are_searched_and_out_of_range_values_land_in_the_end_bins() -> None:
    column = FeatureReference(np.array([0.0, 1.0, 10.0, 100.0]), np.array([0.5, 0.25, 0.25]))
    monitor = DriftMonitor(column, window_rows=1000)
    monitor.observe(np.array([0.5, -3.0, 5.0, 50.0, 1e9, 0.2, 0.9, 2.0]))
    assert monitor.score() == pytest.approx(0.0, abs=1e-9)  # 4 / 2 / 2 rows, as the reference
