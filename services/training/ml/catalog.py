"""What can be trained: dataset, architecture and optimizer names, and each dataset's classes.

Torch-free on purpose: the gRPC service imports this to validate submissions, and must stay
light. ``models.MODELS`` holds the architectures themselves; a unit test keeps the two equal.
"""

from __future__ import annotations

DATASETS = ("mnist", "fashion_mnist")
ARCHITECTURES = ("cnn", "mlp")
OPTIMIZERS = ("adam", "adamw", "sgd")

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10

# Label -> class name, per dataset; index i names label i.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(digit) for digit in range(NUM_CLASSES)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}
