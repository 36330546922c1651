"""Monte Carlo predictive: vectorised and looped forwards agree, probabilities (not logits) are averaged."""

import logging

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.likelihoods import Heteroscedastic
from bayesso.predict import mc_predictive
from tests.cases import CASES, fitted_bayesian_model


def _looped(model: BayesianModel, x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Outputs (n, B, ...) at the same noise mc_predictive draws, one forward per sample."""
    noise, _ = model.posterior.sample_noise(n, torch.Generator().manual_seed(seed))
    outputs = []
    for row in noise:
        with model.posterior.perturbed(row), torch.no_grad():
            outputs.append(model.module(x))
    return torch.stack(outputs)


@pytest.mark.filterwarnings("ignore:module 'fc' \\(Linear\\) was not called")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("vectorize", [True, False])
def test_vectorised_and_looped_samples_equal_forwards_of_perturbed_modules(case, vectorize):
    model, x, _ = fitted_bayesian_model("kron", case.name)
    gen = torch.Generator().manual_seed(0)
    predictive = mc_predictive(model, x, 6, gen, keep_samples=True, vectorize=vectorize)
    outputs = _looped(model, x, 6, seed=0)
    if predictive.probs is not None and predictive.probs.ndim == 2:
        torch.testing.assert_close(predictive.samples, torch.softmax(outputs, -1))
    elif predictive.probs is not None:
        torch.testing.assert_close(predictive.samples, torch.sigmoid(outputs.squeeze(-1)))
    else:
        torch.testing.assert_close(predictive.samples, outputs)
    mean = predictive.samples.mean(0)
    if isinstance(case.likelihood, Heteroscedastic):  # the samples are the outputs: means, then log-variances
        mean = mean[:, : mean.shape[1] // 2]
    torch.testing.assert_close(predictive.probs if predictive.probs is not None else predictive.mean, mean)


def test_averages_probabilities_not_logits():
    model, x, _ = fitted_bayesian_model()
    predictive = model.predict(x, method="mc", n_samples=8, generator=torch.Generator().manual_seed(0))
    logits = _looped(model, x, 8, seed=0)
    torch.testing.assert_close(predictive.probs, torch.softmax(logits, -1).mean(0))
    assert not torch.allclose(predictive.probs, torch.softmax(logits.mean(0), -1))
    torch.testing.assert_close(predictive.probs.sum(-1), torch.ones(8, dtype=torch.float64))


def test_regression_splits_aleatoric_and_epistemic_variance():
    model, x, _ = fitted_bayesian_model("full", "mlp_regression")
    predictive = model.predict(x, n_samples=16, generator=torch.Generator().manual_seed(0), keep_samples=True)
    torch.testing.assert_close(predictive.aleatoric, torch.full((8, 2), 0.7**2, dtype=torch.float64))
    torch.testing.assert_close(predictive.epistemic, predictive.samples.var(0, unbiased=False))
    torch.testing.assert_close(predictive.variance, predictive.aleatoric + predictive.epistemic)
    torch.testing.assert_close(predictive.mean, predictive.samples.mean(0))


def test_chunks_cover_every_sample_and_a_generator_reproduces_them():
    model, x, _ = fitted_bayesian_model("diag", "conv2d")
    chunked = mc_predictive(model, x, 8, torch.Generator().manual_seed(5), True, chunk_size=3, vectorize=True)
    assert chunked.samples.shape == (8, 8, 3)
    torch.testing.assert_close(chunked.probs, chunked.samples.mean(0))
    again = mc_predictive(model, x, 8, torch.Generator().manual_seed(5), True, chunk_size=3, vectorize=True)
    torch.testing.assert_close(again.samples, chunked.samples, rtol=0, atol=0)
    other = mc_predictive(model, x, 8, torch.Generator().manual_seed(6), chunk_size=3, vectorize=True)
    assert not torch.allclose(other.probs, chunked.probs)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: vmap cannot trace it, the loop can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        out = self.fc(x)
        return out if out.sum() > -1e9 else -out


def test_models_vmap_cannot_run_fall_back_to_a_loop(caplog):
    torch.manual_seed(0)
    model = BayesianModel(DataDependent().double(), "classification", "diag", prior_precision=4.0, dataset_size=3)
    x = torch.randn(5, 3, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="bayesso.predict.monte_carlo"):
        predictive = model.predict(
            x, method="mc", n_samples=4, generator=torch.Generator().manual_seed(2), vectorize=True
        )
    assert "using a loop over samples" in caplog.text
    torch.testing.assert_close(predictive.probs, torch.softmax(_looped(model, x, 4, seed=2), -1).mean(0))


def test_half_precision_models_predict_in_float32():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(torch.bfloat16)
    model = BayesianModel(module, "classification", "diag", dataset_size=10)
    predictive = model.predict(torch.randn(2, 3, dtype=torch.bfloat16), n_samples=3, method="mc")
    assert predictive.probs.dtype == torch.float32
    torch.testing.assert_close(predictive.probs.sum(1), torch.ones(2))


@pytest.mark.parametrize("method", ["mc", "linearized"])
def test_binary_predictive_of_one_example_keeps_its_batch_dimension(method):
    torch.manual_seed(0)
    model = BayesianModel(nn.Linear(3, 1), "binary", dataset_size=10)
    probs = model.predict(torch.randn(1, 3), n_samples=4, method=method).probs
    assert probs.shape == (1,) and 0 < float(probs[0]) < 1
