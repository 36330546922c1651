"""The networks of the classification example, each adapted to the data set's channels, image size and classes.

``build_network(name, shape, classes, **args)`` builds one of ``NETWORKS``: an MLP, LeNet-5, an
AlexNet-style and a VGG-style network and ResNet-18 for 32 x 32 inputs, written out here (no torchvision).
Where a network's classic layout assumes a larger image (LeNet-5 and AlexNet were drawn for 32 x 32, VGG
and ResNet pool five and three times), padding, the first stride and the pooling follow the image size,
so every network accepts 8 x 8 digits, 28 x 28 MNIST and 32 x 32 CIFAR-10 images; the classifier's input
width is read off a forward pass of a zero image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["NETWORKS", "alexnet", "build_network", "lenet5", "mlp", "resnet18", "vgg"]

Shape = tuple[int, int, int]  # channels, height, width
VGG_STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _flat_features(features: nn.Module, shape: Shape) -> int:
    """The number of features ``features`` makes of one image of ``shape`` (in eval mode, for batch norm)."""
    features.eval()
    with torch.no_grad():
        count = features(torch.zeros(1, *shape)).numel()
    features.train()
    return count


def _pool_if_room(layers: list[nn.Module], size: int) -> int:
    """Append a 2 x 2 max-pool while the feature map is at least 2 pixels wide; returns the new size."""
    if size >= 2:
        layers.append(nn.MaxPool2d(2))
        return size // 2
    return size


def mlp(shape: Shape, classes: int, hidden: Sequence[int] = (512, 512)) -> nn.Module:
    """Flatten, then ``Linear`` + ReLU for each width in ``hidden``, then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = shape[0] * shape[1] * shape[2]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, classes))


def lenet5(shape: Shape, classes: int, batchnorm: bool = False) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: conv 6 (5x5), pool, conv 16 (5x5), pool, 120, 84.

    Inputs smaller than 32 x 32 get padding 2 on the first convolution (MNIST's 28 x 28 then follows the
    classic 28-14-10-5 sizes) and, where the pooled map is below 10 pixels (8 x 8 digits), on the second.
    ``batchnorm`` adds batch norm after every convolution and hidden linear layer (PyTorch-SSO's LeNet5BatchNorm).
    """
    size = min(shape[1:])
    pad1 = 2 if size < 32 else 0
    pad2 = 0 if (size + 2 * pad1 - 4) // 2 >= 10 else 2

    def norm(width: int, dims: int) -> list[nn.Module]:
        return [(nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(width)] if batchnorm else []

    features = nn.Sequential(
        nn.Conv2d(shape[0], 6, 5, padding=pad1), *norm(6, 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad2), *norm(16, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )  # fmt: skip
    width = _flat_features(features, shape)
    return nn.Sequential(
        *features,
        nn.Linear(width, 120), *norm(120, 1), nn.ReLU(),
        nn.Linear(120, 84), *norm(84, 1), nn.ReLU(),
        nn.Linear(84, classes),
    )  # fmt: skip


def alexnet(shape: Shape, classes: int, width: float = 1.0) -> nn.Module:
    """The CIFAR AlexNet of PyTorch-SSO's VOGN runs: conv 64 (11x11), 192 (5x5), 384, 256, 256 (3x3), linear.

    The first convolution's stride (4 on 32 x 32) is chosen so that its output is at least 8 pixels wide
    (stride 3 on 28 x 28, 1 on 8 x 8); the three max-pools are skipped once the map is 1 pixel wide.
    ``width`` multiplies every channel count.
    """
    c1, c2, c3, c4, c5 = (max(1, round(width * c)) for c in (64, 192, 384, 256, 256))
    size = min(shape[1:])
    stride = max(1, size // 8)
    size = (size + 10 - 11) // stride + 1
    layers: list[nn.Module] = [nn.Conv2d(shape[0], c1, 11, stride=stride, padding=5), nn.ReLU()]
    size = _pool_if_room(layers, size)
    layers += [nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU()]
    size = _pool_if_room(layers, size)
    layers += [nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU()]
    _pool_if_room(layers, size)
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(*features, nn.Linear(_flat_features(features, shape), classes))


def vgg(shape: Shape, classes: int, depth: int = 16, width: int = 64, batchnorm: bool = True) -> nn.Module:
    """VGG-``depth`` (Simonyan and Zisserman 2015) as used on CIFAR: five stages of 3x3 convolutions at
    ``width`` x (1, 2, 4, 8, 8) channels, each followed by a 2 x 2 max-pool while the map is at least
    2 pixels wide, then one linear classifier. ``batchnorm`` puts batch norm after every convolution."""
    if depth not in VGG_STAGES:
        raise ValueError(f"depth must be one of {sorted(VGG_STAGES)}, got {depth!r}")
    layers: list[nn.Module] = []
    channels, size = shape[0], min(shape[1:])
    for convs, factor in zip(VGG_STAGES[depth], (1, 2, 4, 8, 8)):
        for _ in range(convs):
            layers.append(nn.Conv2d(channels, width * factor, 3, padding=1))
            layers += [nn.BatchNorm2d(width * factor)] if batchnorm else []
            layers.append(nn.ReLU())
            channels = width * factor
        size = _pool_if_room(layers, size)
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(*features, nn.Linear(_flat_features(features, shape), classes))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 conv + BatchNorm) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 (He et al. 2016) for 32 x 32 inputs (CIFAR-style: 3x3 stem, no max-pool): stages of 2 blocks
    at 64/128/256/512 channels (strides 1/2/2/2), global average pool, linear (11,173,962 parameters for
    3 channels and 10 classes). Smaller images work too: the average pool takes whatever is left."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    channels_in = 64
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels, 1)]
        channels_in = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def _resnet18(shape: Shape, classes: int) -> nn.Module:
    return resnet18(classes, shape[0])


NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg": vgg,
    "resnet18": _resnet18,
}


def build_network(name: str, shape: Shape, classes: int, **args) -> nn.Module:
    """The network ``name`` of ``NETWORKS`` for images of ``shape`` (C, H, W) and ``classes`` classes."""
    if name not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {name!r}")
    return NETWORKS[name](shape, classes, **args)
