"""PosteriorGuide with PyroBayesianModel: Pyro's Predictive and Trace_ELBO on bayesso posteriors."""

import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO

from bayesso import BayesianModel
from bayesso.data import make_loader
from bayesso.pyro import PosteriorGuide, PyroBayesianModel
from tests.cases import CASES_BY_NAME, fitted_bayesian_model

STRUCTURES = ["diag", "kron", "full", "mixed"]


@pytest.mark.parametrize("name", ["mlp", "mlp_binary"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive_equals_mc_prediction_for_the_same_noise(structure, name):
    model, x, _ = fitted_bayesian_model(structure, name)
    guide = PosteriorGuide(model, generator=torch.Generator().manual_seed(3))
    calls = []

    def counted(*args):
        calls.append(1)
        return guide(*args)

    predictive = Predictive(PyroBayesianModel(model), guide=counted, num_samples=5, return_sites=["probs", "2.bias"])
    result = predictive(x)
    probs = result["probs"].mean(0)
    generator = torch.Generator().manual_seed(3)
    for _ in range(len(calls) - 5):  # Predictive first runs the guide to find its plates and sites (twice in 1.9)
        torch.randn(model.posterior.numel, dtype=model.posterior.dtype, generator=generator)
    state = generator.get_state()
    expected = model.predict(x, n_samples=5, method="mc", generator=generator, chunk_size=1)
    generator.set_state(state)
    biases = torch.stack([model.posterior.sample(1, generator)[0][-len(model.module[2].bias) :] for _ in range(5)])
    torch.testing.assert_close(result["2.bias"].reshape(5, -1), biases, rtol=0, atol=0)
    torch.testing.assert_close(probs, expected.probs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_the_guide_draws_the_posteriors_samples(structure):
    model, x, _ = fitted_bayesian_model(structure, "conv2d")
    trace = poutine.trace(PosteriorGuide(model, generator=torch.Generator().manual_seed(0))).get_trace(x)
    names = {id(p): n for n, p in model.module.named_parameters()}
    drawn = torch.cat([trace.nodes[names[id(p)]]["value"].reshape(-1) for p in model.posterior.parameters])
    torch.testing.assert_close(drawn, model.posterior.sample(1, torch.Generator().manual_seed(0))[0], rtol=0, atol=0)


def _elbo_terms(model: BayesianModel, x, y, thetas):
    """Per sample θ: the tempered, rescaled log-likelihood, log p(θ) and log q(θ), from bayesso alone."""
    posterior, likelihood = model.posterior, model.likelihood
    q = posterior.distribution()
    scale = posterior.dataset_size / (len(y) * posterior.temperature)
    terms = []
    for theta in thetas:
        with posterior.perturbed(theta - posterior.mean()), torch.no_grad():
            log_likelihood = -likelihood.nll(model.module(x), y)
        log_prior = sum(
            torch.distributions.Normal(0.0, delta.rsqrt()).log_prob(theta[where]).sum()
            for delta, where in zip(posterior.prior_precision, posterior.block_slices())
        )
        terms.append((scale * log_likelihood, log_prior, q.log_prob(theta)))
    return terms


@pytest.mark.parametrize("structure", STRUCTURES)
def test_trace_elbo_is_bayessos_elbo_sample_by_sample(structure):
    model, x, y = fitted_bayesian_model(structure, "mlp_regression")
    model.posterior.temperature = 0.5
    generator = torch.Generator().manual_seed(1)
    guide = PosteriorGuide(model, generator=generator)
    loss = Trace_ELBO(num_particles=4).loss(PyroBayesianModel(model), guide, x, y)
    generator.manual_seed(1)
    thetas = [model.posterior.sample(1, generator)[0] for _ in range(4)]
    elbo = sum(a + b - c for a, b, c in _elbo_terms(model, x, y, thetas)) / 4
    assert loss == pytest.approx(-float(elbo), rel=1e-10)


def test_trace_elbo_of_a_laplace_posterior_is_the_expected_log_likelihood_minus_the_kl():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=16)
    model = BayesianModel(module, case.likelihood, "kron", prior_precision=2.0)
    model.fit_laplace(make_loader(x, y, 8, shuffle=False), progress=False)
    guide = PosteriorGuide(model, generator=torch.Generator().manual_seed(2))
    n = 400
    loss = Trace_ELBO(num_particles=n).loss(PyroBayesianModel(model), guide, x, y)
    thetas = model.posterior.sample(n, torch.Generator().manual_seed(5))
    terms = _elbo_terms(model, x, y, thetas)
    expected_log_likelihood = torch.stack([t[0] for t in terms]).mean()
    expected = float(expected_log_likelihood - model.posterior.kl_to_prior())
    per_sample = torch.stack([a + b - c for a, b, c in terms])
    spread = float(per_sample.std() / n**0.5)  # two independent estimates of the same mean
    assert abs(-loss - expected) < 5 * 2**0.5 * spread


def test_the_model_keeps_the_module_plain_and_puts_the_prior_on_random_blocks():
    model, x, y = fitted_bayesian_model("kron", "batchnorm")
    model.posterior.deterministic = {"1"}
    model.posterior.prior_precision = {"0": 4.0, "4": 9.0, "5": 1.0, "7": 1.0}
    pyro_model = PyroBayesianModel(model)
    assert type(model.module) is torch.nn.Sequential and type(model.module[0]) is torch.nn.Conv2d
    trace = poutine.trace(pyro_model).get_trace(x, y)
    samples = {n for n, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]} - {"data"}
    assert trace.nodes["obs"]["is_observed"]
    assert samples == {"0.weight", "0.bias", "4.weight", "4.bias", "5.weight", "5.bias", "7.weight", "7.bias"}
    assert (trace.nodes["0.weight"]["fn"].base_dist.scale == 0.5).all()
    torch.testing.assert_close(
        trace.nodes["4.bias"]["fn"].base_dist.scale, torch.full((4,), 1 / 3, dtype=torch.float64)
    )
    torch.testing.assert_close(pyro_model.network[1].weight, model.module[1].weight)  # fixed at the mean


def test_a_likelihood_without_a_pyro_counterpart_is_refused():
    model, _, _ = fitted_bayesian_model("diag", "mlp_heteroscedastic")
    with pytest.raises(ValueError, match="supports the classification, binary and regression likelihoods"):
        PyroBayesianModel(model)
