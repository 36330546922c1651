"""Calibration and OOD metrics on torch tensors (ALGORITHMS.md section 5).

``probs`` are predictive probabilities (N, C) (averaged over posterior samples,
not logits); ``targets`` integer labels (N,). All logs are natural logs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accuracy", "auroc", "brier", "ece", "nll"]


def _check(probs: Tensor, targets: Tensor) -> None:
    if probs.ndim != 2 or targets.ndim != 1 or probs.shape[0] != targets.shape[0]:
        shapes = f"{tuple(probs.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"probs must be (N, C) and targets (N,) with the same N, got {shapes}")
    if probs.shape[0] == 0:
        raise ValueError("metrics need at least one example, got N=0")


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of examples whose most probable class is the target."""
    _check(probs, targets)
    return (probs.argmax(1) == targets).double().mean().item()


def nll(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> float:
    """-mean_i log p̄(y_i | x_i), with probabilities floored at ``eps``."""
    _check(probs, targets)
    return -probs.double().gather(1, targets.unsqueeze(1)).clamp_min(eps).log().mean().item()


def brier(probs: Tensor, targets: Tensor) -> float:
    """(1/N) Σ_i Σ_k (p̄_ik - 1[y_i = k])², summed over classes."""
    _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).double()
    return (probs.double() - onehot).square().sum(1).mean().item()


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_m (|B_m|/N) |acc(B_m) - conf(B_m)| over equal-width bins of [0, 1].

    Confidence is max_k p̄_k; bin m holds confidences in ((m-1)/M, m/M], the first bin also 0.
    """
    _check(probs, targets)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    confidence, predicted = probs.double().max(1)
    correct = (predicted == targets).double()
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, torch.ones_like(correct))
    conf = torch.zeros_like(count).index_add_(0, bins, confidence)
    acc = torch.zeros_like(count).index_add_(0, bins, correct)
    return ((acc - conf).abs().sum() / len(targets)).item()


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """P(score_in > score_out) with ties counted half (in-distribution is the positive class)."""
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ValueError("auroc needs at least one in-distribution and one out-of-distribution score")
    scores = torch.cat([scores_in, scores_out]).double()
    ranks = _average_ranks(scores)
    n_in, n_out = scores_in.numel(), scores_out.numel()
    return ((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)).item()


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank (Mann-Whitney U)."""
    order = values.argsort()
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype, device=values.device)
    unique, inverse = torch.unique(sorted_values, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(0, inverse, ranks[order])
    counts = torch.bincount(inverse, minlength=len(unique)).to(values.dtype)
    ranks[order] = (sums / counts)[inverse]
    return ranks
