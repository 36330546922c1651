"""Calibration and OOD metrics on torch tensors, CPU or GPU (docs/metrics.md).

``probs`` are predictive probabilities (N, C), averaged over posterior samples (not
logits); ``targets`` integer labels (N,). Logs are natural. Every metric returns a
Python float computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayesso.batches import check_batch, check_loader, describe, located, split_batch, transfer
from bayesso.likelihoods import Heteroscedastic, Regression
from bayesso.progress import check_progress, track

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = [
    "accuracy",
    "auroc",
    "brier",
    "calibration_bins",
    "class_probabilities",
    "classification_metrics",
    "classwise_ece",
    "ece",
    "evaluate",
    "fpr_at_95_tpr",
    "mce",
    "mutual_information",
    "nll",
    "predictive_entropy",
]


def _check(probs: Tensor, targets: Tensor) -> None:
    if probs.ndim != 2 or targets.ndim != 1 or probs.shape[0] != targets.shape[0]:
        shapes = f"{tuple(probs.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"probs must be (N, C) and targets (N,) with the same N, got {shapes}")
    if probs.shape[0] == 0:
        raise ValueError("metrics need at least one example, got N=0")
    if not torch.isfinite(probs).all():
        raise ValueError("probs contain non-finite values")


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


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


def _binned(confidence: Tensor, hits: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, summed confidence, summed hits) per bin; bin m holds ((m-1)/M, m/M], the first also 0."""
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    count.index_add_(0, bins, torch.ones_like(hits))
    conf = torch.zeros_like(count).index_add_(0, bins, confidence)
    acc = torch.zeros_like(count).index_add_(0, bins, hits)
    return count, conf, acc


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width bin of confidence max_k p̄_k: (count, mean confidence, accuracy), NaN where empty."""
    _check(probs, targets)
    _check_bins(n_bins)
    confidence, predicted = probs.double().max(1)
    count, conf, acc = _binned(confidence, (predicted == targets).double(), n_bins)
    return count, conf / count, acc / count


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error Σ_m (|B_m|/N) |acc(B_m) - conf(B_m)| over equal-width confidence bins."""
    count, conf, acc = calibration_bins(probs, targets, n_bins)
    gaps = (acc - conf).abs().nan_to_num(0.0)
    return ((count * gaps).sum() / len(targets)).item()


def mce(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Maximum calibration error: the largest |acc(B_m) - conf(B_m)| over non-empty bins."""
    _, conf, acc = calibration_bins(probs, targets, n_bins)
    return (acc - conf).abs().nan_to_num(0.0).max().item()


def classwise_ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Kull et al. (2019): for each class k the ECE of p̄_k against 1[y = k] over bins of p̄_k, averaged over k."""
    _check(probs, targets)
    _check_bins(n_bins)
    wide = probs.double()
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).double()
    total = 0.0
    for k in range(probs.shape[1]):
        _, conf, hits = _binned(wide[:, k], onehot[:, k], n_bins)
        total += (conf - hits).abs().sum().item() / len(targets)
    return total / probs.shape[1]


def _check_scores(scores_in: Tensor, scores_out: Tensor) -> None:
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ValueError("OOD metrics need at least one in-distribution and one out-of-distribution score")


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """P(score_in > score_out) with ties counted half (in-distribution is the positive class)."""
    _check_scores(scores_in, scores_out)
    scores = torch.cat([scores_in.reshape(-1), scores_out.reshape(-1)]).double()
    ranks = _average_ranks(scores)
    n_in, n_out = scores_in.numel(), scores_out.numel()
    return ((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)).item()


def fpr_at_95_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> float:
    """Fraction of OOD scores ≥ t, for the largest threshold t that keeps ≥ ``tpr`` of in-distribution scores."""
    _check_scores(scores_in, scores_out)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    ordered = scores_in.reshape(-1).double().sort(descending=True).values
    threshold = ordered[math.ceil(tpr * len(ordered) - 1e-9) - 1]
    return (scores_out.double() >= threshold).double().mean().item()


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


def predictive_entropy(probs: Tensor) -> Tensor:
    """H[p̄] = -Σ_k p̄_k log p̄_k per example (N,), in nats (0 log 0 = 0)."""
    wide = probs.double()
    return -torch.special.xlogy(wide, wide).sum(-1)


def mutual_information(samples: Tensor) -> Tensor:
    """Epistemic part of the entropy from per-sample probabilities (S, N, C): H[mean_s p_s] - mean_s H[p_s], (N,)."""
    if samples.ndim != 3:
        raise ValueError(f"samples must be per-sample probabilities (S, N, C), got shape {tuple(samples.shape)}")
    return (predictive_entropy(samples.mean(0)) - predictive_entropy(samples).mean(0)).clamp_min(0)


def class_probabilities(probs: Tensor) -> Tensor:
    """(N, C) probabilities; binary P(y = 1) of shape (N,) becomes (N, 2) columns [1 - p, p]."""
    return torch.stack([1 - probs, probs], dim=1) if probs.ndim == 1 else probs


def classification_metrics(
    probs: Tensor, targets: Tensor, ood_probs: Tensor | None = None, n_bins: int = 15
) -> dict[str, float]:
    """accuracy, nll, brier, ece, mce, classwise_ece; with ``ood_probs`` also auroc (score: max probability),
    auroc_entropy (score: negative entropy) and fpr_at_95_tpr (max probability). Binary (N,) probs are accepted.
    """
    probs = class_probabilities(probs)
    metrics = {
        "accuracy": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "brier": brier(probs, targets),
        "ece": ece(probs, targets, n_bins),
        "mce": mce(probs, targets, n_bins),
        "classwise_ece": classwise_ece(probs, targets, n_bins),
    }
    if ood_probs is not None:
        ood_probs = class_probabilities(ood_probs)
        inside, outside = probs.max(1).values, ood_probs.max(1).values
        metrics["auroc"] = auroc(inside, outside)
        metrics["auroc_entropy"] = auroc(-predictive_entropy(probs), -predictive_entropy(ood_probs))
        metrics["fpr_at_95_tpr"] = fpr_at_95_tpr(inside, outside)
    return metrics


def evaluate(
    model: BayesianModel,
    loader: Iterable,
    method: str | None = None,
    n_samples: int = 32,
    ood_loader: Iterable | None = None,
    n_bins: int = 15,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Predict every (x, y) batch of ``loader`` with ``model.predict`` and summarise.

    Classification and binary: ``classification_metrics`` (OOD metrics on the inputs of
    ``ood_loader``). Regression and heteroscedastic: rmse of the mean and the Gaussian predictive
    nll per example (summed over outputs, total variance aleatoric + epistemic). ``progress``: a bar
    over the batches (``bayesso.progress``).
    """
    check_progress(progress)

    likelihood = model.likelihood
    check_loader(loader)
    if ood_loader is not None:
        check_loader(ood_loader, what="ood_loader")

    def predictions(batches: Iterable, what: str):
        for index, batch in enumerate(track(batches, f"evaluate {what}", progress)):
            with located(f"evaluate, {what} batch {index + 1}"):
                x, y = split_batch(batch) if what == "test" else (_inputs(batch), None)
                if y is not None:
                    check_batch(likelihood, x, y)
                predictive = model.predict(x, n_samples=n_samples, method=method, generator=generator)
                if y is not None:  # the targets against the predictive's outputs (probabilities or means)
                    outputs = predictive.mean if predictive.mean is not None else predictive.probs
                    y = transfer(y, outputs.device, None)  # predict moved x to the module's device
                    if isinstance(likelihood, Heteroscedastic):  # checked in the layout (μ, s) of its outputs
                        outputs = torch.cat([outputs, predictive.aleatoric.log()], dim=-1)
                    likelihood.check(outputs, y, require_finite=False)
            yield predictive, y

    if isinstance(likelihood, (Regression, Heteroscedastic)):
        squared = log_density = values = count = 0.0
        for predictive, y in predictions(loader, "test"):
            error = (y - predictive.mean).double()
            variance = predictive.variance.double()
            squared += error.square().sum().item()
            log_density += (-0.5 * (error.square() / variance + (2 * math.pi * variance).log())).sum().item()
            values, count = values + error.numel(), count + len(y)
        if not count:
            raise ValueError("the loader yielded no batches")
        return {"rmse": math.sqrt(squared / values), "nll": -log_density / count}
    probs, targets = [], []
    for predictive, y in predictions(loader, "test"):
        probs.append(class_probabilities(predictive.probs))
        targets.append(y.reshape(-1).long())
    if not probs:
        raise ValueError("the loader yielded no batches")
    ood = None
    if ood_loader is not None:
        ood = torch.cat([class_probabilities(p.probs) for p, _ in predictions(ood_loader, "OOD")])
    return classification_metrics(torch.cat(probs), torch.cat(targets), ood, n_bins)


def _inputs(batch) -> Tensor:
    """The inputs of a batch that is a tensor, or a tuple/list whose first entry is the inputs."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"expected batches of inputs x or (x, ...), got {describe(batch)}")
