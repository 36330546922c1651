"""Metrics against scikit-learn and synthetic cases with known answers."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from bayesso.predict.metrics import accuracy, auroc, brier, ece, nll


def random_predictions(n=500, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, classes, generator=gen, dtype=torch.float64), -1)
    return probs, torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("seed", range(3))
def test_against_scikit_learn(seed):
    probs, targets = random_predictions(seed=seed)
    assert nll(probs, targets) == pytest.approx(log_loss(targets.numpy(), probs.numpy(), labels=range(4)), rel=1e-12)
    onehot = np.eye(4)[targets.numpy()]
    assert brier(probs, targets) == pytest.approx(((probs.numpy() - onehot) ** 2).sum(1).mean(), rel=1e-12)
    assert accuracy(probs, targets) == pytest.approx((probs.argmax(1) == targets).double().mean().item())
    gen = torch.Generator().manual_seed(seed)
    scores_in, scores_out = torch.randint(0, 6, (300,), generator=gen), torch.randint(0, 6, (200,), generator=gen)
    labels = np.r_[np.ones(300), np.zeros(200)]
    expected = roc_auc_score(labels, np.r_[scores_in.numpy(), scores_out.numpy()])  # ties count half
    assert auroc(scores_in.double(), scores_out.double()) == pytest.approx(expected, rel=1e-12)


def test_ece_of_calibrated_predictions_vanishes():
    gen = torch.Generator().manual_seed(0)
    n = 200000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    correct = torch.rand(n, generator=gen, dtype=torch.float64) < confidence  # right with probability = confidence
    probs = torch.stack([confidence, 1 - confidence], 1)
    targets = torch.where(correct, 0, 1)
    assert ece(probs, targets) < 0.005


def test_ece_of_confident_wrong_predictions_is_the_mean_confidence():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [1.0, 0.0], [0.6, 0.4]], dtype=torch.float64)
    targets = torch.ones(4, dtype=torch.long)
    assert ece(probs, targets) == pytest.approx(probs.max(1).values.mean().item())
    assert ece(probs, targets, n_bins=1) == pytest.approx(0.825)


def test_ece_bins_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 0])  # bin (0.9, 1]: acc 0.5 vs 0.95; bin (0.5, 0.6]: acc 1 vs 0.55
    assert ece(probs, targets, n_bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_bad_input():
    with pytest.raises(ValueError, match="probs must be \\(N, C\\) and targets \\(N,\\)"):
        ece(torch.rand(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins must be a positive integer, got 0"):
        ece(torch.rand(3, 2), torch.zeros(3, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="at least one"):
        nll(torch.rand(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one in-distribution"):
        auroc(torch.rand(0), torch.rand(3))
