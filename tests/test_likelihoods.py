"""Likelihoods against torch.distributions, autograd and torch.func."""

import math

import pytest
import torch
from torch.func import hessian

from bayesso.likelihoods import Binary, Classification, Regression, get_likelihood

TOL = dict(rtol=1e-10, atol=1e-12)


def data(name, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if name == "classification":
        f = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
        return Classification(), f, torch.randint(0, 4, (batch,), generator=gen)
    if name == "binary":
        f = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
        return Binary(), f, torch.randint(0, 2, (batch,), generator=gen).double()
    f = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
    return Regression(sigma=0.6), f, torch.randn(batch, 3, generator=gen, dtype=torch.float64)


def distribution(likelihood, f):
    if isinstance(likelihood, Classification):
        return torch.distributions.Categorical(logits=f)
    if isinstance(likelihood, Binary):
        return torch.distributions.Bernoulli(logits=f.reshape(-1))
    return torch.distributions.Normal(f, likelihood.sigma)


NAMES = ["classification", "binary", "regression"]


@pytest.mark.parametrize("name", NAMES)
def test_nll_is_summed_negative_log_probability(name):
    likelihood, f, y = data(name)
    expected = -distribution(likelihood, f).log_prob(y).sum()
    torch.testing.assert_close(likelihood.nll(f, y), expected, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_autograd(name):
    likelihood, f, y = data(name)
    f = f.requires_grad_()
    (expected,) = torch.autograd.grad(likelihood.nll(f, y), f)
    torch.testing.assert_close(likelihood.gradient(f.detach(), y), expected, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_hessian_sqrt_squares_to_the_output_hessian(name):
    likelihood, f, y = data(name)
    expected = torch.stack(
        [hessian(lambda fi, yi=yi: likelihood.nll(fi.unsqueeze(0), yi.unsqueeze(0)))(fi) for fi, yi in zip(f, y)]
    ).reshape(len(f), f[0].numel(), f[0].numel())
    torch.testing.assert_close(likelihood.hessian(f), expected, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_samples_follow_the_predictive(name):
    likelihood, f, _ = data(name, batch=3)
    n = 20000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([likelihood.sample(f, gen) for _ in range(n)]).double()
    dist = distribution(likelihood, f)
    if isinstance(likelihood, Classification):
        freq = torch.nn.functional.one_hot(draws.long(), 4).double().mean(0)
        std = (dist.probs * (1 - dist.probs) / n).sqrt()
        assert ((freq - dist.probs).abs() < 5 * std).all()
    else:
        std = (dist.variance.reshape(draws.shape[1:]) / n).sqrt()
        assert ((draws.mean(0) - dist.mean.reshape(draws.shape[1:])).abs() < 5 * std).all()
    again = likelihood.sample(f, torch.Generator().manual_seed(0))
    assert torch.equal(again, likelihood.sample(f, torch.Generator().manual_seed(0)))


def test_regression_nll_is_differentiable_in_sigma():
    _, f, y = data("regression")
    sigma = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    nll = Regression(sigma).nll(f, y)
    (grad,) = torch.autograd.grad(nll, sigma)
    expected = -((y - f) ** 2).sum() / 0.6**3 + f.numel() / 0.6
    torch.testing.assert_close(grad, expected, **TOL)


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        Regression(sigma)


def test_get_likelihood():
    assert isinstance(get_likelihood("binary"), Binary)
    assert get_likelihood("regression", sigma=2.0).sigma == 2.0
    custom = Regression(0.1)
    assert get_likelihood(custom) is custom
    with pytest.raises(ValueError, match="likelihood must be one of .* got 'gauss'"):
        get_likelihood("gauss")


def test_binary_accepts_flat_or_column_outputs():
    likelihood, f, y = data("binary")
    torch.testing.assert_close(likelihood.nll(f.reshape(-1), y), likelihood.nll(f, y), **TOL)
    with pytest.raises(ValueError, match="one logit per example"):
        likelihood.check(torch.zeros(6, 2), y)
