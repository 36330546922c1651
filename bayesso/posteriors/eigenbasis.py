"""``Eigenbasis``: one posterior block's statistic S = Q diag(s) Qᵀ, as the posterior uses it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Eigenbasis"]


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

    def dense(self, weights: Tensor) -> Tensor:
        """Q diag(weights) Qᵀ, shape (numel, numel)."""
        eye = torch.eye(weights.numel(), dtype=weights.dtype, device=weights.device)
        basis = self.from_eigenbasis(eye)  # row k is Q e_k, the k-th eigenvector
        return basis.T @ (weights.unsqueeze(1) * basis)
