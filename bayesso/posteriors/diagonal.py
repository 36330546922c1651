"""``DiagonalGaussian``: mean-field posterior, precision (N/τ)(s + λ) per parameter."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Independent, Normal

from bayesso.curvature import Block
from bayesso.posteriors.base import Posterior
from bayesso.posteriors.distributions import NormalBlock
from bayesso.posteriors.eigenbasis import Eigenbasis

__all__ = ["DiagonalBasis", "DiagonalGaussian"]


class DiagonalBasis(Eigenbasis):
    """A diagonal statistic is its own eigendecomposition (Q = I); negative entries count as zero.

    ``statistic`` is kept as given (no copy: statistics are replaced, never modified in place),
    so that building the basis costs nothing; the eigenvalues clamp it when they are used.
    """

    is_identity = True

    def __init__(self, values: Tensor) -> None:
        self.statistic = values

    @property
    def values(self) -> Tensor:
        """The eigenvalues of S, max(s, 0) (P_m,)."""
        return self.statistic.clamp_min(0)

    def eigenvalues(self, damping: Tensor) -> Tensor:
        return self.statistic.clamp_min(0) + damping

    def to_eigenbasis(self, v: Tensor) -> Tensor:
        return v

    def from_eigenbasis(self, z: Tensor) -> Tensor:
        return z

    def diagonal(self, weights: Tensor) -> Tensor:
        return weights

    def dense(self, weights: Tensor) -> Tensor:
        return torch.diag(weights)

    def distribution(self, loc: Tensor, variances: Tensor) -> NormalBlock:
        return NormalBlock(Independent(Normal(loc, variances.sqrt()), 1))


class DiagonalGaussian(Posterior):
    """Diagonal Gaussian (VOGN, noisy Adam, IVON, diagonal Laplace); see ``Posterior`` for the arguments."""

    structure = "diag"

    def _eigenbasis(self, block: Block) -> Eigenbasis:
        return DiagonalBasis(block.diagonal())
