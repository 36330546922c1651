"""The data sets: scikit-learn's bundled digits always; MNIST, Fashion-MNIST and CIFAR-10 from files on disk.

``digits`` is ``bayesso.data.load_digits`` (1,797 images of 8 x 8 pixels, standardised, split 70/30 by
class with seed 0 whatever the run's seed, so every run is scored on the same 540 test images).
The other three are read by torchvision, which is imported only for them, from the folder
``--data-dir`` in torchvision's layout (``FILES``), with ``download=False``: nothing is ever downloaded.
Without torchvision or without the files, ``load_data`` raises ``DataUnavailableError`` saying what to
install or where to put which files. Images are normalised per channel with the training set's usual
mean and standard deviation; ``augment`` adds random crops (padding 4 on CIFAR-10, 2 on the 28 x 28
sets) and, on CIFAR-10, horizontal flips.

The out-of-distribution inputs of the report are Gaussian noise images, N(0, 1) per pixel in the
normalised input space (``noise_images``): the same for every data set, and needing no second data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from config import DATA_SETS
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from bayesso.data import load_digits

__all__ = ["CLASSES", "FILES", "SHAPES", "DataSource", "DataUnavailableError", "load_data", "noise_images"]

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
CLASSES = dict.fromkeys(DATA_SETS, 10)
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FILES = {  # the files torchvision's dataset classes read, relative to --data-dir
    "mnist": tuple(f"MNIST/raw/{name}" for name in MNIST_FILES),
    "fashion_mnist": tuple(f"FashionMNIST/raw/{name}" for name in MNIST_FILES),
    "cifar10": tuple(f"cifar-10-batches-py/{name}" for name in (*CIFAR_BATCHES, "test_batch", "batches.meta")),
}
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DataUnavailableError(RuntimeError):
    """A data set that cannot be read here: torchvision is missing, or its files are not on disk."""


@dataclass
class DataSource:
    """A data set's training and test examples ((image, label) pairs), image shape (C, H, W) and class count."""

    name: str
    train: Dataset
    test: Dataset
    shape: tuple[int, int, int]
    classes: int


def load_data(name: str, data_dir: str | Path, augment: bool = False) -> DataSource:
    """The data set ``name`` of ``DATA_SETS``; torchvision's from the files under ``data_dir`` (never downloaded)."""
    if name not in DATA_SETS:
        raise ValueError(f"data set must be one of {', '.join(DATA_SETS)}, got {name!r}")
    if name == "digits":
        split = load_digits(test_fraction=0.3, seed=0)
        train, test = TensorDataset(split.x_train, split.y_train), TensorDataset(split.x_test, split.y_test)
        return DataSource(name, train, test, SHAPES[name], CLASSES[name])
    root = Path(data_dir)
    missing = [path for path in FILES[name] if not (root / path).is_file()]
    if missing:
        raise DataUnavailableError(
            f"data set {name!r}: {len(missing)} of its files are not under --data-dir {root} "
            f"(first: {root / missing[0]}). "
            f"Put the files of torchvision's {TORCHVISION_CLASSES[name]} there, in the layout download=True would "
            f"create ({', '.join(FILES[name])}); this script never downloads"
        )
    torchvision, transforms = _import_torchvision(name)
    mean, std = NORMALISATION[name]
    normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    augmentation = []
    if augment:
        size = SHAPES[name][1]
        augmentation = [transforms.RandomCrop(size, padding=4 if name == "cifar10" else 2)]
        augmentation += [transforms.RandomHorizontalFlip()] if name == "cifar10" else []
    cls = getattr(torchvision.datasets, TORCHVISION_CLASSES[name])
    try:
        train = cls(str(root), train=True, download=False, transform=transforms.Compose(augmentation + normalise))
        test = cls(str(root), train=False, download=False, transform=transforms.Compose(normalise))
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted" (CIFAR-10 checks the files' MD5)
        message = f"data set {name!r}: torchvision cannot read the files under {root}: {error}"
        raise DataUnavailableError(message) from error
    return DataSource(name, train, test, SHAPES[name], CLASSES[name])


def _import_torchvision(name: str):
    """torchvision and its transforms, imported here only; ``DataUnavailableError`` saying what to install otherwise."""
    try:
        import torchvision
        from torchvision import transforms
    except Exception as error:  # a torchvision built for another torch fails at import with RuntimeError
        raise DataUnavailableError(
            f"data set {name!r} is read through torchvision, which cannot be imported here ({error}): install the "
            f"torchvision build that matches torch {torch.__version__} (pip install torchvision); digits needs nothing"
        ) from error
    return torchvision, transforms


def noise_images(shape: tuple[int, int, int], count: int, seed: int) -> Tensor:
    """``count`` out-of-distribution images: N(0, 1) noise per pixel, the scale of the normalised inputs."""
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
