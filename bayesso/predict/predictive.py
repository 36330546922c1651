"""Predictive distributions: Monte Carlo over posterior samples.

Classification and binary predictives average probabilities over samples (never
logits); regression gives the mean of the sampled outputs and splits the
variance into the aleatoric part σ² and the epistemic part (variance of the mean
over samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayesso.likelihoods import Binary, Classification

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["Predictive", "mc_predictive"]


@dataclass
class Predictive:
    """A predictive distribution for a batch.

    ``probs``: (B, C) class probabilities (classification) or (B,) P(y = 1) (binary).
    ``mean``, ``aleatoric``, ``epistemic``: regression mean and variances, shaped like the outputs.
    ``samples``: per-sample probabilities or outputs (S, B, ...) when kept.
    """

    probs: Tensor | None = None
    mean: Tensor | None = None
    aleatoric: Tensor | None = None
    epistemic: Tensor | None = None
    samples: Tensor | None = None

    @property
    def variance(self) -> Tensor:
        """Total predictive variance (regression): aleatoric + epistemic."""
        if self.mean is None:
            raise ValueError("variance is defined for regression predictives; use probs for classification")
        return self.aleatoric + self.epistemic


def _check_samples(n_samples: int) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")


@torch.no_grad()
def mc_predictive(
    model: BayesianModel,
    x: Tensor,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
    keep_samples: bool = False,
) -> Predictive:
    """Monte Carlo predictive: one forward per posterior sample (module in eval mode)."""
    _check_samples(n_samples)
    likelihood = model.likelihood
    draws = []
    for _ in range(n_samples):
        with model.sample_parameters(generator):
            outputs = model.module(x).float()
        if isinstance(likelihood, Classification):
            draws.append(torch.softmax(outputs, dim=-1))
        elif isinstance(likelihood, Binary):
            draws.append(torch.sigmoid(outputs.reshape(-1)))
        else:
            draws.append(outputs)
    stacked = torch.stack(draws)
    kept = stacked if keep_samples else None
    if isinstance(likelihood, (Classification, Binary)):
        return Predictive(probs=stacked.mean(0), samples=kept)
    sigma = torch.as_tensor(likelihood.sigma, dtype=stacked.dtype).detach()
    mean = stacked.mean(0)
    epistemic = stacked.var(0, unbiased=False)
    return Predictive(mean=mean, aleatoric=torch.full_like(mean, float(sigma) ** 2), epistemic=epistemic, samples=kept)
