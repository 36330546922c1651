"""Likelihoods against torch.distributions, autograd and torch.func."""

import math

import pytest
import torch
from torch.func import hessian

from bayesso.likelihoods import Binary, Classification, Heteroscedastic, Regression, get_likelihood
from tests.dense import natural_ggn, natural_loss, to_natural

TOL = dict(rtol=1e-10, atol=1e-12)


def data(name, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if name == "classification":
        f = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
        return Classification(), f, torch.randint(0, 4, (batch,), generator=gen)
    if name == "binary":
        f = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
        return Binary(), f, torch.randint(0, 2, (batch,), generator=gen).double()
    if name.startswith("heteroscedastic"):  # D = 3 targets, or 1 for "heteroscedastic_1d"
        d = 1 if name.endswith("1d") else 3
        f = torch.randn(batch, 2 * d, generator=gen, dtype=torch.float64)
        return Heteroscedastic(), f, torch.randn(batch, d, generator=gen, dtype=torch.float64)
    f = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
    return Regression(sigma=0.6), f, torch.randn(batch, 3, generator=gen, dtype=torch.float64)


def distribution(likelihood, f):
    if isinstance(likelihood, Classification):
        return torch.distributions.Categorical(logits=f)
    if isinstance(likelihood, Binary):
        return torch.distributions.Bernoulli(logits=f.reshape(-1))
    if isinstance(likelihood, Heteroscedastic):  # f = (means, log-variances), each (B, D)
        d = f.shape[1] // 2
        return torch.distributions.Normal(f[:, :d], (f[:, d:] / 2).exp())
    return torch.distributions.Normal(f, likelihood.sigma)


NAMES = ["classification", "binary", "regression", "heteroscedastic", "heteroscedastic_1d"]


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


@pytest.mark.parametrize("name", ["classification", "binary", "regression"])  # their Hessians do not depend on y
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


def _hessian_of_one_example(likelihood, fi, yi):
    return hessian(lambda f: likelihood.nll(f.unsqueeze(0), yi.unsqueeze(0)))(fi)


@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic_1d"])
def test_heteroscedastic_hessian_sqrt_is_the_expected_hessian_and_the_fisher(name):
    likelihood, f, _ = data(name)
    d = f.shape[1] // 2
    mean, std = f[:, :d], (f[:, d:] / 2).exp()
    # Each entry of the Hessian is a polynomial of degree <= 2 in one y_d: 3-point Gauss-Hermite is exact.
    nodes, weights = [0.0, math.sqrt(3), -math.sqrt(3)], [2 / 3, 1 / 6, 1 / 6]
    expected = sum(
        w * torch.stack([_hessian_of_one_example(likelihood, fi, yi) for fi, yi in zip(f, mean + z * std)])
        for z, w in zip(nodes, weights)
    )
    root = likelihood.hessian_sqrt(f)
    torch.testing.assert_close(root @ root.transpose(1, 2), expected, **TOL)
    fisher = torch.diag_embed(torch.cat([(-f[:, d:]).exp(), torch.full_like(f[:, d:], 0.5)], dim=1))
    torch.testing.assert_close(likelihood.hessian(f), fisher, **TOL)


@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic_1d"])
def test_heteroscedastic_fisher_is_the_ggn_through_the_natural_parameters(name):
    likelihood, f, y = data(name)
    for fi, yi in zip(f, y):  # the natural-parameter loss is the same NLL, convex in η
        nll = likelihood.nll(fi.unsqueeze(0), yi.unsqueeze(0))
        torch.testing.assert_close(natural_loss(to_natural(fi), yi), nll, **TOL)
    ggn = torch.stack([natural_ggn(fi, yi) for fi, yi in zip(f, y)])
    torch.testing.assert_close(likelihood.hessian(f), ggn, **TOL)


@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic_1d"])
def test_heteroscedastic_samples_have_the_predicted_variance(name):
    likelihood, f, _ = data(name, batch=3)
    n = 20000
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([likelihood.sample(f, gen) for _ in range(n)])
    variance = (f[:, f.shape[1] // 2 :]).exp()
    assert draws.shape == (n, 3, f.shape[1] // 2)
    assert ((draws.var(0) - variance).abs() < 5 * variance * math.sqrt(2 / n)).all()


def test_heteroscedastic_bad_inputs_name_the_shapes():
    likelihood = get_likelihood("heteroscedastic")
    assert isinstance(likelihood, Heteroscedastic) and likelihood.name == "heteroscedastic"
    f, y = torch.zeros(4, 6), torch.zeros(4, 3)
    likelihood.check(f, y)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, D\), got \(4,\) \(add the target dimension"):
        likelihood.check_targets(torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(B, D\) = \(4, 3\) for outputs \(B, 2D\) = \(4, 6\), got \(4, 2\)"):
        likelihood.check(f, torch.zeros(4, 2))
    with pytest.raises(
        ValueError, match=r"outputs must have shape \(B, 2D\): D means, then D log-variances, got \(4, 5\)"
    ):
        likelihood.check(torch.zeros(4, 5), y)
    with pytest.raises(ValueError, match=r"outputs must have shape \(B, 2D\).*got \(4, 3, 2\)"):
        likelihood.check(torch.zeros(4, 3, 2), y)
    with pytest.raises(ValueError, match=r"got \(4, 5\)"):
        likelihood.nll(torch.zeros(4, 5), y)
    with pytest.raises(ValueError, match="batch size 3 but the model outputs have batch size 4"):
        likelihood.check(f, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="heteroscedastic targets must be floating point"):
        likelihood.check_targets(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="heteroscedastic targets must be finite"):
        likelihood.check_targets(torch.tensor([[0.0], [math.nan]]))
