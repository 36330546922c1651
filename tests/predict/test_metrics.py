"""Metrics against torchmetrics, scikit-learn and SciPy on random inputs, and synthetic cases with known answers."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score, roc_curve
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from bayesso import BayesianModel
from bayesso.data import make_loader
from bayesso.predict.metrics import (
    accuracy,
    auroc,
    brier,
    calibration_bins,
    classification_metrics,
    classwise_ece,
    ece,
    evaluate,
    fpr_at_95_tpr,
    mce,
    mutual_information,
    nll,
    predictive_entropy,
)
from tests.cases import fitted_bayesian_model


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
    assert accuracy(probs, targets) == pytest.approx(accuracy_score(targets.numpy(), probs.argmax(1).numpy()))
    per_class = [brier_score_loss(targets.numpy() == k, probs[:, k].numpy()) for k in range(4)]
    assert brier(probs, targets) == pytest.approx(sum(per_class), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_bins", [15, 7])
def test_calibration_errors_against_torchmetrics(seed, n_bins):
    probs, targets = random_predictions(seed=seed)
    for norm, ours in [("l1", ece), ("max", mce)]:
        theirs = multiclass_calibration_error(probs, targets, num_classes=4, n_bins=n_bins, norm=norm)
        assert ours(probs, targets, n_bins) == pytest.approx(theirs.item(), rel=1e-6)
    per_class = [
        binary_calibration_error(probs[:, k].contiguous(), (targets == k).long(), n_bins=n_bins) for k in range(4)
    ]
    assert classwise_ece(probs, targets, n_bins) == pytest.approx(torch.stack(per_class).mean().item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_fpr_at_95_tpr_against_scikit_learn(seed):
    gen = torch.Generator().manual_seed(seed)
    for scores_in, scores_out in [
        (torch.randn(301, generator=gen), torch.randn(250, generator=gen) - 1),
        (torch.randint(0, 8, (200,), generator=gen).double(), torch.randint(0, 6, (150,), generator=gen).double()),
    ]:
        labels = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
        fpr, tpr, _ = roc_curve(labels, np.r_[scores_in.numpy(), scores_out.numpy()], drop_intermediate=False)
        expected = fpr[np.searchsorted(tpr, 0.95, side="left")]
        assert fpr_at_95_tpr(scores_in, scores_out) == pytest.approx(expected, rel=1e-12)


def test_entropies_against_scipy_and_known_cases():
    probs, _ = random_predictions(n=50)
    expected = scipy.stats.entropy(probs.numpy(), axis=1)
    np.testing.assert_allclose(predictive_entropy(probs).numpy(), expected, rtol=1e-12)
    assert predictive_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist() == pytest.approx([0.0, math.log(2)])
    same = probs.expand(6, 50, 4)
    assert mutual_information(same).abs().max() < 1e-12  # every sample agrees: nothing epistemic
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident samples that contradict each other
    assert mutual_information(disagree).item() == pytest.approx(math.log(2))
    samples = torch.softmax(torch.randn(5, 20, 3, dtype=torch.float64), -1)
    mean_entropy = np.mean([scipy.stats.entropy(s.numpy(), axis=1) for s in samples], axis=0)
    expected = scipy.stats.entropy(samples.mean(0).numpy(), axis=1) - mean_entropy
    np.testing.assert_allclose(mutual_information(samples).numpy(), expected, rtol=1e-10)


def test_calibration_bins_and_mce_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 0])
    count, confidence, acc = calibration_bins(probs, targets, n_bins=10)
    assert count.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert confidence[5].item() == pytest.approx(0.55) and acc[9].item() == 0.5 and math.isnan(acc[0].item())
    assert mce(probs, targets, n_bins=10) == pytest.approx(0.45)


def test_classification_metrics_for_binary_probabilities_and_ood():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(100, generator=gen, dtype=torch.float64)
    y = (torch.rand(100, generator=gen, dtype=torch.float64) < p).long()
    ood = torch.full((40,), 0.5, dtype=torch.float64)
    metrics = classification_metrics(p, y, ood_probs=ood)
    two = torch.stack([1 - p, p], 1)
    assert metrics["nll"] == pytest.approx(log_loss(y.numpy(), p.numpy()), rel=1e-12)
    assert metrics["ece"] == pytest.approx(ece(two, y))
    assert metrics["auroc"] == pytest.approx(1.0)  # every in-distribution confidence exceeds 0.5 (a.s.)
    assert metrics["fpr_at_95_tpr"] == 0.0
    assert set(metrics) == {"accuracy", "nll", "brier", "ece", "mce", "classwise_ece", "auroc", "auroc_entropy",
                            "fpr_at_95_tpr"}  # fmt: skip


def test_evaluate_collects_batches_and_ood_inputs():
    model, x, y = fitted_bayesian_model("kron", "mlp")
    loader = make_loader(x, y, 3, shuffle=False)
    metrics = evaluate(model, loader, n_samples=4, ood_loader=[x[:5] * 3], generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # the same draws, batch by batch, then the OOD batch
    probs = torch.cat([model.predict(xb, n_samples=4, generator=gen).probs for xb, _ in loader])
    ood = model.predict(x[:5] * 3, n_samples=4, generator=gen).probs
    assert metrics == classification_metrics(probs, y, ood)
    probit = evaluate(model, [(x, y)], method="probit")
    assert probit == classification_metrics(model.predict(x, method="probit").probs, y)


def test_evaluate_regression_gives_rmse_and_gaussian_nll():
    model, x, y = fitted_bayesian_model("full", "mlp_regression")
    metrics = evaluate(model, [(x[:5], y[:5]), (x[5:], y[5:])], method="linearized")
    predictive = model.predict(x, method="linearized")
    assert metrics["rmse"] == pytest.approx((predictive.mean - y).square().mean().sqrt().item(), rel=1e-10)
    density = scipy.stats.norm(predictive.mean.numpy(), predictive.variance.sqrt().numpy()).logpdf(y.numpy())
    assert metrics["nll"] == pytest.approx(-density.sum(1).mean(), rel=1e-10)


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
    with pytest.raises(ValueError, match="probs contain non-finite values"):
        ece(torch.tensor([[float("nan"), 0.5]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_95_tpr(torch.rand(3), torch.rand(3), tpr=0.0)
    with pytest.raises(ValueError, match=r"samples must be per-sample probabilities \(S, N, C\)"):
        mutual_information(torch.rand(3, 2))
    model = BayesianModel(torch.nn.Linear(2, 2), "classification", dataset_size=3)
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        evaluate(model, [])
