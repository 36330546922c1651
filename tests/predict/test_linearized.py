"""Linearized (GLM) and probit predictives against dense Jacobians and closed forms (float64)."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.likelihoods import Regression
from bayesso.predict import linearized_outputs
from bayesso.predict.kronecker_outputs import linear_kronecker_covariance
from tests.cases import CASES, fitted_bayesian_model
from tests.dense import jacobians, posterior_index


def _covered_jacobian(model: BayesianModel, x: torch.Tensor) -> torch.Tensor:
    """Dense J (B, O, P) restricted to the posterior's parameters, in its flat order."""
    return jacobians(model.module, x)[:, :, posterior_index(model.posterior)]


@pytest.mark.filterwarnings("ignore:module 'fc' \\(Linear\\) was not called")
@pytest.mark.parametrize("structure", ["diag", "kron", "full", "mixed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_output_covariance_is_j_sigma_jt(case, structure):
    model, x, _ = fitted_bayesian_model(structure, case.name)
    outputs, covariance = linearized_outputs(model, x)
    J = _covered_jacobian(model, x)
    expected = J @ model.posterior.covariance_dense() @ J.transpose(1, 2)
    torch.testing.assert_close(covariance, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(outputs, model.module(x))


def test_output_covariance_of_a_last_layer_posterior_and_one_output_chunk():
    model, x, _ = fitted_bayesian_model("kron", "conv2d")
    last = BayesianModel(
        model.module, "classification", "kron", prior_precision=2.0, dataset_size=30, modules="last_layer"
    )
    _, chunked = linearized_outputs(last, x, output_chunk=1)
    _, whole = linearized_outputs(last, x)
    J = _covered_jacobian(last, x)
    assert J.shape[2] == 4 * 3 + 3
    torch.testing.assert_close(whole, J @ last.posterior.covariance_dense() @ J.transpose(1, 2))
    torch.testing.assert_close(chunked, whole)


def _linear_regression(structure: str, n: int = 40, sigma: float = 0.5, delta: float = 2.0):
    """A Linear(3, 2) model holding the exact Bayesian linear-regression posterior, and that posterior."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 1.5]], dtype=torch.float64) + 0.3
    y = y + sigma * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    phi = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    covariance = torch.linalg.inv(phi.T @ phi / sigma**2 + delta * torch.eye(4, dtype=torch.float64))
    weights = covariance @ phi.T @ y / sigma**2  # (4, 2): one column per output
    module = nn.Linear(3, 2).double()
    with torch.no_grad():
        module.weight.copy_(weights[:3].T)
        module.bias.copy_(weights[3])
    model = BayesianModel(module, Regression(sigma), structure, prior_precision=delta, dataset_size=n)
    curvature = CurvatureEngine(module, model.likelihood, "ggn", structure).compute(x, y)
    model.posterior.update_statistic(curvature * (1 / n))
    return model, covariance, weights


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_linearized_predictive_is_the_exact_predictive_of_bayesian_linear_regression(structure):
    model, covariance, weights = _linear_regression(structure)
    x_new = torch.linspace(-2, 2, 15, dtype=torch.float64).reshape(5, 3)
    phi = torch.cat([x_new, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    predictive = model.predict(x_new, method="linearized")
    torch.testing.assert_close(predictive.mean, phi @ weights)
    exact_epistemic = ((phi @ covariance) * phi).sum(1, keepdim=True).expand(5, 2)
    torch.testing.assert_close(predictive.epistemic, exact_epistemic)
    torch.testing.assert_close(predictive.variance, exact_epistemic + 0.25)
    assert predictive.mean.dtype == torch.float64


def test_mc_converges_to_linearized_on_a_linear_model():
    model, _, _ = _linear_regression("full")
    x_new = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model.predict(x_new, method="linearized")
    mc = model.predict(x_new, method="mc", n_samples=20000, generator=torch.Generator().manual_seed(0))
    standard_error = exact.epistemic.sqrt() / math.sqrt(20000)
    assert ((mc.mean - exact.mean).abs() < 5 * standard_error).all()
    torch.testing.assert_close(mc.epistemic, exact.epistemic, rtol=0.05, atol=0)  # var's rel. s.e. ~ 1%


def test_linearized_classification_equals_mc_over_weights_for_a_linear_model():
    torch.manual_seed(0)
    module = nn.Linear(4, 3).double()
    model = BayesianModel(module, "classification", "kron", prior_precision=1.0, dataset_size=5)
    x = torch.randn(7, 4, dtype=torch.float64)
    curvature = CurvatureEngine(module, model.likelihood, "ggn", "kron").compute(x, torch.arange(7) % 3)
    model.posterior.update_statistic(curvature * (1 / 7))
    gen = torch.Generator().manual_seed(0)
    linearized = model.predict(x, n_samples=40000, method="linearized", generator=gen)
    mc = model.predict(x, method="mc", n_samples=40000, generator=gen)
    torch.testing.assert_close(linearized.probs, mc.probs, rtol=0, atol=0.01)
    assert (linearized.probs.max(1).values < 0.9).all()  # wide enough that the test means something


def _one_logit(mean: float, variance: float, scales: torch.Tensor) -> tuple[BayesianModel, torch.Tensor]:
    """Binary model f = w·c with q(w) = N(mean, variance): the logit of input c is N(c·mean, c²·variance)."""
    module = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        module.weight.fill_(mean)
    model = BayesianModel(module, "binary", "diag", prior_precision=1 / variance, dataset_size=1)
    return model, scales.reshape(-1, 1).double()


def _gauss_hermite_sigmoid(means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    weights = weights / weights.sum()
    return (weights / (1 + np.exp(-(means[:, None] + stds[:, None] * nodes)))).sum(1)


@pytest.mark.parametrize("mean", [0.3, 1.0])
def test_probit_matches_the_expected_sigmoid_to_the_known_approximation_error(mean):
    """E[σ(f)], f ~ N(m, v), vs σ(m / sqrt(1 + πv/8)): the approximation is within 0.02 everywhere."""
    model, c = _one_logit(mean, 4.0, torch.linspace(-6, 6, 49))
    reference = _gauss_hermite_sigmoid(mean * c.squeeze(1).numpy(), 2.0 * c.squeeze(1).abs().numpy())
    probit = model.predict(c, method="probit").probs.numpy()
    error = np.abs(probit - reference)
    assert error.max() < 0.02
    assert error.max() > 1e-3  # an approximation, not the expectation itself
    sampled = model.predict(c, n_samples=40000, method="linearized", generator=torch.Generator().manual_seed(0))
    assert np.abs(sampled.probs.numpy() - reference).max() < 5 * 0.5 / math.sqrt(40000)
    mc = model.predict(c, method="mc", n_samples=40000, generator=torch.Generator().manual_seed(1))
    assert np.abs(mc.probs.numpy() - reference).max() < 5 * 0.5 / math.sqrt(40000)


def test_probit_is_the_softmax_of_scaled_logits():
    model, x, _ = fitted_bayesian_model("kron", "mlp")
    predictive = model.predict(x, method="probit")
    outputs, covariance = linearized_outputs(model, x)
    scale = (1 + math.pi / 8 * covariance.diagonal(dim1=1, dim2=2)).sqrt()
    torch.testing.assert_close(predictive.probs, torch.softmax(outputs / scale, -1))
    assert predictive.samples is None and predictive.output_covariance.shape == (8, 3, 3)


def test_linearized_regression_samples_and_exact_moments():
    model, x, _ = fitted_bayesian_model("diag", "mlp_regression")
    gen = torch.Generator().manual_seed(0)
    predictive = model.predict(x, n_samples=5, method="linearized", generator=gen, keep_samples=True)
    outputs, covariance = linearized_outputs(model, x)
    assert predictive.samples.shape == (5, 8, 2)
    torch.testing.assert_close(predictive.mean, outputs)
    torch.testing.assert_close(predictive.epistemic, covariance.diagonal(dim1=1, dim2=2))


def test_probit_refuses_regression_and_linearized_refuses_sequence_outputs():
    model, x, _ = fitted_bayesian_model("diag", "mlp_regression")
    with pytest.raises(ValueError, match="method='probit' is for classification"):
        model.predict(x, method="probit")
    sequence = nn.Sequential(nn.Linear(3, 4)).double()
    model = BayesianModel(sequence, "classification", "diag", dataset_size=10)
    with pytest.raises(ValueError, match=r"outputs of shape \(B, C\), got \(2, 5, 4\)"):
        model.predict(torch.randn(2, 5, 3, dtype=torch.float64), method="linearized")


def test_functional_model_falls_back_to_one_reverse_pass_per_output(caplog):
    model, x, _ = fitted_bayesian_model("diag", "functional")
    with caplog.at_level(logging.INFO, logger="bayesso.predict.linearized"):
        linearized_outputs(model, x)
    assert "one reverse pass per output" in caplog.text


@pytest.mark.parametrize(
    "name, handled",
    [("mlp", {"0", "2"}), ("residual", {"0", "1.fc1", "1.fc2", "3"}), ("shared", {"inp", "out"}),
     ("linear_sequence", {"3"}), ("conv2d", {"5"})],
)  # fmt: skip
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_linear_blocks_take_the_rank_one_path(name, handled, structure):
    """Linear layers called once on 2-D inputs: rank one; called twice ("shared") or on sequences: general."""
    model, x, _ = fitted_bayesian_model(structure, name)
    _, covariance, names = linear_kronecker_covariance(model.module, model.posterior, x)
    assert names == handled
    blocks = zip(model.posterior.plans, model.posterior.block_slices())
    index = torch.cat([torch.arange(where.start, where.stop) for plan, where in blocks if plan.name in handled])
    J = _covered_jacobian(model, x)[:, :, index]
    sigma = model.posterior.covariance_dense()[index][:, index]
    torch.testing.assert_close(covariance, J @ sigma @ J.transpose(1, 2), rtol=1e-10, atol=1e-12)
    full = fitted_bayesian_model("full", name)[0]
    assert linear_kronecker_covariance(full.module, full.posterior, x)[2] == set()


def test_deterministic_blocks_add_no_output_variance():
    model, x, _ = fitted_bayesian_model("kron", "mlp")
    model.posterior.deterministic = {"0", "2"}
    _, covariance = linearized_outputs(model, x)
    assert torch.equal(covariance, torch.zeros(8, 3, 3, dtype=torch.float64))
    model.posterior.deterministic = {"2"}
    _, covariance = linearized_outputs(model, x)
    J = _covered_jacobian(model, x)
    torch.testing.assert_close(covariance, J @ model.posterior.covariance_dense() @ J.transpose(1, 2))
