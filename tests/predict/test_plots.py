"""Calibration plots: what is drawn matches the metrics, ``ax`` is honoured, PNGs are written."""

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from bayesso.predict.metrics import calibration_bins, ece
from bayesso.predict.plots import confidence_histogram, ood_histogram, reliability_diagram

matplotlib.use("Agg")


def _predictions(seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(400, 4, generator=gen, dtype=torch.float64), -1)
    return probs, torch.randint(0, 4, (400,), generator=gen)


def test_reliability_diagram_bars_are_the_binned_accuracies(tmp_path):
    probs, targets = _predictions()
    figure = reliability_diagram(probs, targets, n_bins=10, title="test")
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    count, confidence, accuracy = calibration_bins(probs, targets, 10)
    filled = count > 0
    bars, gaps = ax.containers
    assert [b.get_height() for b in bars] == pytest.approx(accuracy[filled].tolist())
    assert [g.get_height() for g in gaps] == pytest.approx((confidence - accuracy)[filled].abs().tolist())
    assert f"ECE {100 * ece(probs, targets, 10):.2f}%" in ax.get_title() and ax.get_title().startswith("test")
    figure.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_draw_into_a_given_ax_and_accept_binary_probabilities():
    figure = Figure()
    left, middle, right = figure.subplots(1, 3)
    probs, targets = _predictions()
    assert reliability_diagram(torch.rand(50, dtype=torch.float64), torch.randint(0, 2, (50,)), ax=left) is figure
    assert confidence_histogram(probs, targets, ax=middle) is figure
    assert sum(p.get_height() for p in middle.patches) == 400
    scores_in, scores_out = probs.max(1).values, torch.rand(100, dtype=torch.float64) * 0.5
    assert ood_histogram(scores_in, scores_out, ax=right) is figure
    assert "OOD AUROC" in right.get_title() and len(right.patches) == 60
