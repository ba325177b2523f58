"""The training loop itself: epochs over tensors, evaluation, seeding. No MLflow here.

``train.train`` runs these for every job and ``bench/train_epoch.py`` times ``train_epoch``
against a plain PyTorch loop, so the benchmark measures exactly the code jobs run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.training.ml.catalog import OPTIMIZERS
from services.training.ml.data import Split
from services.training.ml.models import build_model

SGD_MOMENTUM = 0.9
# The learning rate is multiplied by this after every epoch (the classic PyTorch MNIST
# example's StepLR): over 3 epochs it lifts MNIST test accuracy by about 0.15 points.
LR_DECAY_PER_EPOCH = 0.7
EVAL_BATCH_SIZE = 1000
PROGRESS_INTERVAL_S = 0.5

ShouldStop = Callable[[], bool]


class Cancelled(Exception):
    """should_stop() said stop (``train`` ends the job's MLflow run KILLED on the way out)."""


class Throttle:
    """True at most once per ``interval_s`` (the first call always)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


def _never() -> bool:
    return False


def check_stop(should_stop: ShouldStop) -> None:
    """Raise Cancelled when ``should_stop()`` says so."""
    if should_stop():
        raise Cancelled("cancelled")


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(name: str, model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """adam, adamw or sgd (with momentum 0.9) over ``model``'s parameters."""
    params = model.parameters()
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=SGD_MOMENTUM)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


@dataclass(frozen=True)
class Setup:
    """A seeded, freshly initialized model on its device, its optimizer and LR schedule
    (``scheduler.step()`` once after every epoch), and the input statistics it standardizes
    with (numbers for images, one per feature for tables)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mean: float | list[float]
    std: float | list[float]


def input_statistics(train: Split, kind: str) -> tuple[float | list[float], float | list[float]]:
    """The training rows' mean and standard deviation: over every pixel for images, per
    column for a table (a constant column gets 1, so it passes through unscaled)."""
    if kind == "images":
        return float(train.images.mean()), float(train.images.std())
    mean = train.images.mean(dim=0)
    std = train.images.std(dim=0) if len(train) > 1 else torch.ones_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()


def set_up(
    architecture: str,
    optimizer: str,
    learning_rate: float,
    seed: int,
    train: Split,
    device: torch.device,
    *,
    kind: str = "images",
    shape: tuple[int, ...] = (28, 28, 1),
    classes: int = 10,
) -> Setup:
    """Seed everything, then build ``architecture`` for ``kind`` data of ``shape`` and
    ``classes`` classes (standardizing with ``train``'s statistics) on ``device``, with its
    optimizer: the same start for jobs and the benchmark."""
    seed_everything(seed)
    mean, std = input_statistics(train, kind)
    model = build_model(architecture, kind, shape, classes, mean=mean, std=std).to(device)  # type: ignore[arg-type]
    optim = make_optimizer(optimizer, model, learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=LR_DECAY_PER_EPOCH)
    return Setup(model, optim, scheduler, mean, std)


def augmenter(
    shape: tuple[int, int, int], generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random horizontal flips (half the images) and shifts of up to an eighth of the side
    (padding with zeros), for a batch of flat image rows; seeded by ``generator``."""
    height, width, channels = shape
    shift = max(1, min(height, width) // 8)

    def augment(rows: torch.Tensor) -> torch.Tensor:
        n = len(rows)
        images = rows.reshape(n, height, width, channels)
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip.to(rows.device)[:, None, None, None], images.flip(2), images)
        padded = F.pad(images.permute(0, 3, 1, 2), (shift, shift, shift, shift))
        dy, dx = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=generator))
        cropped = padded[:, :, dy : dy + height, dx : dx + width]
        return cropped.permute(0, 2, 3, 1).reshape(n, -1)

    return augment


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    *,
    batch_size: int,
    generator: torch.Generator,
    should_stop: ShouldStop = _never,
    on_progress: Callable[[int, int, float], None] | None = None,
    throttle: Throttle | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One pass over ``split`` in a seeded random order; the mean training loss.

    Batches are slices of one ``randperm`` over tensors already on the model's device. The
    loss is summed on the device; it is read back (a sync) only when ``throttle`` lets a
    progress report through (``on_progress(batch, total_batches, running mean loss)``).
    Raises Cancelled before the first batch after ``should_stop()`` turns true.
    """
    if on_progress is not None and throttle is None:
        throttle = Throttle(PROGRESS_INTERVAL_S)
    model.train()
    n = len(split)
    total = math.ceil(n / batch_size)
    order = torch.randperm(n, generator=generator).to(split.images.device)
    loss_sum = torch.zeros((), device=split.images.device)
    for batch in range(total):
        if should_stop():
            raise Cancelled("cancelled")
        index = order[batch * batch_size : (batch + 1) * batch_size]
        optimizer.zero_grad()
        batch_rows = split.images[index]
        if augment is not None:
            batch_rows = augment(batch_rows)
        loss = F.cross_entropy(model(batch_rows), split.labels[index])
        loss.backward()
        optimizer.step()
        loss_sum.add_(loss.detach(), alpha=len(index))
        if on_progress is not None and throttle is not None and throttle.ready():
            seen = min(n, (batch + 1) * batch_size)
            on_progress(batch + 1, total, loss_sum.item() / seen)
    return loss_sum.item() / n


@torch.inference_mode()
def evaluate(
    model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, predicted labels) of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.images.device)
    predictions = []
    for start in range(0, len(split), batch_size):
        logits = model(split.images[start : start + batch_size])
        loss_sum += F.cross_entropy(
            logits, split.labels[start : start + batch_size], reduction="sum"
        )
        predictions.append(logits.argmax(dim=1))
    model.train(was_training)
    predicted = torch.cat(predictions)
    accuracy = (predicted == split.labels).double().mean().item()
    return loss_sum.item() / len(split), accuracy, predicted
