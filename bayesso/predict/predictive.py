"""``Predictive``: a predictive distribution for a batch, and the running average of posterior draws.

Classification and binary predictives average probabilities over draws (never
logits); regression gives the mean of the drawn outputs and splits the variance
into the aleatoric part σ² and the epistemic part (variance of the mean over draws).
Heteroscedastic regression splits each draw's outputs (B, 2D) into means μ and
log-variances s: the mean and epistemic part are those of μ, the aleatoric part E[e^s].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bayesso.distributed import ProcessGrid
from bayesso.likelihoods import Binary, Classification, Heteroscedastic, Likelihood, Regression

__all__ = ["Predictive", "check_n_samples", "check_predictable"]


@dataclass
class Predictive:
    """A predictive distribution for a batch of B inputs.

    ``probs``: (B, C) class probabilities (classification) or (B,) P(y = 1) (binary).
    ``mean``, ``aleatoric``, ``epistemic``: regression mean and variances, shaped like the outputs
    (heteroscedastic: like the means, (B, D), with aleatoric E[e^s]).
    ``samples``: per-draw probabilities or outputs (S, B, ...) when kept (heteroscedastic: (S, B, 2D)).
    ``output_covariance``: (B, O, O) covariance J Σ Jᵀ of the network outputs (linearized and probit).
    """

    probs: Tensor | None = None
    mean: Tensor | None = None
    aleatoric: Tensor | None = None
    epistemic: Tensor | None = None
    samples: Tensor | None = None
    output_covariance: Tensor | None = None

    @property
    def variance(self) -> Tensor:
        """Total predictive variance (regression): aleatoric + epistemic."""
        if self.mean is None:
            raise ValueError("variance is defined for regression predictives; use probs for classification")
        return self.aleatoric + self.epistemic


def check_n_samples(n_samples: int, argument: str = "n_samples") -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"{argument} must be a positive integer, got {n_samples!r}")


def check_predictable(likelihood: Likelihood) -> None:
    """Predictives know the built-in likelihoods (and their subclasses) only; a clear error for others."""
    if not isinstance(likelihood, (Classification, Binary, Regression, Heteroscedastic)):
        raise ValueError(
            "predictives support the Classification, Binary, Regression and Heteroscedastic likelihoods (or "
            f"subclasses), got {type(likelihood).__name__}"
        )


def working_precision(outputs: Tensor) -> Tensor:
    """Outputs in float32, or float64 when they are float64 (half precision is upcast)."""
    return outputs if outputs.dtype == torch.float64 else outputs.float()


class DrawAverage:
    """Running mean over chunks of draws of the network outputs (S, B, ...), in float64 sums.

    Memory stays at one chunk however many draws there are, unless the draws are kept.
    """

    def __init__(self, likelihood: Likelihood, keep_samples: bool) -> None:
        check_predictable(likelihood)
        self.likelihood, self.keep = likelihood, keep_samples
        self.count, self.dtype = 0, torch.float32
        self.total: Tensor | None = None
        self.squares: Tensor | None = None
        self.kept: list[Tensor] = []

    @property
    def regression(self) -> bool:
        return not isinstance(self.likelihood, (Classification, Binary))

    def add(self, outputs: Tensor) -> None:
        """Add a chunk of drawn outputs (S, B, ...)."""
        outputs = working_precision(outputs)
        self.dtype = outputs.dtype
        if isinstance(self.likelihood, Classification):
            values = torch.softmax(outputs, dim=-1)
        elif isinstance(self.likelihood, Binary):
            values = torch.sigmoid(outputs.reshape(*outputs.shape[:2]))  # (S, B) even for B = 1
        else:
            values = outputs
        wide = values.double()
        if isinstance(self.likelihood, Heteroscedastic):  # per draw: μ, then σ² = e^s
            mean, log_variance = self.likelihood.split(wide)
            wide = torch.cat([mean, log_variance.exp()], dim=-1)
        self.total = wide.sum(0) if self.total is None else self.total + wide.sum(0)
        if self.regression:
            squares = wide.square().sum(0)
            self.squares = squares if self.squares is None else self.squares + squares
        self.count += values.shape[0]
        if self.keep:
            self.kept.append(values)

    def reduce(self, grid: ProcessGrid) -> None:
        """Sum the running sums and counts over the ranks of ``grid`` (each rank drew different samples)."""
        parts = [self.total, torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device)]
        if self.regression:
            parts.append(self.squares)
        reduced = grid.all_reduce(parts)
        self.total, self.count = reduced[0], round(float(reduced[1]))
        if self.regression:
            self.squares = reduced[2]

    def result(self, output_covariance: Tensor | None = None) -> Predictive:
        samples = torch.cat(self.kept) if self.keep else None
        mean64 = self.total / self.count
        if not self.regression:
            return Predictive(probs=mean64.to(self.dtype), samples=samples, output_covariance=output_covariance)
        epistemic = (self.squares / self.count - mean64.square()).clamp_min(0)
        if isinstance(self.likelihood, Heteroscedastic):
            mean64, aleatoric = mean64.chunk(2, dim=-1)
            epistemic = epistemic[..., : mean64.shape[-1]]
        else:
            aleatoric = torch.full_like(mean64, self.likelihood.sigma_value**2)
        return Predictive(
            mean=mean64.to(self.dtype),
            aleatoric=aleatoric.to(self.dtype),
            epistemic=epistemic.to(self.dtype),
            samples=samples,
            output_covariance=output_covariance,
        )
