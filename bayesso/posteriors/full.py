"""``FullGaussian``: a dense precision block per module (no covariance across modules)."""

from __future__ import annotations

import torch
from torch import Tensor

from bayesso.curvature import Block, ModulePlan
from bayesso.posteriors.base import Posterior
from bayesso.posteriors.eigenbasis import Eigenbasis, symmetric_eigh

__all__ = ["DenseBasis", "FullGaussian", "check_dense_sizes"]


def check_dense_sizes(posterior: Posterior, plans: list[ModulePlan], dtype: torch.dtype) -> None:
    """Refuse a dense block of ``plans`` above ``posterior.max_dense_bytes`` in ``dtype`` (before allocating)."""
    itemsize = torch.finfo(dtype).bits // 8
    for plan in plans:
        size = plan.numel**2 * itemsize
        if size > posterior.max_dense_bytes:
            raise ValueError(
                f"{type(posterior).__name__} needs a {plan.numel:,} x {plan.numel:,} block for module {plan.label()}: "
                f"{size / 2**30:.2f} GiB in {dtype}, above max_dense_bytes={posterior.max_dense_bytes / 2**30:.2f} "
                "GiB. Use KroneckerGaussian or DiagonalGaussian (or 'kron'/'diag' for that module), restrict "
                "modules=..., or raise max_dense_bytes."
            )


class DenseBasis(Eigenbasis):
    """S = Q diag(s) Qᵀ by ``torch.linalg.eigh`` (negative eigenvalues clamped to 0); ``eigh``: that
    decomposition when computed elsewhere (another rank)."""

    def __init__(self, matrix: Tensor, eigh: tuple[Tensor, Tensor] | None = None) -> None:
        values, self.Q = eigh or symmetric_eigh(matrix)
        self.values = values.clamp_min(0)

    def eigenvalues(self, damping: Tensor) -> Tensor:
        return self.values + damping

    def to_eigenbasis(self, v: Tensor) -> Tensor:
        return v @ self.Q

    def from_eigenbasis(self, z: Tensor) -> Tensor:
        return z @ self.Q.T

    def diagonal(self, weights: Tensor) -> Tensor:
        return self.Q.square() @ weights

    def dense(self, weights: Tensor) -> Tensor:
        return (self.Q * weights) @ self.Q.T


class FullGaussian(Posterior):
    """Dense Gaussian block per module: exact for one-layer models and last-layer posteriors.

    Args: as ``Posterior``, plus ``max_dense_bytes`` (refuse blocks larger than this, 1 GiB).

    A P-block's eigendecomposition costs O(P³) (about 1 s for P = 2,080 on one CPU thread) against
    the O(B P²) statistic update, so ``VIOptimizer`` refreshes it every ``default_inv_interval`` = 10
    steps, K-FAC's convention: the statistic's EMA stays exact every step, sampling and solves use the
    last decomposition in between (``inv_interval=1`` decomposes every step, as before).
    """

    structure = "full"
    default_inv_interval = 10

    def __init__(self, module, *, max_dense_bytes: int = 2**30, **kwargs) -> None:
        self.max_dense_bytes = max_dense_bytes
        super().__init__(module, **kwargs)

    def _check_plans(self, dtype: torch.dtype) -> None:
        check_dense_sizes(self, self.plans, dtype)

    def _factors(self, block: Block) -> list[Tensor]:
        return [block.to_dense()]

    def _eigenbasis(self, block: Block, eighs: list[tuple[Tensor, Tensor]] | None = None) -> Eigenbasis:
        return DenseBasis(block.to_dense(), eighs[0] if eighs else None)
