"""The architectures, by name. Each maps (N, 784) float32 pixels in [0, 1] to (N, 10) logits.

Every model standardizes its input itself (with the training split's pixel mean and standard
deviation, stored as buffers), so whoever serves it sends raw [0, 1] pixels and nothing else.
To add an architecture: write the module, add it to ``MODELS`` and its name to
``catalog.ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from services.training.ml.catalog import ARCHITECTURES, IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES

# MNIST's pixel statistics: the defaults when a model is built without the training split's.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Standardize(nn.Module):
    """(x - mean) / std with constants that travel with the model."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MnistCnn(nn.Module):
    """The classic PyTorch MNIST example network (pytorch/examples, mnist/main.py)."""

    def __init__(self, pixel_mean: float = MNIST_MEAN, pixel_std: float = MNIST_STD) -> None:
        super().__init__()
        self.standardize = Standardize(pixel_mean, pixel_std)
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x).view(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


class Mlp(nn.Module):
    """784 -> 256 -> 128 -> 10 with ReLU and dropout."""

    def __init__(self, pixel_mean: float = MNIST_MEAN, pixel_std: float = MNIST_STD) -> None:
        super().__init__()
        self.standardize = Standardize(pixel_mean, pixel_std)
        self.layers = nn.Sequential(
            nn.Linear(IMAGE_PIXELS, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(x))


class Probabilities(nn.Module):
    """A classifier whose output is softmax probabilities: what is logged and served."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(x), dim=1)


# name -> constructor taking (pixel_mean, pixel_std); catalog.ARCHITECTURES lists the same names.
MODELS: dict[str, Callable[[float, float], nn.Module]] = {"cnn": MnistCnn, "mlp": Mlp}


def build_model(
    architecture: str, *, pixel_mean: float = MNIST_MEAN, pixel_std: float = MNIST_STD
) -> nn.Module:
    """A freshly initialized ``architecture`` (draws from torch's global RNG: seed first)."""
    if architecture not in MODELS:
        raise ValueError(
            f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    return MODELS[architecture](pixel_mean, pixel_std)
