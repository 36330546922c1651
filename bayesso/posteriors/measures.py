"""Quantities of the Gaussian q = N(μ, Σ) over the random blocks: dense Σ and Σ⁻¹, variances, log det Σ⁻¹, entropy,
KL, and q as a torch distribution.

A mixin of ``Posterior`` (docs/posteriors.md §1): each block's precision is (N/τ) e in the
eigenbasis of its statistic, with e the damped eigenvalues (``Posterior._damped``), so every
quantity here costs no new factorisation. Deterministic blocks are left out (zero rows in the
dense views).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesso.posteriors.distributions import BlockNormal

__all__ = ["PRECISION_FLOOR", "GaussianMeasures"]

# Per-example damped eigenvalues are floored here so that a block with no prior,
# no damping and zero curvature cannot produce an infinite step.
PRECISION_FLOOR = 1e-12


class GaussianMeasures:
    """Mixin of ``Posterior``: needs ``_damped``, ``_scale``, ``_basis``, ``_random``, ``_slices``, ``_flat_diagonal``
    and ``plans``."""

    def _dense(self, inverse: bool) -> Tensor:
        damped, scale = self._damped(), self._scale()
        out = torch.zeros(self.numel, self.numel, dtype=self.dtype, device=self.device)
        for _, name in self._random():
            where = self._slices[name]
            values = scale * damped[name]
            out[where, where] = self._basis(name).dense(1 / values if inverse else values)
        return out

    def precision_dense(self) -> Tensor:
        """Σ⁻¹ as a dense (P, P) matrix (small models only)."""
        return self._dense(inverse=False)

    def covariance_dense(self) -> Tensor:
        """Σ as a dense (P, P) matrix (small models only)."""
        return self._dense(inverse=True)

    def log_det_precision(self, prior_precision: Tensor | None = None, statistic_scale: float | Tensor = 1.0) -> Tensor:
        """log det Σ⁻¹ over the random (non-deterministic) parameters.

        With ``prior_precision`` δ (per block (n_blocks,) or a scalar; may require grad) and a
        ``statistic_scale`` c (may require grad), log det((N/τ)(c S + τδ/N + γ)) instead, computed
        as Σ log((N/τ) c e(λ/c)) from the kept eigenbases: exact for both Kronecker dampings, since
        scaling G by c moves π to π/√c. Laplace's marginal likelihood differentiates through this.
        """
        self.follow_module()
        scale = self._scale()
        if prior_precision is None and isinstance(statistic_scale, (int, float)) and statistic_scale == 1.0:
            damped = self._damped()
            return sum((scale * damped[name]).log().sum() for _, name in self._random())
        delta = self._prior if prior_precision is None else torch.as_tensor(prior_precision).expand(len(self.plans))
        damping = delta * self.temperature / self._dataset_size + self._damping
        total = delta.new_zeros((), dtype=torch.float64)
        for i, name in self._random():
            values = self._basis(name).eigenvalues(damping[i] / statistic_scale).clamp_min(PRECISION_FLOOR)
            total = total + (scale * statistic_scale * values.double()).log().sum()
        return total

    def variance(self) -> Tensor:
        """Marginal variances (P,), zero for deterministic blocks."""
        damped, scale, flat = self._damped(), self._scale(), self._flat_diagonal()
        if flat is not None:
            return flat[1].square()
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for _, name in self._random():
            out[self._slices[name]] = self._basis(name).diagonal(1 / (scale * damped[name]))
        return out

    def covariance_traces(self) -> Tensor:
        """tr Σ_m per block, shape (n_blocks,): Σ_k 1 / ((N/τ) e_k) over the damped eigenvalues (0 if deterministic)."""
        damped, scale = self._damped(), self._scale()
        traces = torch.zeros(len(self.plans), dtype=self.dtype, device=self.device)
        for index, name in self._random():
            traces[index] = (1 / (scale * damped[name])).sum()
        return traces

    def distribution(self) -> BlockNormal:
        """q as a ``torch.distributions.Distribution`` over the random blocks' parameters (flat, in block order).

        Diagonal blocks are ``Independent(Normal)``, Kronecker blocks a ``KroneckerNormal`` per group over the
        (out, in) matrix [W | b] (the matrix normal under factored damping), full blocks a ``MultivariateNormal``;
        nothing forms the P x P covariance but the full blocks. Deterministic blocks are left out (without any,
        the vector is the posterior's flat vector). Each call reflects the posterior at that time.
        """
        damped, scale, mean = self._damped(), self._scale(), self.mean()
        blocks, start = {}, 0
        for _, name in self._random():
            loc = mean[self._slices[name]]
            where = slice(start, start + loc.numel())
            blocks[name] = (self._basis(name).distribution(loc, 1 / (scale * damped[name])), where)
            start = where.stop
        return BlockNormal(blocks, start)

    def entropy(self) -> Tensor:
        """Differential entropy of q in nats."""
        n = sum(self.plans[i].numel for i, _ in self._random())
        return 0.5 * n * math.log(2 * math.pi * math.e) - 0.5 * self.log_det_precision()

    def kl_to_prior(self) -> Tensor:
        """KL(q ‖ N(0, I/δ)) over the random parameters, δ per block."""
        damped, scale, mean = self._damped(), self._scale(), self.mean()
        total = mean.new_zeros(())
        for i, name in self._random():
            delta, precision = self._prior[i], scale * damped[name]
            mu = mean[self._slices[name]]
            k = mu.numel()
            total = total + 0.5 * (
                delta * (1 / precision).sum() + delta * mu.square().sum() - k - k * delta.log() + precision.log().sum()
            )
        return total
