"""The shared zoo of small models and data for the test suite (float64, deterministic).

Each case covers one or more module types or graph shapes the engine must handle.
Models with normalisation layers are put in eval mode with non-trivial running
statistics and affine parameters, so per-example references are well defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine, plan_modules
from bayesso.likelihoods import Binary, Classification, Heteroscedastic, Likelihood, Regression


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], torch.Tensor]
    likelihood: Likelihood
    n_outputs: int  # per example (heteroscedastic: 2D for D targets)

    def data(self, batch_size: int = 5, seed: int = 0):
        """(model, x, y) in float64, the model in eval mode, y drawn from the likelihood's support."""
        torch.manual_seed(seed)
        model = self.build().double()
        _randomize_norms(model)
        model.eval()
        gen = torch.Generator().manual_seed(seed + 1)
        x = self.inputs(gen, batch_size)
        if isinstance(self.likelihood, Classification):
            y = torch.randint(0, self.n_outputs, (batch_size,), generator=gen)
        elif isinstance(self.likelihood, Binary):
            y = torch.randint(0, 2, (batch_size,), generator=gen).double()
        elif isinstance(self.likelihood, Heteroscedastic):
            y = torch.randn(batch_size, self.n_outputs // 2, generator=gen, dtype=torch.float64)
        else:
            y = torch.randn(batch_size, self.n_outputs, generator=gen, dtype=torch.float64)
        return model, x, y

    def __repr__(self) -> str:
        return self.name


def _randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _normal(*shape):
    return lambda gen, b: torch.randn(b, *shape, generator=gen, dtype=torch.float64)


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


class Residual(nn.Module):
    """x + fc2(relu_(fc1(x))) with in-place ReLU and dropout (eval) inside."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Dropout(0.5)

    def forward(self, x):
        return x + self.fc2(self.drop(F.relu(self.fc1(x), inplace=True)))


class SharedTwice(nn.Module):
    """The same Linear called twice in one forward (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.out(torch.tanh(self.shared(h)))


class ScaleShift(nn.Module):
    """A custom module with raw parameters: no rule, so the generic fallback handles it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, dim))

    def forward(self, x):
        return x * self.scale + self.shift


class Functional(nn.Module):
    """Uses a Linear's weight through F.linear (never calling it), a custom module and PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.custom, self.act, self.head = nn.Linear(3, 4), ScaleShift(4), nn.PReLU(), nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        h = self.act(self.custom(F.linear(x, self.fc.weight, self.fc.bias)))
        return self.head(torch.flatten(h, 1)) * self.temperature


class Tied(nn.Module):
    """Embedding and output layer sharing one weight matrix (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.decode = nn.Linear(3, 5)
        self.decode.weight = self.embed.weight

    def forward(self, idx):
        return self.decode(torch.tanh(self.embed(idx).mean(dim=1)))


CASES = [
    Case("mlp", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), _normal(5), Classification(), 3),
    Case(
        "mlp_regression",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
        _normal(3),
        Regression(sigma=0.7),
        2,
    ),
    Case("mlp_binary", lambda: nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1)), _normal(3), Binary(), 1),
    Case(
        "mlp_heteroscedastic",
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)),
        _normal(3),
        Heteroscedastic(),
        4,
    ),
    Case(
        "linear_sequence",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), MeanOverPositions(), nn.Linear(5, 3)),
        _normal(3, 4),
        Classification(),
        3,
    ),
    Case(
        "conv1d",
        lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)),
        _normal(2, 6),
        Classification(),
        3,
    ),
    Case(
        "conv2d",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 2, groups=2, dilation=2, padding="same"),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        _normal(2, 5, 5),
        Classification(),
        3,
    ),
    Case(
        "batchnorm",
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(12, 4),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Linear(4, 2),
        ),
        _normal(1, 4, 4),
        Regression(sigma=1.3),
        2,
    ),
    Case(
        "layernorm_groupnorm",
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 2),
            nn.GroupNorm(2, 4),
            nn.Flatten(),
            nn.Linear(12, 6),
            nn.LayerNorm(6),
            nn.GELU(),
            nn.Linear(6, 3),
        ),
        _normal(2, 4),
        Classification(),
        3,
    ),
    Case(
        "embedding",
        lambda: nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.LayerNorm(3), MeanOverPositions(), nn.Linear(3, 3)),
        lambda gen, b: torch.randint(0, 6, (b, 4), generator=gen),
        Classification(),
        3,
    ),
    Case(
        "residual",
        lambda: nn.Sequential(nn.Linear(3, 4), Residual(4), nn.ReLU(inplace=True), nn.Linear(4, 2)),
        _normal(3),
        Classification(),
        2,
    ),
    Case("shared", SharedTwice, _normal(3), Classification(), 3),
    Case("functional", Functional, _normal(3), Classification(), 3),
    Case("tied", Tied, lambda gen, b: torch.randint(0, 5, (b, 3), generator=gen), Classification(), 5),
]

CASES_BY_NAME = {case.name: case for case in CASES}


def mixed_structures(model: nn.Module, cycle: tuple[str, ...] = ("full", "kron", "diag")) -> dict[str, str]:
    """A per-module structure mapping by module name: the blocks take the structures of ``cycle`` in turn."""
    return {plan.name: cycle[i % len(cycle)] for i, plan in enumerate(plan_modules(model))}


def fitted_bayesian_model(structure: str = "kron", name: str = "mlp"):
    """A BayesianModel on a zoo case whose statistic is the per-example GGN of a batch of 8 ("mixed": the
    structures of ``mixed_structures`` per module)."""
    case = CASES_BY_NAME[name]
    module, x, y = case.data(batch_size=8)
    if structure == "mixed":
        structure = mixed_structures(module)
    model = BayesianModel(module, case.likelihood, posterior=structure, prior_precision=3.0, dataset_size=50)
    curvature = CurvatureEngine(module, case.likelihood, "ggn", model.posterior.curvature_structure).compute(x, y)
    model.posterior.update_statistic(curvature * (1 / 8))
    return model, x, y
