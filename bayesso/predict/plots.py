"""Calibration plots (the ``plot`` extra, matplotlib): reliability diagram, confidence and OOD histograms.

Each function returns a ``matplotlib.figure.Figure`` (built without pyplot, so no
GUI backend is touched) or draws into a given ``ax`` and returns its figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayesso.predict.metrics import auroc, calibration_bins, class_probabilities, ece

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["confidence_histogram", "ood_histogram", "reliability_diagram"]


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("bayesso.predict.plots needs matplotlib: pip install 'bayesso[plot]'") from error
    return Figure(figsize=(4.2, 4.2), layout="constrained").add_subplot()


def reliability_diagram(
    probs: Tensor, targets: Tensor, n_bins: int = 15, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Accuracy per equal-width confidence bin as bars, the gap to the bin's mean confidence shaded,
    the diagonal of perfect calibration, and the ECE in the title. Binary (N,) probs are accepted.
    """
    probs = class_probabilities(probs)
    count, confidence, accuracy = (t.cpu().numpy() for t in calibration_bins(probs, targets, n_bins))
    ax = _axes(ax)
    width = 1.0 / n_bins
    centers = (torch.arange(n_bins, dtype=torch.float64).numpy() + 0.5) * width
    filled = count > 0
    ax.bar(centers[filled], accuracy[filled], width=width, color="#3b6ea8", edgecolor="white", label="accuracy")
    low = [min(a, c) for a, c in zip(accuracy[filled], confidence[filled])]
    gap = abs(confidence[filled] - accuracy[filled])
    ax.bar(centers[filled], gap, bottom=low, width=width, color="#d9534f", alpha=0.35, hatch="//",
           edgecolor="#d9534f", label="gap to confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    heading = f"ECE {100 * ece(probs, targets, n_bins):.2f}%"
    ax.set_title(f"{title}: {heading}" if title else heading)
    ax.legend(loc="upper left", fontsize="small")
    return ax.figure


def confidence_histogram(
    probs: Tensor, targets: Tensor | None = None, n_bins: int = 15, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Histogram of confidences max_k p̄_k, with the mean confidence (and the accuracy, given targets) marked."""
    probs = class_probabilities(probs)
    confidence = probs.double().max(1).values.cpu().numpy()
    ax = _axes(ax)
    ax.hist(confidence, bins=n_bins, range=(0, 1), color="#3b6ea8", edgecolor="white")
    ax.axvline(confidence.mean(), color="black", linestyle="--", label=f"mean confidence {confidence.mean():.3f}")
    if targets is not None:
        accuracy = (probs.argmax(1) == targets).double().mean().item()
        ax.axvline(accuracy, color="#d9534f", label=f"accuracy {accuracy:.3f}")
    ax.set(xlim=(0, 1), xlabel="confidence", ylabel="examples")
    ax.set_title(title or "confidence")
    ax.legend(loc="upper left", fontsize="small")
    return ax.figure


def ood_histogram(
    scores_in: Tensor,
    scores_out: Tensor,
    bins: int = 30,
    ax: Axes | None = None,
    title: str | None = None,
    score_name: str = "max probability",
) -> Figure:
    """Overlaid, normalised histograms of in- and out-of-distribution scores, AUROC in the title."""
    inside, outside = scores_in.double().cpu().numpy(), scores_out.double().cpu().numpy()
    low, high = min(inside.min(), outside.min()), max(inside.max(), outside.max())
    ax = _axes(ax)
    common = {"bins": bins, "range": (low, high if high > low else low + 1), "density": True, "alpha": 0.55}
    ax.hist(inside, color="#3b6ea8", label="in-distribution", **common)
    ax.hist(outside, color="#e08a2c", label="out-of-distribution", **common)
    ax.set(xlabel=score_name, ylabel="density")
    heading = f"OOD AUROC {100 * auroc(scores_in, scores_out):.1f}%"
    ax.set_title(f"{title}: {heading}" if title else heading)
    ax.legend(loc="upper left", fontsize="small")
    return ax.figure
