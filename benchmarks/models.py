"""The models every benchmark uses, sized for 8x8 digit images (1 x 8 x 8 inputs, 10 classes).

``MODELS`` are the digits models most benchmarks loop over; ``STEP_TIME_MODELS`` adds a 26k-parameter
MLP and a ResNet-18 on 3 x 32 x 32 inputs, with each model's input shape in ``INPUT_SHAPES``.
"""

from resnet import resnet18
from torch import nn


def mlp() -> nn.Module:
    """MLP 64-512-512-10 on flattened images."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def mlp26k() -> nn.Module:
    """MLP 64-128-128-10 on flattened images (26,122 parameters)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn() -> nn.Module:
    """Small CNN: conv 16, pool, conv 32, pool, linear (6,090 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )  # fmt: skip


def wide_cnn() -> nn.Module:
    """Wider CNN: conv 64, conv 64, pool, conv 128, pool, linear (116,554 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 2 * 2, 10),
    )  # fmt: skip


MODELS = {"mlp": mlp, "cnn": cnn, "wide_cnn": wide_cnn}
STEP_TIME_MODELS = {"mlp26k": mlp26k, **MODELS, "resnet18": resnet18}
INPUT_SHAPES = {**{name: (1, 8, 8) for name in STEP_TIME_MODELS}, "resnet18": (3, 32, 32)}
