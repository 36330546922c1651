"""Hyperparameters learned during VI: the ELBO's maximisers in δ and σ, against dense closed forms."""

import math

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.optim import VOGN
from bayesso.optim.empirical_bayes import NoiseEstimate, initialisation_prior, prior_precision_update
from tests.posteriors.test_base import FAMILIES, fitted


def _prior_term(delta, squares, trace, size):
    """E_q[log N(θ | 0, I/δ)] up to constants: (P/2) log δ - (δ/2)(‖μ‖² + tr Σ)."""
    return 0.5 * size * torch.log(delta) - 0.5 * delta * (squares + trace)


@pytest.mark.parametrize("structure", FAMILIES)
def test_covariance_traces_are_the_dense_block_traces(structure):
    posterior, _ = fitted(structure)
    covariance = posterior.covariance_dense()
    expected = torch.stack([covariance[w, w].trace() for w in posterior.block_slices()])
    torch.testing.assert_close(posterior.covariance_traces(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", FAMILIES)
@pytest.mark.parametrize("granularity", ["module", "scalar"])
def test_prior_update_maximises_the_elbo_prior_term(structure, granularity):
    posterior, _ = fitted(structure)
    covariance, mean = posterior.covariance_dense(), posterior.mean()
    learned = prior_precision_update(posterior, granularity)
    blocks = posterior.block_slices()
    squares = torch.stack([mean[w].square().sum() for w in blocks])
    traces = torch.stack([covariance[w, w].trace() for w in blocks])
    sizes = torch.tensor([float(w.stop - w.start) for w in blocks], dtype=torch.float64)
    if granularity == "scalar":
        assert torch.all(learned == learned[0])
        squares, traces, sizes, learned = squares.sum(), traces.sum(), sizes.sum(), learned[:1]
    delta = learned.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(_prior_term(delta, squares, traces, sizes).sum(), delta)
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), atol=1e-8, rtol=0)  # stationary
    for factor in (0.5, 2.0):  # and a maximum: concave in δ
        assert torch.all(
            _prior_term(learned * factor, squares, traces, sizes) < _prior_term(learned, squares, traces, sizes)
        )


def test_initialisation_prior_matches_the_weights_spread():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 2))
    model = BayesianModel(net, "classification")
    prior = initialisation_prior(model.posterior)
    for value, plan in zip(prior, model.posterior.plans):
        weights = torch.cat([p.detach().flatten() for p in plan.parameters])
        assert math.isclose(float(value), weights.numel() / float(weights.square().sum()), rel_tol=1e-6)
    with torch.no_grad():
        net[2].weight.zero_(), net[2].bias.zero_()
    pooled = initialisation_prior(model.posterior)
    assert math.isclose(float(pooled[1]), float(pooled[0]), rel_tol=1e-6)  # pooled over the blocks with weights
    with torch.no_grad():
        net[0].weight.zero_(), net[0].bias.zero_()
    with pytest.raises(ValueError, match="every covered weight is zero"):
        initialisation_prior(model.posterior)


def test_vi_learns_the_prior_after_every_step_and_can_start_from_the_initialisation_prior():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = BayesianModel(net, "classification", dataset_size=200)
    optimizer = VOGN(model, prior_precision="initialisation", learn_prior="module")
    expected_start = initialisation_prior(model.posterior)
    torch.testing.assert_close(model.posterior.prior_precision, expected_start)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    learned = model.posterior.prior_precision.clone()
    model.posterior.prior_precision = expected_start  # the EM step uses tr Σ under the step's starting δ
    torch.testing.assert_close(learned, prior_precision_update(model.posterior, "module"), rtol=1e-6, atol=0)
    assert not torch.allclose(learned, expected_start)
    with pytest.raises(ValueError, match="learn_prior must be 'module', 'scalar' or None, got 'layer'"):
        VOGN(model, learn_prior="layer")


def test_noise_estimate_is_an_ema_of_mean_squared_residuals():
    estimate = NoiseEstimate(beta=0.9)
    assert estimate.update() is None
    estimate.add(8.0, 2)
    estimate.add(4.0, 2)
    assert math.isclose(estimate.update(), math.sqrt(3.0))  # the first batch sets σ² = 12 / 4
    estimate.add(1.0, 1)
    assert math.isclose(estimate.update(), math.sqrt(0.9 * 3.0 + 0.1 * 1.0))
    estimate.add(5.0, 1)
    estimate.discard()
    assert math.isclose(estimate.update(), math.sqrt(2.8))  # discarded batches do not count
    estimate.add(float("nan"), 1)
    with pytest.raises(FloatingPointError, match="not finite"):
        estimate.update()
    assert math.isclose(estimate.variance, 2.8)
