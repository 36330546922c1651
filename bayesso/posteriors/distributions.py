"""The posterior as a ``torch.distributions.Distribution``: ``KroneckerNormal``, ``MatrixNormal``, ``BlockNormal``.

A Kronecker (K-FAC) block's covariance has the eigenbasis Q_G ⊗ Q_A (docs/posteriors.md §2), so a
Gaussian over the block's (out, in) matrix X is kept as that basis and one variance per eigenvector:

    Cov(vec X) = (Q_U ⊗ Q_V) diag(vec V) (Q_U ⊗ Q_V)ᵀ     (vec row-major, V of shape (rows, cols)).

When V = u vᵀ separates (noisy K-FAC's factored damping) this is the matrix normal MN(M, U, C) with
U = Q_U diag(u) Q_Uᵀ over the rows and C = Q_V diag(v) Q_Vᵀ over the columns; with exact damping,
(G ⊗ A + λ I)⁻¹ is no Kronecker product, and V = 1 / ((N/τ)(g aᵀ + λ)) does not separate. Sampling,
log-densities, entropy, moments and KL cost products with the factors only, never a (rc × rc) matrix.
Samples use the symmetric root, X = M + Q_U [(Q_Uᵀ E Q_V) ⊙ √V] Q_Vᵀ, as ``Posterior.sample_noise``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, constraints, kl_divergence
from torch.distributions.kl import register_kl

__all__ = ["BlockNormal", "KroneckerNormal", "MatrixNormal", "NormalBlock", "dense_normal"]


def _flat(x: Tensor) -> Tensor:
    return x


class NormalBlock(NamedTuple):
    """One block of a ``BlockNormal``: its distribution, and the maps between the block's slice (..., n) of the
    flat vector and the distribution's event (e.g. a Kronecker block's (groups, out, in) matrices)."""

    distribution: Distribution
    to_event: Callable[[Tensor], Tensor] = _flat
    from_event: Callable[[Tensor], Tensor] = _flat


class KroneckerNormal(Distribution):
    """Gaussian over matrices (..., r, c) whose covariance has the eigenbasis Q_U ⊗ Q_V (see the module docstring).

    Args:
        loc: the mean M (..., r, c).
        row_vectors: Q_U (..., r, r), orthonormal columns.
        column_vectors: Q_V (..., c, c), orthonormal columns.
        variances: the covariance's eigenvalues (..., r, c), positive; entry (i, j) belongs to Q_U[:, i] ⊗ Q_V[:, j].
    """

    arg_constraints: ClassVar[dict] = {"loc": constraints.real, "variances": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(
        self, loc: Tensor, row_vectors: Tensor, column_vectors: Tensor, variances: Tensor, validate_args=None
    ) -> None:
        if loc.ndim < 2 or variances.shape[-2:] != loc.shape[-2:]:
            raise ValueError(
                f"loc and variances must be (..., r, c) alike, got {tuple(loc.shape)}, {tuple(variances.shape)}"
            )
        r, c = loc.shape[-2:]
        if row_vectors.shape[-2:] != (r, r) or column_vectors.shape[-2:] != (c, c):
            raise ValueError(
                f"row_vectors must be (..., {r}, {r}) and column_vectors (..., {c}, {c}), got "
                f"{tuple(row_vectors.shape)} and {tuple(column_vectors.shape)}"
            )
        self.loc, self.row_vectors, self.column_vectors, self.variances = loc, row_vectors, column_vectors, variances
        batch = torch.broadcast_shapes(
            loc.shape[:-2], variances.shape[:-2], row_vectors.shape[:-2], column_vectors.shape[:-2]
        )
        super().__init__(batch, loc.shape[-2:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> KroneckerNormal:
        shape = torch.Size(batch_shape)
        r, c = self.event_shape
        return KroneckerNormal(
            self.loc.expand(*shape, r, c),
            self.row_vectors.expand(*shape, r, r),
            self.column_vectors.expand(*shape, c, c),
            self.variances.expand(*shape, r, c),
            validate_args=False,
        )

    # ---- in the eigenbasis ----------------------------------------------------------------
    def _rotate(self, x: Tensor) -> Tensor:
        """Q_Uᵀ X Q_V: coordinates in the eigenbasis."""
        return self.row_vectors.transpose(-1, -2) @ x @ self.column_vectors

    def _unrotate(self, z: Tensor) -> Tensor:
        return self.row_vectors @ z @ self.column_vectors.transpose(-1, -2)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.root(eps)

    def root(self, eps: Tensor) -> Tensor:
        """Σ^½ ε with the symmetric root, ε of shape (..., r, c): what ``rsample`` adds to the mean."""
        return self._unrotate(self._rotate(eps) * self.variances.sqrt())

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = self._rotate(value - self.loc)
        quadratic = (z.square() / self.variances).sum((-2, -1))
        n = self.event_shape.numel()
        return -0.5 * (quadratic + self.variances.log().sum((-2, -1)) + n * math.log(2 * math.pi))

    def entropy(self) -> Tensor:
        n = self.event_shape.numel()
        value = 0.5 * (self.variances.log().sum((-2, -1)) + n * (1 + math.log(2 * math.pi)))
        return value.expand(self.batch_shape)

    @property
    def mean(self) -> Tensor:
        return self.loc.expand(self._extended_shape())

    @property
    def mode(self) -> Tensor:
        return self.mean

    @property
    def variance(self) -> Tensor:
        """diag((Q_U ⊗ Q_V) diag(V) (Q_U ⊗ Q_V)ᵀ) as (..., r, c): (Q_U²) V (Q_V²)ᵀ."""
        value = self.row_vectors.square() @ self.variances @ self.column_vectors.square().transpose(-1, -2)
        return value.expand(self._extended_shape())

    def dense_covariance(self) -> Tensor:
        """The dense (..., rc, rc) covariance, row-major (small matrices only: for tests and interoperation)."""
        basis = _batched_kron(self.row_vectors, self.column_vectors)
        return (basis * self.variances.flatten(-2).unsqueeze(-2)) @ basis.transpose(-1, -2)


class MatrixNormal(KroneckerNormal):
    """MN(M, U, V): vec_r(X) ~ N(vec_r(M), U ⊗ V), U (..., r, r) over the rows, V (..., c, c) over the columns, both
    positive definite (a ``KroneckerNormal`` whose variances u vᵀ come from the eigendecompositions of U and V)."""

    def __init__(self, loc: Tensor, row_covariance: Tensor, column_covariance: Tensor, validate_args=None) -> None:
        u, row_vectors = torch.linalg.eigh(row_covariance)
        v, column_vectors = torch.linalg.eigh(column_covariance)
        if not (bool((u > 0).all()) and bool((v > 0).all())):
            raise ValueError("row_covariance and column_covariance must be positive definite")
        super().__init__(loc, row_vectors, column_vectors, u.unsqueeze(-1) * v.unsqueeze(-2), validate_args)


class BlockNormal(Distribution):
    """A block-diagonal Gaussian over a flat vector (P,): independent blocks, each a distribution over its slice.

    ``blocks`` maps a name to (``NormalBlock``, slice). Samples, log-densities, entropy and moments are the
    concatenation or the sum over blocks; KL between two with the same blocks is the sum of the blocks' KLs.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, blocks: dict[str, tuple[NormalBlock, slice]], size: int, validate_args=None):
        self.blocks, self.size = blocks, size
        super().__init__(torch.Size(), torch.Size([size]), validate_args=validate_args)

    def _joined(self, parts: dict[str, Tensor], lead: torch.Size) -> Tensor:
        """The flat vectors (*lead, P) from each block's events."""
        first = next(iter(parts.values()))
        out = first.new_zeros(*lead, self.size)
        for name, (block, where) in self.blocks.items():
            out[..., where] = block.from_event(parts[name])
        return out

    def _each(self, method: str) -> dict[str, Tensor]:
        return {name: getattr(block.distribution, method) for name, (block, _) in self.blocks.items()}

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = torch.Size(sample_shape)
        return self._joined({name: b.distribution.rsample(shape) for name, (b, _) in self.blocks.items()}, shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return sum(b.distribution.log_prob(b.to_event(value[..., where])) for b, where in self.blocks.values())

    def entropy(self) -> Tensor:
        return sum(block.distribution.entropy() for block, _ in self.blocks.values())

    @property
    def mean(self) -> Tensor:
        return self._joined(self._each("mean"), torch.Size())

    @property
    def variance(self) -> Tensor:
        return self._joined(self._each("variance"), torch.Size())


def dense_normal(block: NormalBlock) -> MultivariateNormal:
    """A block as a ``MultivariateNormal`` over its slice of the flat vector (small blocks: tests, KL fallback)."""
    distribution = block.distribution
    if isinstance(distribution, MultivariateNormal):
        loc, covariance = distribution.loc, distribution.covariance_matrix
    elif isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal):
        loc, covariance = distribution.mean.flatten(), torch.diag(distribution.variance.flatten())
    elif isinstance(distribution, Independent) and isinstance(distribution.base_dist, KroneckerNormal):
        inner = distribution.base_dist  # groups: block-diagonal over the batch
        loc, covariance = inner.loc.flatten(), torch.block_diag(*inner.dense_covariance())
    elif isinstance(distribution, KroneckerNormal):
        loc, covariance = distribution.loc.flatten(), distribution.dense_covariance()
    else:
        raise TypeError(f"no dense form for {type(distribution).__name__}")
    order = block.from_event(torch.arange(loc.numel(), device=loc.device).reshape(distribution.event_shape))
    return MultivariateNormal(loc[order], covariance[order.unsqueeze(1), order.unsqueeze(0)])


@register_kl(KroneckerNormal, KroneckerNormal)
def _kl_kronecker(p: KroneckerNormal, q: KroneckerNormal) -> Tensor:
    """½[tr(Σq⁻¹Σp) + (μq − μp)ᵀΣq⁻¹(μq − μp) − n + log det Σq − log det Σp], all through the factors:
    with R_U = Q_Uqᵀ Q_Up and R_V = Q_Vqᵀ Q_Vp, tr(Σq⁻¹Σp) = Σ (1/Vq) ⊙ (R_U² Vp (R_V²)ᵀ)."""
    rows = q.row_vectors.transpose(-1, -2) @ p.row_vectors
    columns = q.column_vectors.transpose(-1, -2) @ p.column_vectors
    trace = ((rows.square() @ p.variances @ columns.square().transpose(-1, -2)) / q.variances).sum((-2, -1))
    quadratic = (q._rotate(q.loc - p.loc).square() / q.variances).sum((-2, -1))
    n = p.event_shape.numel()
    log_ratio = q.variances.log().sum((-2, -1)) - p.variances.log().sum((-2, -1))
    return 0.5 * (trace + quadratic - n + log_ratio)


@register_kl(BlockNormal, BlockNormal)
def _kl_blocks(p: BlockNormal, q: BlockNormal) -> Tensor:
    """Σ over blocks of KL(p_m ‖ q_m); blocks of different kinds meet as dense ``MultivariateNormal``."""
    if p.blocks.keys() != q.blocks.keys() or any(p.blocks[k][1] != q.blocks[k][1] for k in p.blocks):
        raise ValueError("KL between BlockNormal distributions needs the same blocks at the same places")
    total = 0.0
    for name, (block, _) in p.blocks.items():
        other = q.blocks[name][0]
        if _kind(block.distribution) == _kind(other.distribution):  # same kind, same event layout
            total = total + kl_divergence(block.distribution, other.distribution)
        else:
            total = total + kl_divergence(dense_normal(block), dense_normal(other))
    return total


def _kind(distribution: Distribution) -> tuple[type, ...]:
    inner = distribution.base_dist if isinstance(distribution, Independent) else None
    return (type(distribution),) if inner is None else (Independent, type(inner))


def _batched_kron(a: Tensor, b: Tensor) -> Tensor:
    """kron over the last two dimensions, batched: (..., r, r) ⊗ (..., c, c) -> (..., rc, rc)."""
    r, c = a.shape[-1], b.shape[-1]
    return (a[..., :, None, :, None] * b[..., None, :, None, :]).reshape(*a.shape[:-2], r * c, r * c)
