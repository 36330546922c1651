"""``KroneckerGaussian``: K-FAC blocks (matrix-normal) where a rule exists, diagonal elsewhere.

For an affine module with statistic G ⊗ A (A over the inputs with a 1 appended for
the bias, G over the outputs, per group), eigendecompositions A = Q_A diag(a) Q_Aᵀ
and G = Q_G diag(g) Q_Gᵀ give every operation in matrix form, e.g. the solve
(G ⊗ A + λ)⁻¹ vec(V) = vec(Q_G [(Q_Gᵀ V Q_A) / (g aᵀ + λ)] Q_Aᵀ). Damping:

- "exact": eigenvalues g_o a_i + λ (precision = (N/τ)(G ⊗ A + λ I), as Laplace needs);
- "factored": (g_o + sqrt(λ)/π)(a_i + π sqrt(λ)) with π = sqrt((tr A / dim A)/(tr G / dim G)),
  the Tikhonov split of noisy K-FAC, unchanged when A -> cA and G -> G/c.

Sampling W = M + Q_G [E / sqrt((N/τ) e)] Q_Aᵀ is the matrix-normal sample
M + sqrt(τ/N) L_G E L_Aᵀ with L_G L_Gᵀ = G_γ⁻¹ and L_A L_Aᵀ = A_γ⁻¹ (factored damping).
Modules without a K-FAC rule (norms, embeddings, fallback) get diagonal blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Independent

from bayesso.curvature import AffineLayout, Block, KronBlock
from bayesso.posteriors.base import Posterior
from bayesso.posteriors.diagonal import DiagonalBasis
from bayesso.posteriors.distributions import KroneckerNormal, NormalBlock
from bayesso.posteriors.eigenbasis import Eigenbasis, symmetric_eigh

__all__ = ["KroneckerBasis", "KroneckerGaussian"]

KFAC_DAMPING = ("exact", "factored")
FACTOR_FLOOR = 1e-6  # per damped factor eigenvalue, so that their products stay above the posterior's 1e-12


class KroneckerBasis(Eigenbasis):
    """Eigenbasis Q_G ⊗ Q_A of a K-FAC block; eigenvalue order is (group, out, in).

    ``eighs``: ``symmetric_eigh`` of (A, G) when computed elsewhere (another rank), else computed here.
    """

    def __init__(self, block: KronBlock, damping_mode: str, eighs: list[tuple[Tensor, Tensor]] | None = None) -> None:
        self.layout: AffineLayout = block.layout
        self.mode = damping_mode
        (self.a, self.QA), (self.g, self.QG) = eighs or (symmetric_eigh(block.A), symmetric_eigh(block.G))
        self.a, self.g = self.a.clamp_min(0), self.g.clamp_min(0)
        trace_a = block.A.diagonal(dim1=1, dim2=2).mean(dim=1)
        trace_g = block.G.diagonal(dim1=1, dim2=2).mean(dim=1)
        ratio = trace_a / trace_g
        self.pi = torch.where((trace_a > 0) & (trace_g > 0), ratio, torch.ones_like(ratio)).sqrt()
        self._inverses: tuple[float, Tensor, Tensor] | None = None

    def eigenvalues(self, damping: Tensor) -> Tensor:
        if self.mode == "exact":
            values = self.g.unsqueeze(2) * self.a.unsqueeze(1) + damping
        else:
            root, pi = damping.sqrt(), self.pi.unsqueeze(1)
            values = (self.g + root / pi).unsqueeze(2) * (self.a + root * pi).unsqueeze(1)
        return values.reshape(-1)

    def _matrix(self, v: Tensor) -> Tensor:
        """(..., numel) -> (..., groups, out, d_in) with the bias as the last input column."""
        lay = self.layout
        lead, parts, offset = v.shape[:-1], [], 0
        if lay.has_weight:
            size = lay.groups * lay.out_features * lay.in_features
            parts.append(v[..., :size].reshape(*lead, lay.groups, lay.out_features, lay.in_features))
            offset = size
        if lay.has_bias:
            parts.append(v[..., offset:].reshape(*lead, lay.groups, lay.out_features, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _flat(self, m: Tensor) -> Tensor:
        """Inverse of ``_matrix``."""
        lay, lead = self.layout, m.shape[:-3]
        parts = [m[..., : lay.in_features].reshape(*lead, -1)] if lay.has_weight else []
        if lay.has_bias:
            parts.append(m[..., -1].reshape(*lead, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def to_eigenbasis(self, v: Tensor) -> Tensor:
        z = self.QG.transpose(-1, -2) @ self._matrix(v) @ self.QA
        return z.reshape(*v.shape[:-1], -1)

    def from_eigenbasis(self, z: Tensor) -> Tensor:
        lay = self.layout
        m = z.reshape(*z.shape[:-1], lay.groups, lay.out_features, lay.input_dim)
        return self._flat(self.QG @ m @ self.QA.transpose(-1, -2))

    def solve(self, v: Tensor, damping: Tensor, eigenvalues: Tensor) -> Tensor:
        """Factored damping: G_γ⁻¹ V A_γ⁻¹ with both inverses kept per damping value (2 matmuls, not 4)."""
        if self.mode == "exact":
            return super().solve(v, damping, eigenvalues)
        key = float(damping)
        if self._inverses is None or self._inverses[0] != key:
            root, pi, floor = damping.sqrt(), self.pi.unsqueeze(1), FACTOR_FLOOR
            g_inv = (self.QG / (self.g + root / pi).clamp_min(floor).unsqueeze(1)) @ self.QG.transpose(-1, -2)
            a_inv = (self.QA / (self.a + root * pi).clamp_min(floor).unsqueeze(1)) @ self.QA.transpose(-1, -2)
            self._inverses = (key, g_inv, a_inv)
        _, g_inv, a_inv = self._inverses
        return self._flat(g_inv @ self._matrix(v) @ a_inv)

    def distribution(self, loc: Tensor, variances: Tensor) -> NormalBlock:
        """A ``KroneckerNormal`` per group over [W_g | b_g] (out, in): a matrix normal if damping is factored."""
        lay = self.layout
        shape = (lay.groups, lay.out_features, lay.input_dim)
        normal = KroneckerNormal(self._matrix(loc), self.QG, self.QA, variances.reshape(shape))
        return NormalBlock(Independent(normal, 1), self._matrix, self._flat)

    def diagonal(self, weights: Tensor) -> Tensor:
        lay = self.layout
        w = weights.reshape(lay.groups, lay.out_features, lay.input_dim)
        return self._flat(self.QG.square() @ w @ self.QA.square().transpose(-1, -2))


class KroneckerGaussian(Posterior):
    """Matrix-normal (K-FAC) blocks for Linear and convolutions, diagonal blocks elsewhere.

    Args: as ``Posterior``, plus ``kfac_damping``: "exact" (eigenbasis, default) or
    "factored" (π-split Tikhonov damping of noisy K-FAC).
    """

    structure = "kron"

    def __init__(self, module, *, kfac_damping: str = "exact", **kwargs) -> None:
        if kfac_damping not in KFAC_DAMPING:
            raise ValueError(f"kfac_damping must be 'exact' or 'factored', got {kfac_damping!r}")
        self.kfac_damping = kfac_damping
        super().__init__(module, **kwargs)

    def _factors(self, block: Block) -> list[Tensor]:
        return [block.A, block.G] if isinstance(block, KronBlock) else []

    def _eigenbasis(self, block: Block, eighs: list[tuple[Tensor, Tensor]] | None = None) -> Eigenbasis:
        if isinstance(block, KronBlock):
            return KroneckerBasis(block, self.kfac_damping, eighs)
        return DiagonalBasis(block.diagonal())
