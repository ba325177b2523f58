"""Uploading an image dataset: the whole upload against decoding the images yourself.

    .venv/bin/python -m bench.upload [--images 50000] [--rounds 3]

It writes MNIST's first ``--images`` training images as PNG files, once into a folder (one
sub-folder per class) and once into a zip of the same files, then times, in turns
(``--rounds`` times each, the best kept):

* **the baseline**: one process opening and decoding every PNG of the folder from disk with
  Pillow (``Image.open`` + ``np.asarray``), as a user's own loader would;
* **the upload**: ``Client.upload_dataset`` of the zip through the gateway of a private mesh
  (gRPC, 1 MiB chunks), to its answer: the file received, every image decoded and checked
  (in the Training service's pool of decode processes), the split drawn, the canonical
  ``dataset.npz`` written and stored in MLflow's artifact store, and the version recorded.
  Each round uploads under a new dataset name with a new split seed, so nothing is reused.

The target (issue 16): the upload takes at most 2x the baseline. Reported, never enforced.
Results: ``bench/results/upload.md``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import secrets
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.predict import BENCH_DIR, ROOT, bench_settings, drop_databases
from mlmesh_client import Client
from services.datasets.builtin import load_builtin
from services.datasets.formats import cpu_count
from services.launcher.mesh import Mesh

log = logging.getLogger("bench.upload")

TARGET_RATIO = 2.0


def write_images(images: np.ndarray, labels: np.ndarray, folder: Path, archive: Path) -> int:
    """Each image as a PNG file under folder/<label>/ and in a zip (stored, not deflated:
    PNG is compressed already); returns the zip's size."""
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            out = io.BytesIO()
            Image.fromarray(image).save(out, format="PNG")
            data = out.getvalue()
            directory = folder / str(label)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{i}.png").write_bytes(data)
            zipped.writestr(f"mnist/{label}/{i}.png", data)
    return archive.stat().st_size


def decode_folder(folder: Path) -> float:
    """Seconds for one process to open and decode every PNG under ``folder``."""
    files = sorted(folder.glob("*/*.png"))
    started = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            np.asarray(image)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "upload.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "services.launcher", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = BENCH_DIR / "upload"
    work.mkdir(parents=True, exist_ok=True)
    arrays, _, _ = load_builtin("mnist")
    images, labels = arrays.x[: args.images, :, :, 0], arrays.y[: args.images]
    archive = work / "mnist.zip"
    started = time.perf_counter()
    size = write_images(images, labels, work / "png", archive)
    took = time.perf_counter() - started
    print(f"wrote {len(images)} PNGs ({size / 1e6:.1f} MB zipped) in {took:.0f} s", flush=True)

    settings = bench_settings(work / "state")
    key = settings.api_keys.split("=", 1)[1]
    baseline, upload = [], []
    try:
        with Mesh(settings) as mesh:
            target = f"{mesh.settings.gateway_host}:{mesh.settings.gateway_port}"
            with Client(target, api_key=key) as client:
                for round_ in range(args.rounds):
                    baseline.append(decode_folder(work / "png"))
                    started = time.perf_counter()
                    answer = client.upload_dataset(
                        f"bench-{secrets.token_hex(3)}", archive, split_seed=round_ + 1
                    )
                    upload.append(time.perf_counter() - started)
                    assert answer.created and answer.dataset.samples == len(images)
                    print(
                        f"round {round_ + 1}: decode {baseline[-1]:.2f} s, "
                        f"upload {upload[-1]:.2f} s",
                        flush=True,
                    )
    finally:
        drop_databases(settings)
    ratio = min(upload) / min(baseline)
    load = os.getloadavg()
    lines = [
        "# Uploading an image dataset",
        "",
        f"`.venv/bin/python -m bench.upload --images {args.images} --rounds {args.rounds}` "
        f"on {platform.machine()}, {cpu_count()} cores, Python {platform.python_version()}; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min).",
        "",
        f"MNIST's first {len(images)} training images as PNG files: {size / 1e6:.1f} MB zipped.",
        "",
        "| | best of rounds | every round |",
        "|---|---|---|",
        f"| one process decoding the PNGs from disk with Pillow | {min(baseline):.2f} s | "
        + ", ".join(f"{t:.2f}" for t in baseline)
        + " |",
        f"| the upload through the gateway, to the stored version | {min(upload):.2f} s | "
        + ", ".join(f"{t:.2f}" for t in upload)
        + " |",
        "",
        f"Upload / decode: **{ratio:.2f}x** (target: at most {TARGET_RATIO:.0f}x: "
        f"{'met' if ratio <= TARGET_RATIO else 'missed'}).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
