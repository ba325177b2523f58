"""The torch architectures, built for the data they train on.

Every network takes what the served model takes: a batch of flat float32 rows, an image's
pixels in [0, 1] row-major with channels last (``height x width x channels`` values; MNIST's
784), or a table's feature values; and answers logits, one per class. It standardizes its
input itself (statistics of the training split, kept as buffers), so whoever serves it sends
raw values and nothing else, and it reshapes an image row itself.

- ``cnn``: two 3x3 convolutions, max pooling and two linear layers; the classic PyTorch MNIST
  example network at 28x28x1, sized for any image of at least 6x6;
- ``mlp``: 256-128 hidden units with dropout, for images and tables;
- ``resnet18`` and ``mobilenet_v3_small``: torchvision's, randomly initialised, the first
  convolution fitted to the channel count, and for images under 32 pixels a stem that keeps
  their resolution (stride 1, no pooling), as is usual for CIFAR-sized inputs.

Which architecture takes which data is ``catalog.fits`` (torch-free, for the service);
``gbm`` (scikit-learn) is not a network and is trained apart (``train.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.training.ml.catalog import InputKind, fits

# MNIST's pixel statistics: the defaults when a model is built without the training split's.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Standardize(nn.Module):
    """(x - mean) / std with constants (a number, or one per feature) that travel with the
    model."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std!r}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ToImage(nn.Module):
    """Flat rows (N, H*W*C), channels last, to the (N, C, H, W) batches convolutions take."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width, channels = self.shape
        return x.reshape(-1, height, width, channels).permute(0, 3, 1, 2)


class Cnn(nn.Module):
    """conv3x3(32) -> conv3x3(64) -> maxpool 2 -> dropout -> linear 128 -> dropout -> classes.

    At 28x28x1 it is the classic PyTorch MNIST example network (pytorch/examples)."""

    def __init__(self, shape: tuple[int, int, int], classes: int, mean: float, std: float) -> None:
        super().__init__()
        height, width, channels = shape
        self.standardize = Standardize(mean, std)
        self.to_image = ToImage(shape)
        self.conv1 = nn.Conv2d(channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((height - 4) // 2) * ((width - 4) // 2), 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_image(self.standardize(x))
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


class Mlp(nn.Module):
    """features -> 256 -> 128 -> classes with ReLU and dropout."""

    def __init__(
        self,
        features: int,
        classes: int,
        mean: float | Sequence[float],
        std: float | Sequence[float],
    ) -> None:
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.layers = nn.Sequential(
            nn.Linear(features, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(x))


class Torchvision(nn.Module):
    """A torchvision classifier over flat image rows: standardized, reshaped, then the net."""

    def __init__(self, net: nn.Module, shape: tuple[int, int, int], mean: float, std: float):
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.to_image = ToImage(shape)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_image(self.standardize(x)))


def _resnet18(shape: tuple[int, int, int], classes: int) -> nn.Module:
    from torchvision.models import resnet18

    height, width, channels = shape
    net = resnet18(weights=None, num_classes=classes)
    if min(height, width) < 32:  # keep small images' resolution: 3x3 stem, stride 1, no pool
        net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return net


def _mobilenet_v3_small(shape: tuple[int, int, int], classes: int) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    height, width, channels = shape
    net = mobilenet_v3_small(weights=None, num_classes=classes)
    # torchvision builds its batch norms with momentum 0.01, tuned for long ImageNet runs:
    # after a few epochs from random weights their running statistics still describe the
    # first batches, and evaluation (which uses them) answers at chance. Use torch's 0.1.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    first = net.features[0][0]
    stride = 1 if min(height, width) < 32 else 2
    if channels != 3 or stride != 2:
        net.features[0][0] = nn.Conv2d(channels, first.out_channels, 3, stride, 1, bias=False)
    return net


_TORCHVISION = {"resnet18": _resnet18, "mobilenet_v3_small": _mobilenet_v3_small}


class Probabilities(nn.Module):
    """A classifier whose output is softmax probabilities: what is logged and served."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(x), dim=1)


def build_model(
    architecture: str,
    kind: InputKind,
    shape: tuple[int, ...],
    classes: int,
    *,
    mean: float | Sequence[float] = MNIST_MEAN,
    std: float | Sequence[float] = MNIST_STD,
) -> nn.Module:
    """A freshly initialized network for ``kind`` data of one sample's ``shape`` ((height,
    width, channels) or (features,)) and ``classes`` classes. Draws from torch's global RNG:
    seed first. ValueError when the architecture cannot take that data."""
    reason = fits(architecture, kind, shape)
    if reason:
        raise ValueError(reason)
    if architecture == "mlp":
        features = 1
        for d in shape:
            features *= d
        return Mlp(features, classes, mean, std)
    image = (shape[0], shape[1], shape[2])
    pixel_mean, pixel_std = float(mean), float(std)  # type: ignore[arg-type]
    if architecture == "cnn":
        return Cnn(image, classes, pixel_mean, pixel_std)
    return Torchvision(_TORCHVISION[architecture](image, classes), image, pixel_mean, pixel_std)
