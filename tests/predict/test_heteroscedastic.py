"""Heteroscedastic regression through fit, the predictives and the metrics (float64).

References are plain moments of the drawn outputs, dense Jacobians and the lognormal mean.
"""

import math

import pytest
import scipy.stats
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.data import make_loader
from bayesso.likelihoods import Heteroscedastic, Likelihood
from bayesso.predict.metrics import evaluate
from bayesso.predict.predictive import DrawAverage
from tests.cases import fitted_bayesian_model
from tests.dense import jacobians, posterior_index

CASE = "mlp_heteroscedastic"  # outputs (B, 4): D = 2 means, then 2 log-variances
TOL = dict(rtol=1e-10, atol=1e-12)


def _outputs(model: BayesianModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        f = model.module(x)
    return f[:, :2], f[:, 2:]


def _dense_output_covariance(model: BayesianModel, x: torch.Tensor) -> torch.Tensor:
    J = jacobians(model.module, x)[:, :, posterior_index(model.posterior)]
    return J @ model.posterior.covariance_dense() @ J.transpose(1, 2)


def test_draw_average_splits_means_and_log_variances():
    draws = torch.randn(10, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    average = DrawAverage(Heteroscedastic(), keep_samples=True)
    for chunk in draws.split(3):
        average.add(chunk)
    result = average.result()
    means, log_variances = draws[..., :3], draws[..., 3:]
    torch.testing.assert_close(result.mean, means.mean(0), **TOL)
    torch.testing.assert_close(result.epistemic, means.var(0, unbiased=False), **TOL)
    torch.testing.assert_close(result.aleatoric, log_variances.exp().mean(0), **TOL)
    torch.testing.assert_close(result.variance, result.aleatoric + result.epistemic, **TOL)
    torch.testing.assert_close(result.samples, draws, rtol=0, atol=0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_mc_without_weight_variance_has_aleatoric_e_to_the_s_and_no_epistemic(vectorize):
    model, x, _ = fitted_bayesian_model("kron", CASE)
    model.posterior.deterministic = {plan.name for plan in model.posterior.plans}
    predictive = model.predict(x, n_samples=5, vectorize=vectorize, generator=torch.Generator().manual_seed(0))
    means, log_variances = _outputs(model, x)
    torch.testing.assert_close(predictive.mean, means, **TOL)
    torch.testing.assert_close(predictive.aleatoric, log_variances.exp(), **TOL)
    torch.testing.assert_close(predictive.epistemic, torch.zeros_like(means), rtol=0, atol=1e-12)
    assert predictive.samples is None and predictive.probs is None


def test_mc_moments_are_those_of_the_drawn_means_and_variances():
    model, x, _ = fitted_bayesian_model("full", CASE)
    predictive = model.predict(x, n_samples=16, generator=torch.Generator().manual_seed(0), keep_samples=True)
    assert predictive.samples.shape == (16, 8, 4)
    means, log_variances = predictive.samples[..., :2], predictive.samples[..., 2:]
    torch.testing.assert_close(predictive.mean, means.mean(0), **TOL)
    torch.testing.assert_close(predictive.epistemic, means.var(0, unbiased=False), **TOL)
    torch.testing.assert_close(predictive.aleatoric, log_variances.exp().mean(0), **TOL)
    torch.testing.assert_close(predictive.variance, predictive.aleatoric + predictive.epistemic, **TOL)
    assert (predictive.epistemic > 0).all()


@pytest.mark.parametrize("keep_samples", [False, True])
@pytest.mark.parametrize("structure", ["diag", "kron", "full", "mixed"])
def test_linearized_epistemic_is_the_mean_block_of_j_sigma_jt_and_aleatoric_the_lognormal_mean(structure, keep_samples):
    model, x, _ = fitted_bayesian_model(structure, CASE)
    gen = torch.Generator().manual_seed(0)
    predictive = model.predict(x, n_samples=3, method="linearized", generator=gen, keep_samples=keep_samples)
    covariance = _dense_output_covariance(model, x)  # over all 4 outputs (μ, s)
    variance = covariance.diagonal(dim1=1, dim2=2)
    means, log_variances = _outputs(model, x)
    torch.testing.assert_close(predictive.output_covariance, covariance, **TOL)
    torch.testing.assert_close(predictive.mean, means, **TOL)
    torch.testing.assert_close(predictive.epistemic, variance[:, :2], **TOL)
    # E[e^s] for s ~ N(s̄, v) is exp(s̄ + v/2): scipy's lognormal has shape v^½ and scale e^s̄
    lognormal = scipy.stats.lognorm(variance[:, 2:].sqrt().numpy(), scale=log_variances.exp().numpy()).mean()
    torch.testing.assert_close(predictive.aleatoric, torch.from_numpy(lognormal), **TOL)
    assert (predictive.aleatoric > log_variances.exp()).all()  # weight uncertainty in s raises the expected noise
    assert (predictive.samples is not None) == keep_samples
    if keep_samples:
        assert predictive.samples.shape == (3, 8, 4)


def test_linearized_aleatoric_is_the_mean_of_e_to_the_s_over_drawn_outputs():
    model, x, _ = fitted_bayesian_model("full", CASE)
    n = 20000
    gen = torch.Generator().manual_seed(1)
    predictive = model.predict(x, n_samples=n, method="linearized", generator=gen, keep_samples=True)
    noise = predictive.samples[..., 2:].exp()
    standard_error = noise.std(0) / math.sqrt(n)
    assert ((noise.mean(0) - predictive.aleatoric).abs() < 5 * standard_error).all()
    spread = predictive.samples[..., :2].var(0)  # the drawn means' variance is the epistemic part
    assert ((spread - predictive.epistemic).abs() < 5 * predictive.epistemic * math.sqrt(2 / n)).all()


def test_probit_refuses_heteroscedastic_and_predictives_refuse_unknown_likelihoods():
    model, x, _ = fitted_bayesian_model("diag", CASE)
    with pytest.raises(ValueError, match="method='probit' is for classification and binary likelihoods, got Het"):
        model.predict(x, method="probit")

    class Unknown(Likelihood):
        name = "unknown"
        _check = nll = gradient = sample = hessian_sqrt = staticmethod(lambda *args: None)

    model.likelihood = Unknown()
    for method in ("mc", "linearized"):
        with pytest.raises(ValueError, match="predictives support the Classification, .* got Unknown"):
            model.predict(x, method=method)


def test_evaluate_gives_rmse_and_the_gaussian_nll_of_the_total_variance():
    model, x, y = fitted_bayesian_model("full", CASE)
    metrics = evaluate(model, [(x[:5], y[:5]), (x[5:], y[5:])], method="linearized")
    predictive = model.predict(x, method="linearized")
    assert metrics["rmse"] == pytest.approx((predictive.mean - y).square().mean().sqrt().item(), rel=1e-10)
    density = scipy.stats.norm(predictive.mean.numpy(), predictive.variance.sqrt().numpy()).logpdf(y.numpy())
    assert metrics["nll"] == pytest.approx(-density.sum(1).mean(), rel=1e-10)
    with pytest.raises(ValueError, match=r"\(B, D\) = \(8, 2\) for outputs \(B, 2D\) = \(8, 4\), got \(8, 1\)"):
        evaluate(model, [(x, y[:, :1])], method="linearized")


def _noisy_line(n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + 0.1 (1 + |x|) ε on x ~ U(-3, 3): the noise grows with |x|."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 6 - 3
    return x, x + 0.1 * (1 + x.abs()) * torch.randn(n, 1, generator=gen, dtype=torch.float64)


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 2)).double()


def test_end_to_end_the_predicted_noise_tracks_the_true_noise(tmp_path):
    x, y = _noisy_line()
    torch.manual_seed(0)
    model = BayesianModel(_network(), "heteroscedastic", "kron")  # the defaults: δ = 1, τ = 1
    model.fit(make_loader(x, y, 50, seed=0), method="noisy_kfac", epochs=20, progress=False)
    x_test = torch.tensor([[-2.5], [-1.5], [0.0], [1.5], [2.5]], dtype=torch.float64)
    true_std = 0.1 * (1 + x_test.abs())
    predictive = model.predict(x_test, n_samples=64, generator=torch.Generator().manual_seed(0))
    std = predictive.aleatoric.sqrt()
    assert ((std / true_std > 0.7) & (std / true_std < 1.8)).all(), std  # the tanh net rounds the kink at x = 0
    assert std[[0, 4]].min() > 1.8 * std[2], std  # truly 3.5x; a homoscedastic model predicts 1x
    assert (predictive.epistemic < predictive.aleatoric).all()
    assert (predictive.mean - x_test).abs().max() < 0.2

    model.fit_laplace(make_loader(x, y, 100, shuffle=False), progress=False)
    tuned = model.optimize_prior_precision()
    assert math.isfinite(tuned["log_marginal_likelihood"]) and tuned["sigma"] is None
    linearized = model.predict(x_test, method="linearized")
    for value in (linearized.mean, linearized.aleatoric, linearized.epistemic):
        assert value.shape == (5, 1) and torch.isfinite(value).all()
    assert (linearized.epistemic > 0).all() and linearized.aleatoric.sqrt()[[0, 4]].min() > 1.8 * std[2]

    model.save(tmp_path / "model.pt")
    loaded = BayesianModel.load(tmp_path / "model.pt", _network())
    assert isinstance(loaded.likelihood, Heteroscedastic)
    again = loaded.predict(x_test, method="linearized")
    torch.testing.assert_close(again.aleatoric, linearized.aleatoric, **TOL)
    torch.testing.assert_close(again.epistemic, linearized.epistemic, **TOL)


@pytest.mark.parametrize(
    "method, structure, options",
    [
        ("vogn", "diag", {}),
        ("noisy_adam", "diag", {}),
        ("noisy_kfac", "kron", {}),
        ("ivon", "diag", {}),
    ],
)
def test_every_vi_method_fits_heteroscedastic_data(method, structure, options):
    x, y = _noisy_line(200)  # at the presets' defaults: without their trust region, noisy Adam and IVON went
    torch.manual_seed(0)  # non-finite within 2 steps here (the log-variance's gradient is unbounded)
    model = BayesianModel(_network(), "heteroscedastic", structure)
    history = model.fit(make_loader(x, y, 50, seed=0), method=method, epochs=5, progress=False, **options)
    assert history[-1]["loss"] < history[0]["loss"]
    predictive = model.predict(x[:10], n_samples=8, generator=torch.Generator().manual_seed(0))
    assert predictive.mean.shape == predictive.aleatoric.shape == predictive.epistemic.shape == (10, 1)
    assert torch.isfinite(predictive.variance).all() and (predictive.aleatoric > 0).all()
