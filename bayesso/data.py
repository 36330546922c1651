"""Bundled data: scikit-learn's 8x8 digits (real images, no download), OOD splits, loaders.

``load_digits`` needs the ``data`` extra (scikit-learn). Loaders for MNIST and
CIFAR-10 through torchvision are offered for users; torchvision is imported only
when they are called, and nothing in bayesso's tests or demo needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Split", "load_digits", "make_loader", "torchvision_dataset"]


@dataclass
class Split:
    """Train and test tensors; ``x_ood`` holds out-of-distribution test images when requested."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_ood: Tensor | None = None
    y_ood: Tensor | None = None

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits(
    test_fraction: float = 0.3,
    in_classes: Sequence[int] | None = None,
    flatten: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """scikit-learn's digits (1,797 images of 8x8 pixels, 10 classes) as tensors.

    Images are (N, 1, 8, 8) (or (N, 64) with ``flatten``), scaled to [0, 1] and
    standardised with the training split's mean and standard deviation. With
    ``in_classes`` (e.g. range(5)) only those classes are used for training and
    testing (relabelled 0..k-1 in sorted order) and the others form ``x_ood``.
    The split is stratified by class, and every split (train, test, OOD) is shuffled, so any
    slice of it mixes the classes; both are fixed by ``seed`` (docs/conventions.md §6).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("bayesso.data.load_digits needs scikit-learn: pip install 'bayesso[data]'") from error
    raw = sklearn_digits()
    images = torch.as_tensor(raw.images, dtype=dtype).unsqueeze(1) / 16.0
    labels = torch.as_tensor(raw.target, dtype=torch.long)
    classes = sorted(set(range(10)) if in_classes is None else {int(c) for c in in_classes})
    if not classes or not set(classes) <= set(range(10)):
        raise ValueError(f"in_classes must be a non-empty subset of 0..9, got {in_classes!r}")
    inside = torch.isin(labels, torch.tensor(classes))
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in classes:
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = max(1, round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=gen)]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=gen)]  # else ordered by class
    ood_idx = torch.nonzero(~inside).squeeze(1)
    ood_idx = ood_idx[torch.randperm(len(ood_idx), generator=gen)]
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    mean, std = images[train_idx].mean(), images[train_idx].std()

    def prepare(x: Tensor) -> Tensor:
        x = (x - mean) / std
        return x.flatten(1) if flatten else x

    split = Split(
        prepare(images[train_idx]), relabel[labels[train_idx]], prepare(images[test_idx]), relabel[labels[test_idx]]
    )
    if in_classes is not None:
        split.x_ood, split.y_ood = prepare(images[ood_idx]), labels[ood_idx]
    return split


def make_loader(
    x: Tensor, y: Tensor, batch_size: int = 64, shuffle: bool = True, seed: int | None = 0, drop_last: bool = False
) -> DataLoader:
    """A ``DataLoader`` over tensors; shuffling is reproducible with ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
    )


def torchvision_dataset(name: str, root: str, train: bool = True, download: bool = False):
    """MNIST or CIFAR-10 as a torchvision ``Dataset`` of per-channel normalised tensors (imported lazily)."""
    if name not in ("mnist", "cifar10"):
        raise ValueError(f"name must be 'mnist' or 'cifar10', got {name!r}")
    try:
        import torchvision
        from torchvision import transforms
    except Exception as error:  # a torchvision that does not match torch fails at import with RuntimeError
        raise ImportError(f"loading {name} needs a torchvision that matches your torch build: {error}") from error
    stats = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*stats[name])])
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    return cls(root, train=train, download=download, transform=transform)
