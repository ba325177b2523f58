"""The SDK's and CLI's side of prediction: images to the contract's form, files, arguments.

The SDK calls go to stand-in Inference and Dataset services in this process that record what
they got, so these tests check what the client sends, not what a model answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from mlmesh.datasets.v1 import datasets_pb2 as datasets
from mlmesh.datasets.v1 import datasets_pb2_grpc
from mlmesh.inference.v1 import inference_pb2 as inference
from mlmesh.inference.v1 import inference_pb2_grpc
from mlmesh_client import Client, ImageError, MeshError, read_image_file
from mlmesh_client.cli import main
from mlmesh_client.images import shape_of, to_image

# -- to_image -----------------------------------------------------------------------------


def test_floats_are_sent_as_pixels_row_major_with_their_size() -> None:
    square = np.linspace(0.0, 1.0, 784, dtype=np.float32).reshape(28, 28)
    image = to_image(square)
    assert image.raw == b""
    assert list(image.pixels) == pytest.approx(square.ravel().tolist())
    assert (image.height, image.width, image.channels) == (28, 28, 1)
    flat = to_image([0.5] * 784)
    assert list(flat.pixels) == [0.5] * 784 and (flat.height, flat.width) == (28, 28)


def test_uint8_and_bytes_are_sent_raw() -> None:
    pixels = np.arange(784, dtype=np.int64) % 256
    assert to_image(pixels.astype(np.uint8)).raw == bytes(pixels.tolist())
    assert to_image(bytes(pixels.tolist())).raw == bytes(pixels.tolist())
    assert list(to_image(pixels.astype(np.uint8)).pixels) == []


def test_any_size_and_colour_is_described() -> None:
    rgb = np.zeros((32, 48, 3), np.uint8)
    image = to_image(rgb)
    assert (image.height, image.width, image.channels) == (32, 48, 3)
    assert len(image.raw) == 32 * 48 * 3
    grey = to_image(np.zeros((10, 12), np.float32))
    assert (grey.height, grey.width, grey.channels) == (10, 12, 1)
    flat = to_image(bytes(64 * 64 * 3), shape=(64, 64, 3))
    assert (flat.height, flat.width, flat.channels) == (64, 64, 3)
    assert shape_of(np.zeros(12288), (64, 64, 3)) == (64, 64, 3)


@pytest.mark.parametrize(
    ("image", "shape", "needle"),
    [
        ([0.5] * 783, None, "cannot tell the size of an image of shape (783,)"),
        (np.zeros((28, 29, 2), np.float32), None, "shape (28, 29, 2)"),
        (b"\x00" * 785, None, "784 bytes, got 785"),
        (b"\x00" * 100, (8, 8, 3), "a raw 8x8x3 image is 192 bytes, got 100"),
        (np.zeros(100, np.uint8), (8, 8, 3), "100 values are not a 8x8x3 image"),
        ([0.0] * 783 + [1.5], None, "[0, 1], got 0 to 1.5"),
        ([0.0] * 783 + [-0.1], None, "[0, 1]"),
        ([0.0] * 783 + [float("nan")], None, "finite"),
        (list(range(784)), None, "uint8"),  # 0-255 ints that are not uint8: the hint says how
        (["a"] * 784, None, "numbers"),
    ],
)
def test_bad_images_are_refused_before_sending(
    image: object, shape: tuple[int, int, int] | None, needle: str
) -> None:
    with pytest.raises(ImageError) as err:
        to_image(image, shape)  # type: ignore[arg-type]
    assert needle in str(err.value)


# -- read_image_file --------------------------------------------------------------------


def test_a_28x28_grayscale_png_is_read_exactly(tmp_path: Path) -> None:
    pixels = (np.arange(784) % 256).astype(np.uint8)
    Image.fromarray(pixels.reshape(28, 28), mode="L").save(tmp_path / "digit.png")
    read = read_image_file(tmp_path / "digit.png")
    assert read.dtype == np.uint8 and read.shape == (28, 28, 1)
    assert np.array_equal(read.ravel(), pixels)
    inverted = read_image_file(tmp_path / "digit.png", invert=True)
    assert np.array_equal(inverted.ravel(), 255 - pixels)


def test_a_colour_picture_keeps_its_size_and_colours_unless_asked(tmp_path: Path) -> None:
    picture = np.zeros((84, 56, 3), np.uint8)
    picture[:42] = (255, 255, 255)  # top half white, bottom half black
    picture[42:, :, 0] = 200  # bottom half red
    Image.fromarray(picture, mode="RGB").save(tmp_path / "photo.png")
    read = read_image_file(tmp_path / "photo.png")
    assert read.shape == (84, 56, 3) and np.array_equal(read, picture)
    small = read_image_file(tmp_path / "photo.png", resize=(28, 28), mode="grey")
    assert small.shape == (28, 28, 1)
    assert small[:12].min() > 240 and 40 < small[16:].max() < 80  # red is darker as grey
    rgb = read_image_file(tmp_path / "photo.png", resize=(32, 32))
    assert rgb.shape == (32, 32, 3) and rgb[20:, :, 0].min() > 190 and rgb[20:, :, 1].max() < 15


def test_a_grey_picture_can_be_made_rgb(tmp_path: Path) -> None:
    Image.new("L", (20, 10), 128).save(tmp_path / "grey.png")
    rgb = read_image_file(tmp_path / "grey.png", mode="rgb")
    assert rgb.shape == (10, 20, 3) and set(rgb.ravel().tolist()) == {128}


def test_transparent_pixels_are_background(tmp_path: Path) -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)  # transparent everywhere ...
    rgba[10:18, 10:18] = (0, 0, 0, 255)  # ... but an opaque black square: dark on light
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "drawn.png")
    inverted = read_image_file(tmp_path / "drawn.png", invert=True, mode="grey")[:, :, 0]
    assert inverted[10:18, 10:18].min() == 255 and inverted[:10].max() == 0
    rgba[10:18, 10:18] = (255, 255, 255, 255)  # light on dark needs no inverting
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "light.png")
    plain = read_image_file(tmp_path / "light.png", mode="grey")[:, :, 0]
    assert plain[10:18, 10:18].min() == 255 and plain[:10].max() == 0


def test_npy_arrays_keep_their_type(tmp_path: Path) -> None:
    floats = np.full((28, 28), 0.25, np.float64)
    np.save(tmp_path / "f.npy", floats)
    read = read_image_file(tmp_path / "f.npy")
    assert read.dtype == np.float32 and read.shape == (28, 28, 1) and read[0, 0, 0] == 0.25
    assert read_image_file(tmp_path / "f.npy", invert=True)[0, 0, 0] == 0.75
    np.save(tmp_path / "u.npy", np.full(784, 200, np.uint8))
    assert read_image_file(tmp_path / "u.npy").ravel().tolist() == [200] * 784
    assert read_image_file(tmp_path / "u.npy", invert=True).ravel().tolist() == [55] * 784
    np.save(tmp_path / "rgb.npy", np.zeros((8, 6, 3), np.uint8))
    assert read_image_file(tmp_path / "rgb.npy").shape == (8, 6, 3)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("notes.png", b"not a picture", "not a picture Pillow can read"),
        ("short.npy", b"\x93NUMPY garbage", "not a .npy array"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as err:
        read_image_file(tmp_path / name)
    assert needle in str(err.value) and name in str(err.value)


def test_bad_npy_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((28, 30, 2), np.float32))
    with pytest.raises(ImageError, match=r"shape \(28, 30, 2\)"):
        read_image_file(tmp_path / "wide.npy")
    with pytest.raises(ImageError, match="resize and colour changes are for pictures"):
        read_image_file(tmp_path / "wide.npy", resize=(28, 28))
    np.save(tmp_path / "bytes.npy", np.full(784, 255.0))
    with pytest.raises(ImageError, match=r"bytes.npy: image values must lie in \[0, 1\]"):
        read_image_file(tmp_path / "bytes.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 784, dtype=object))
    with pytest.raises(ImageError, match=r"not a \.npy array"):  # no unpickling
        read_image_file(tmp_path / "objects.npy")
    with pytest.raises(ImageError, match="no such file"):
        read_image_file(tmp_path / "missing.png")


# -- the SDK against stand-in Inference and Dataset services -------------------------------


class StandIn(inference_pb2_grpc.InferenceServiceServicer):
    """Answers class 7 for everything ("Sneaker" for the model "fashion"), cached from the
    second identical request on."""

    def __init__(self) -> None:
        self.requests: list[object] = []
        self.keys: list[str | None] = []
        self.seen: set[bytes] = set()

    def _note(self, request: object, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.keys.append(dict(context.invocation_metadata()).get("x-api-key"))

    def Predict(self, request, context):
        self._note(request, context)
        if request.model_version == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "mnist-classifier has no version 'missing'")
        key = request.SerializeToString(deterministic=True)
        cached = key in self.seen
        self.seen.add(key)
        return inference.PredictResponse(
            prediction=7,
            confidence=0.875,
            probabilities=[0.0125] * 7 + [0.875] + [0.0125] * 2,
            model_name=request.model_name or "mnist-classifier",
            model_version=int(request.model_version or 4),
            cached=cached,
            class_name="Sneaker" if request.model_name == "fashion" else "",
        )

    def PredictBatch(self, request, context):
        self._note(request, context)
        return inference.PredictBatchResponse(
            predictions=[inference.Prediction(prediction=i) for i in range(len(request.images))],
            model_name="mnist-classifier",
            model_version=4,
        )

    def PredictStream(self, request_iterator, context):
        for request in request_iterator:
            self._note(request, context)
            yield inference.PredictStreamResponse(
                request_id=request.request_id,
                prediction=inference.Prediction(prediction=len(request.image.raw) % 10),
                model_name="mnist-classifier",
                model_version=4,
            )


class Samples(datasets_pb2_grpc.DatasetServiceServicer):
    """Sample 0 of "fashion" is an ankle boot (class 9) of 28x28 grey; "wine" is a table."""

    def __init__(self) -> None:
        self.requests: list[datasets.GetDatasetSampleRequest] = []

    def GetDatasetSample(self, request, context):
        self.requests.append(request)
        if request.index != 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "index must be 0 to 0, got 5")
        if request.name == "wine":
            return datasets.GetDatasetSampleResponse(
                dataset=datasets.Dataset(name="wine", version=1, kind=datasets.DATASET_KIND_TABLE),
                values=[1.0, 2.0],
                label=1,
            )
        return datasets.GetDatasetSampleResponse(
            dataset=datasets.Dataset(
                name=request.name,
                version=request.version or 2,
                kind=datasets.DATASET_KIND_IMAGES,
                height=28,
                width=28,
                channels=1,
            ),
            pixels=[0.5] * 784,
            label=9,
            class_name="Ankle boot",
        )


@pytest.fixture
def stand_in() -> Iterator[tuple[StandIn, str]]:
    servicer = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    server.samples = Samples()  # type: ignore[attr-defined]
    datasets_pb2_grpc.add_DatasetServiceServicer_to_server(server.samples, server)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.samples = server.samples  # type: ignore[attr-defined]
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_predict_sends_floats_or_raw_with_the_size_and_the_key(
    stand_in: tuple[StandIn, str],
) -> None:
    servicer, target = stand_in
    with Client(target, api_key="k" * 20) as mesh:
        answer = mesh.predict([0.5] * 784, model_name="digits", model_version=3)
        mesh.predict(np.zeros(784, np.uint8))
        mesh.predict(np.zeros((32, 32, 3), np.uint8), model_name="cifar")
    assert (answer.prediction, answer.model_name, answer.model_version) == (7, "digits", 3)
    floats, raw, rgb = servicer.requests
    assert list(floats.image) == [0.5] * 784 and floats.image_raw == b""
    assert (floats.height, floats.width, floats.channels) == (28, 28, 1)
    assert (floats.model_name, floats.model_version) == ("digits", "3")
    assert raw.image_raw == bytes(784) and list(raw.image) == []
    assert (raw.model_name, raw.model_version) == ("", "")  # the service's defaults
    assert (rgb.height, rgb.width, rgb.channels) == (32, 32, 3)
    assert rgb.image_raw == bytes(32 * 32 * 3)
    assert servicer.keys == ["k" * 20] * 3


def test_predict_errors_carry_the_status(stand_in: tuple[StandIn, str]) -> None:
    _, target = stand_in
    with Client(target, api_key="k" * 20) as mesh, pytest.raises(MeshError) as err:
        mesh.predict([0.0] * 784, model_version="missing")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "no version 'missing'" in str(err.value)


def test_predict_batch_keeps_each_images_form(stand_in: tuple[StandIn, str]) -> None:
    servicer, target = stand_in
    with Client(target, api_key="k" * 20) as mesh:
        answer = mesh.predict_batch([[0.0] * 784, bytes(784)], model_version="staging")
    assert [p.prediction for p in answer.predictions] == [0, 1]
    (request,) = servicer.requests
    assert [len(i.pixels) for i in request.images] == [784, 0]
    assert [len(i.raw) for i in request.images] == [0, 784]
    assert request.model_version == "staging"


def test_predict_stream_answers_in_order_and_stops_at_a_bad_image(
    stand_in: tuple[StandIn, str],
) -> None:
    servicer, target = stand_in
    images = [bytes(784), [0.0] * 784, bytes(784)]
    with Client(target, api_key="k" * 20) as mesh:
        answers = list(mesh.predict_stream(iter(images), model_name="digits"))
        assert [a.request_id for a in answers] == ["0", "1", "2"]
        assert [a.prediction.prediction for a in answers] == [4, 0, 4]  # 784 % 10, then 0
        assert {r.model_name for r in servicer.requests} == {"digits"}

        got = []
        with pytest.raises(ImageError, match="784 bytes, got 3"):
            for answer in mesh.predict_stream([bytes(784), b"bad", bytes(784)]):
                got.append(answer.request_id)
        assert got == ["0"]  # the image before the bad one was answered; none after it


def test_dataset_sample_names_its_split(stand_in: tuple[StandIn, str]) -> None:
    servicer, target = stand_in
    with Client(target, api_key="k" * 20) as mesh:
        sample = mesh.dataset_sample("fashion", 0, version=3, split="validation")
        with pytest.raises(ValueError, match="split must be one of train, validation, test"):
            mesh.dataset_sample("fashion", 0, split="dev")
    assert (sample.label, sample.class_name, sample.dataset.version) == (9, "Ankle boot", 3)
    (request,) = servicer.samples.requests  # type: ignore[attr-defined]
    assert (request.name, request.version, request.index) == ("fashion", 3, 0)
    assert request.split == datasets.DATASET_SPLIT_VALIDATION


# -- the CLI ------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main([*argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_cli_predicts_an_image_file_at_its_size_or_resized(
    stand_in: tuple[StandIn, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = stand_in
    Image.new("L", (56, 40), 255).save(tmp_path / "white.png")
    args = ("--gateway", target, "--api-key", "k" * 20, "predict", "--image")
    code, out, _ = run_cli(capsys, *args, str(tmp_path / "white.png"), "--version", "2")
    assert code == 0
    assert out.splitlines() == [
        "prediction: 7  confidence 0.8750",
        "model:      mnist-classifier v2",
        "cached:     false",
    ]
    sent = servicer.requests[0]
    assert (sent.height, sent.width, sent.channels) == (40, 56, 1)
    assert sent.image_raw == b"\xff" * (40 * 56)
    picture = (str(tmp_path / "white.png"), "--resize", "28x28", "--colour", "rgb")
    code, out, _ = run_cli(capsys, *args, *picture, "--version", "2")
    assert code == 0 and "cached:     false" in out.splitlines()
    resized = servicer.requests[1]
    assert (resized.height, resized.width, resized.channels) == (28, 28, 3)
    code, out, _ = run_cli(capsys, *args, *picture, "--version", "2")
    assert "cached:     true" in out.splitlines()


def test_cli_predicts_a_dataset_sample_and_names_the_classes(
    stand_in: tuple[StandIn, str], capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = stand_in
    argv = ("--gateway", target, "--api-key", "k" * 20, "predict", "--model", "fashion")
    code, out, _ = run_cli(capsys, *argv, "--dataset", "fashion@3", "--index", "0")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "prediction: 7 (Sneaker)  confidence 0.8750"
    assert lines[-1] == "true label: 9 (Ankle boot)  (wrong)"
    (asked,) = servicer.samples.requests  # type: ignore[attr-defined]
    assert (asked.name, asked.version, asked.split) == ("fashion", 3, datasets.DATASET_SPLIT_TEST)
    sent = servicer.requests[0]
    assert list(sent.image) == [0.5] * 784 and (sent.height, sent.width) == (28, 28)

    code, _, err = run_cli(capsys, *argv, "--dataset", "fashion", "--index", "5")
    assert code == 1 and "index must be 0 to 0, got 5" in err  # the service's own words
    code, _, err = run_cli(capsys, *argv, "--dataset", "wine", "--index", "0")
    assert code == 2 and "wine@1 is a table" in err and "Open Inference Protocol" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--image", "/nonexistent/seven.png"], "/nonexistent/seven.png: no such file"),
        (["--index", "0", "--invert"], "--invert, --resize and --colour are for --image"),
        (["--index", "0", "--resize", "28x28"], "are for --image"),
        (["--image", "x.png", "--resize", "28"], "--resize takes HxW, e.g. 32x32; got '28'"),
        (["--index", "0", "--dataset", "a@b@c"], "NAME or NAME@VERSION"),
    ],
)
def test_cli_refuses_bad_input_with_status_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens at the gateway given: these fail before any call.
    code, out, err = run_cli(capsys, "--gateway", "127.0.0.1:1", "predict", *argv)
    assert code == 2 and out == ""
    assert err.startswith("mlmesh predict: ") and needle in err
    assert "Traceback" not in err


def test_cli_predict_needs_an_image_or_an_index(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "predict")
    assert code == 2 and "one of the arguments --image --index is required" in err
