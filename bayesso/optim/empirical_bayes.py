"""Hyperparameters learned during VI by maximising the ELBO in them (empirical Bayes, variational EM).

For fixed q = N(μ, Σ) the ELBO's terms that depend on the prior precision δ of N(0, I/δ) are
E_q[log p(θ)] = (P/2) log δ - (δ/2)(‖μ‖² + tr Σ), maximised at

    δ = P / (‖μ‖² + tr Σ)                    (per module block, or pooled over blocks)

and those that depend on a Gaussian likelihood's noise σ are -Σ_i E_q[‖y_i - f_i(θ)‖²]/(2σ²)
- (N O / 2) log σ², maximised at σ² = Σ_i E_q[‖y_i - f_i(θ)‖²] / (N O): the mean squared residual
at weights drawn from q. Iterated with the VI updates of q this is MacKay's fixed point
δ = γ / ‖μ‖² with γ = Σ_k s_k / (s_k + δ/N) the number of well-determined parameters
(MacKay 1992). Temperature τ does not enter either maximiser.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesso.posteriors import Posterior

__all__ = ["PRIOR_GRANULARITIES", "NoiseEstimate", "initialisation_prior", "prior_precision_update"]

PRIOR_GRANULARITIES = ("module", "scalar")


def _block_norms(posterior: Posterior) -> tuple[Tensor, Tensor]:
    """(‖μ_m‖², P_m) per block, each (n_blocks,)."""
    mean = posterior.mean()
    squares = torch.stack([mean[where].square().sum() for where in posterior.block_slices()])
    sizes = torch.tensor([float(plan.numel) for plan in posterior.plans], dtype=squares.dtype, device=squares.device)
    return squares, sizes


def prior_precision_update(posterior: Posterior, granularity: str) -> Tensor:
    """The δ (one per block) that maximises the ELBO for the current q; deterministic blocks keep theirs.

    ``granularity``: "module" (δ_m = P_m / (‖μ_m‖² + tr Σ_m)) or "scalar" (sums over the blocks).
    Raises ``FloatingPointError`` when the result is not positive and finite (nothing is written).
    """
    squares, sizes = _block_norms(posterior)
    spread = squares + posterior.covariance_traces()
    random = torch.tensor([p.name not in posterior.deterministic for p in posterior.plans], device=spread.device)
    if not bool(random.any()):
        return posterior.prior_precision.clone()
    if granularity == "scalar":
        pooled = sizes[random].sum() / spread[random].sum()
        learned = pooled.expand(len(sizes))
    else:
        learned = sizes / spread
    values = torch.where(random, learned, posterior.prior_precision)
    if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
        raise FloatingPointError(f"the learned prior precision is not positive and finite: {values.tolist()}")
    return values


def initialisation_prior(posterior: Posterior) -> Tensor:
    """δ_m = P_m / ‖μ_m‖² per block: the Gaussian prior with the spread of the current (initial) weights.

    PyTorch initialises a layer with fan-in n at variance about 1/(3n), so this prior is N(0, 1/(3n))
    per layer, the scale at which the network's signals neither explode nor vanish. A block whose
    weights are all zero takes the value pooled over the other blocks.
    """
    squares, sizes = _block_norms(posterior)
    if not bool((squares > 0).any()):
        raise ValueError("the prior cannot be set from the weights: every covered weight is zero")
    pooled = sizes[squares > 0].sum() / squares.sum()
    return torch.where(squares > 0, sizes / squares.clamp_min(torch.finfo(squares.dtype).tiny), pooled)


class NoiseEstimate:
    """Running estimate of a Gaussian likelihood's σ² = E_q‖y - f(θ)‖² / O from residuals at sampled weights.

    ``add`` takes a batch's summed squared residual and its number of output values; ``update``
    returns the new σ: the first batch sets it, later ones enter an EMA with weight ``beta`` on
    the old value (as every β in bayesso).
    """

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.variance: float | None = None
        self._sums = [0.0, 0]

    def add(self, squared_error: float, n_values: int) -> None:
        self._sums[0] += squared_error
        self._sums[1] += n_values

    @property
    def pending(self) -> tuple[float, int]:
        """(summed squared residual, number of values) added since the last update."""
        return self._sums[0], self._sums[1]

    def discard(self) -> None:
        """Forget the batches added since the last update (their step was skipped)."""
        self._sums = [0.0, 0]

    def update(self) -> float | None:
        """Fold the batches added since the last update into σ²; returns σ (None if nothing was added)."""
        squared, count = self._sums
        self._sums = [0.0, 0]
        if count == 0:
            return None if self.variance is None else math.sqrt(self.variance)
        batch = squared / count
        if not math.isfinite(batch):
            raise FloatingPointError(f"the mean squared residual is not finite ({batch}); σ was not changed")
        variance = batch if self.variance is None else self.beta * self.variance + (1 - self.beta) * batch
        self.variance = max(variance, torch.finfo(torch.float64).tiny)
        return math.sqrt(self.variance)
