"""Monte Carlo predictive: probabilities averaged over samples; regression variance split."""

import pytest
import torch

from tests.cases import fitted_bayesian_model


def test_mc_predict_averages_probabilities_not_logits():
    model, x, _ = fitted_bayesian_model()
    predictive = model.predict(x, n_samples=8, generator=torch.Generator().manual_seed(0), keep_samples=True)
    gen = torch.Generator().manual_seed(0)
    logits = []
    for _ in range(8):
        with model.sample_parameters(gen), torch.no_grad():
            logits.append(model.module(x))
    logits = torch.stack(logits).float()
    torch.testing.assert_close(predictive.probs, torch.softmax(logits, -1).mean(0))
    assert not torch.allclose(predictive.probs, torch.softmax(logits.mean(0), -1))
    assert predictive.samples.shape == (8, 8, 3)
    torch.testing.assert_close(predictive.probs.sum(-1), torch.ones(8))


def test_regression_predictive_splits_aleatoric_and_epistemic_variance():
    model, x, _ = fitted_bayesian_model("full", "mlp_regression")
    predictive = model.predict(x, n_samples=16, generator=torch.Generator().manual_seed(0), keep_samples=True)
    torch.testing.assert_close(predictive.aleatoric, torch.full((8, 2), 0.7**2))
    torch.testing.assert_close(predictive.epistemic, predictive.samples.var(0, unbiased=False))
    torch.testing.assert_close(predictive.variance, predictive.aleatoric + predictive.epistemic)
    torch.testing.assert_close(predictive.mean, predictive.samples.mean(0))


def test_binary_predictive_and_bad_arguments():
    model, x, _ = fitted_bayesian_model("diag", "mlp_binary")
    predictive = model.predict(x, n_samples=4)
    assert predictive.probs.shape == (8,) and ((predictive.probs > 0) & (predictive.probs < 1)).all()
    with pytest.raises(ValueError, match="variance is defined for regression"):
        _ = predictive.variance
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        model.predict(x, n_samples=0)
    with pytest.raises(ValueError, match="method must be 'mc', got 'laplace'"):
        model.predict(x, method="laplace")
