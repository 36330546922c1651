"""The tasks of ``benchmarks/suite.py``: bundled and generated data only, each with its model and shifts.

Classification tasks carry out-of-distribution inputs (held-out classes or another kind of
signal) and shifted test sets (three severities per kind of shift); regression tasks carry
a second test set where the uncertainty matters most (the gap between two input clusters).
Every split is fixed by the seed; features (and regression targets) are standardised with
the training split's statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayesso.data import load_digits
from bayesso.demo import small_cnn

__all__ = ["TASKS", "Task"]

SEVERITIES = (1, 2, 3)


@dataclass
class Task:
    """One benchmark task: data, the network to fit and how long to train it."""

    name: str
    likelihood: str
    build: Callable[[], nn.Module]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    epochs: int
    batch_size: int
    x_ood: Tensor | None = None
    shifts: dict[str, Tensor] = field(default_factory=dict)  # "kind severity" -> shifted x_test
    extra_tests: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # regression: name -> (x, y)
    build_heteroscedastic: Callable[[], nn.Module] | None = None  # regression: the network with 2 outputs

    @property
    def classification(self) -> bool:
        return self.likelihood in ("classification", "binary")


def _split(x: Tensor, y: Tensor, seed: int, test: float = 0.25, val: float = 0.15) -> tuple[Tensor, ...]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(test * len(y)), round(val * len(y))
    parts = order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
    return tuple(t for idx in parts for t in (x[idx], y[idx]))


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return [(t - mean) / std for t in (train, *others)]


def _mlp(n_in: int, n_out: int, width: int = 64, depth: int = 2) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers, width_in = [], n_in
        for _ in range(depth):
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            width_in = width
        return nn.Sequential(*layers, nn.Linear(width_in, n_out))

    return build


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = 2
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    if x.ndim == 4:
        x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv1d(x, kernel.view(1, 1, -1), padding=radius)


def _translate(x: Tensor, pixels: int) -> Tensor:
    """Shift right (and down, for images) by ``pixels``, filling with the background (the minimum)."""
    out = torch.full_like(x, float(x.min()))
    if x.ndim == 4:
        out[..., pixels:, pixels:] = x[..., :-pixels, :-pixels]
    else:
        out[..., pixels:] = x[..., :-pixels]
    return out


def _image_shifts(x: Tensor, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed + 100)
    shifts = {}
    for severity in SEVERITIES:
        shifts[f"noise {severity}"] = x + 0.5 * severity * torch.randn(x.shape, generator=gen)
        shifts[f"blur {severity}"] = _blur(x, 0.5 * severity)
        shifts[f"translation {severity}"] = _translate(x, severity)
    return shifts


def _tabular_shifts(x: Tensor, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed + 100)
    return {f"noise {s}": x + 0.5 * s * torch.randn(x.shape, generator=gen) for s in SEVERITIES}


def digits(seed: int, flatten: bool) -> Task:
    data = load_digits(test_fraction=0.3, in_classes=range(5), flatten=flatten, seed=seed)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    n_val = round(0.15 * len(order))
    x_test = data.x_test
    images = x_test if not flatten else x_test.view(-1, 1, 8, 8)
    shifts = {k: (v.flatten(1) if flatten else v) for k, v in _image_shifts(images, seed).items()}
    build = _mlp(64, 5, 128) if flatten else (lambda: small_cnn(5, 16))
    return Task(
        "digits MLP" if flatten else "digits CNN", "classification", build,
        data.x_train[order[n_val:]], data.y_train[order[n_val:]], data.x_train[order[:n_val]],
        data.y_train[order[:n_val]], x_test, data.y_test, epochs=40, batch_size=64, x_ood=data.x_ood, shifts=shifts,
    )  # fmt: skip


def _waves(n: int, frequencies: Tensor, gen: torch.Generator, length: int = 32) -> tuple[Tensor, Tensor]:
    """Class k: a wave of frequency ``frequencies[k // 2]``, sine (even k) or square (odd k), random phase, noise."""
    y = torch.randint(0, 2 * len(frequencies), (n,), generator=gen)
    t = torch.arange(length, dtype=torch.float32) / length
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    amplitude = 0.8 + 0.4 * torch.rand(n, 1, generator=gen)
    wave = torch.sin(2 * math.pi * frequencies[y // 2].unsqueeze(1) * t + phase)
    wave = torch.where((y % 2 == 1).unsqueeze(1), torch.sign(wave), wave)
    x = amplitude * wave + 0.6 * torch.randn(n, length, generator=gen)
    return x.unsqueeze(1), y


def signals(seed: int) -> Task:
    """Generated 1-D signals, 10 classes, 12,000 training examples; OOD: waves of unseen frequencies."""
    gen = torch.Generator().manual_seed(seed)
    frequencies = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0])
    x, y = _waves(16000, frequencies, gen)
    x_train, y_train, x_val, y_val, x_test, y_test = _split(x, y, seed, test=0.15, val=0.1)
    x_ood, _ = _waves(2000, torch.tensor([4.0, 6.0, 10.0, 12.0, 14.0]), gen)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Flatten(), nn.Linear(32 * 8, 10),
        )  # fmt: skip

    return Task("signals 1-D CNN", "classification", build, x_train, y_train, x_val, y_val, x_test, y_test,
                epochs=8, batch_size=128, x_ood=x_ood, shifts=_image_shifts(x_test, seed))  # fmt: skip


def _sklearn(name: str, seed: int, likelihood: str, epochs: int, batch_size: int) -> Task:
    import sklearn.datasets

    raw = getattr(sklearn.datasets, f"load_{name}")()
    x = torch.as_tensor(raw.data, dtype=torch.float32)
    y = torch.as_tensor(raw.target)
    y = y.float().unsqueeze(1) if likelihood == "regression" else y.long()
    x_train, y_train, x_val, y_val, x_test, y_test = _split(x, y, seed)
    x_train, x_val, x_test = _standardise(x_train, x_val, x_test)
    if likelihood == "regression":
        y_train, y_val, y_test = _standardise(y_train, y_val, y_test)
    if likelihood == "binary":
        y_train, y_val, y_test = y_train.float(), y_val.float(), y_test.float()
    n_out = 1 if likelihood != "classification" else int(y.max()) + 1
    shifts = _tabular_shifts(x_test, seed) if likelihood != "regression" else {}
    two = _mlp(x.shape[1], 2) if likelihood == "regression" else None
    return Task(f"{name} (tabular)", likelihood, _mlp(x.shape[1], n_out), x_train, y_train, x_val, y_val, x_test,
                y_test, epochs=epochs, batch_size=batch_size, shifts=shifts, build_heteroscedastic=two)  # fmt: skip


def heteroscedastic(seed: int) -> Task:
    """y = sin(3x) + (0.05 + 0.3|x|) ε on x ~ U(-2, 2), 3,000 examples."""
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(3000, 1, generator=gen) - 2
    y = torch.sin(3 * x) + (0.05 + 0.3 * x.abs()) * torch.randn(3000, 1, generator=gen)
    parts = _split(x, y, seed)
    return Task("heteroscedastic 1-D", "regression", _mlp(1, 1), *parts, epochs=60, batch_size=64,
                build_heteroscedastic=_mlp(1, 2))  # fmt: skip


def gap(seed: int) -> Task:
    """y = x³/5 + 0.1 ε with training inputs in [-3, -1] ∪ [1, 3]; a second test set inside the gap."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([-3 + 2 * torch.rand(400, 1, generator=gen), 1 + 2 * torch.rand(400, 1, generator=gen)])
    y = x**3 / 5 + 0.1 * torch.randn(800, 1, generator=gen)
    task = Task("gap 1-D", "regression", _mlp(1, 1), *_split(x, y, seed), epochs=100, batch_size=32,
                build_heteroscedastic=_mlp(1, 2))  # fmt: skip
    x_gap = 2 * torch.rand(200, 1, generator=gen) - 1
    task.extra_tests["in the gap"] = (x_gap, x_gap**3 / 5 + 0.1 * torch.randn(200, 1, generator=gen))
    return task


TASKS: dict[str, Callable[[int], Task]] = {
    "digits_cnn": lambda seed: digits(seed, flatten=False),
    "digits_mlp": lambda seed: digits(seed, flatten=True),
    "signals": signals,
    "breast_cancer": lambda seed: _sklearn("breast_cancer", seed, "binary", epochs=60, batch_size=32),
    "wine": lambda seed: _sklearn("wine", seed, "classification", epochs=150, batch_size=16),
    "diabetes": lambda seed: _sklearn("diabetes", seed, "regression", epochs=100, batch_size=32),
    "heteroscedastic": heteroscedastic,
    "gap": gap,
}
