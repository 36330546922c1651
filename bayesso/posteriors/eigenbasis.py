"""``Eigenbasis``: one posterior block's statistic S = Q diag(s) Qᵀ, as the posterior uses it."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from bayesso.placement import converted
from bayesso.posteriors.distributions import NormalBlock

__all__ = ["Eigenbasis", "symmetric_eigh"]

JITTERS = (0.0, 1e-12, 1e-9, 1e-6)  # relative to the mean absolute diagonal, tried in float64


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues, eigenvectors) of symmetric ``matrix`` (..., n, n), in its dtype, both contiguous.

    ``torch.linalg.eigh`` in float32 fails to converge on some rank-deficient matrices (a
    one-example statistic); such input is decomposed in float64, and if that fails too, with
    a growing diagonal jitter whose shift is taken off the eigenvalues again. Non-finite input
    is a ``FloatingPointError``; nothing is retried for it. The eigenvectors are made row-major (LAPACK's are
    column-major), the layout they have after a broadcast, so that products with them round alike on every rank
    whichever rank decomposed them.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(f"cannot decompose a {tuple(matrix.shape)} statistic with NaN or infinite entries")
    try:
        values, vectors = torch.linalg.eigh(matrix)
        return values, vectors.contiguous()
    except torch.linalg.LinAlgError:
        pass
    wide = matrix.double()
    eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
    scale = wide.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).clamp_min(1e-300).unsqueeze(-1)
    error = None
    for jitter in JITTERS:
        try:
            values, vectors = torch.linalg.eigh(wide + jitter * scale * eye)
        except torch.linalg.LinAlgError as failure:
            error = failure
            continue
        values = values - jitter * scale.squeeze(-1)
        return values.to(matrix.dtype), vectors.to(matrix.dtype).contiguous()
    raise torch.linalg.LinAlgError(
        f"could not decompose a {tuple(matrix.shape)} statistic, even in float64 with a relative jitter of "
        f"{JITTERS[-1]}: {error}"
    )


class Eigenbasis(ABC):
    """The eigenbasis of one block's statistic; vectors are the block's flat slice (..., numel)."""

    is_identity = False  # Q = I: the flat fast path applies

    @abstractmethod
    def eigenvalues(self, damping: Tensor) -> Tensor:
        """Eigenvalues of S + damping (per-example scale), in eigenbasis order."""

    @abstractmethod
    def to_eigenbasis(self, v: Tensor) -> Tensor:
        """Qᵀ v for v of shape (..., numel)."""

    @abstractmethod
    def from_eigenbasis(self, z: Tensor) -> Tensor:
        """Q z for z of shape (..., numel)."""

    @abstractmethod
    def diagonal(self, weights: Tensor) -> Tensor:
        """diag(Q diag(weights) Qᵀ), shape (numel,)."""

    def solve(self, v: Tensor, damping: Tensor, eigenvalues: Tensor) -> Tensor:
        """(S + damping)⁻¹ v for v (..., numel), given ``eigenvalues(damping)``: Q [(Qᵀ v) / e].

        A subclass may solve faster without the eigenvalues.
        """
        return self.from_eigenbasis(self.to_eigenbasis(v) / eigenvalues)

    def to(self, device: torch.device, dtype: torch.dtype) -> Eigenbasis:
        """A copy with every tensor on ``device`` in ``dtype`` (converted, not recomputed; ``self`` is kept)."""
        moved = copy.copy(self)
        vars(moved).update(converted(vars(self), device, dtype))
        return moved

    def distribution(self, loc: Tensor, variances: Tensor) -> NormalBlock:
        """N(loc, Q diag(variances) Qᵀ) over the block's slice (numel,): a dense ``MultivariateNormal`` here."""
        return NormalBlock(MultivariateNormal(loc, covariance_matrix=self.dense(variances)))

    def dense(self, weights: Tensor) -> Tensor:
        """Q diag(weights) Qᵀ, shape (numel, numel)."""
        eye = torch.eye(weights.numel(), dtype=weights.dtype, device=weights.device)
        basis = self.from_eigenbasis(eye)  # row k is Q e_k, the k-th eigenvector
        return basis.T @ (weights.unsqueeze(1) * basis)
