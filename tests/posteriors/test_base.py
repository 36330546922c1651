"""Posterior algebra for all families (and per-module mixtures) against dense closed forms and torch.distributions."""

from functools import partial

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine
from bayesso.posteriors import DiagonalGaussian, FullGaussian, KroneckerGaussian, MixedGaussian
from tests.cases import CASES_BY_NAME

# layernorm_groupnorm's blocks: 0 Conv1d (kron), 1 GroupNorm (full), 3 Linear (full, by name), 4 LayerNorm (diag),
# 6 Linear (kron, by type)
MIXED = {nn.Conv1d: "kron", nn.GroupNorm: "full", "3": "full", nn.Linear: "kron", nn.LayerNorm: "diag"}
FAMILIES = {
    "diag": DiagonalGaussian,
    "kron": KroneckerGaussian,
    "full": FullGaussian,
    "mixed": partial(MixedGaussian, structures=MIXED),
}
TOL = dict(rtol=1e-9, atol=1e-10)
N, TAU, DELTA, GAMMA = 60, 0.7, 2.0, 1e-3


def fitted(structure, case="layernorm_groupnorm", **options):
    """A posterior whose statistic is the per-example GGN of a zoo batch, with its dense statistic."""
    case = CASES_BY_NAME[case]
    model, x, y = case.data(batch_size=6)
    posterior = FAMILIES[structure](
        model, prior_precision=DELTA, dataset_size=N, temperature=TAU, damping=GAMMA, **options
    )
    engine = CurvatureEngine(model, case.likelihood, "ggn", posterior.curvature_structure)
    curvature = engine.compute(x, y) * (1 / 6)
    posterior.update_statistic(curvature)
    return posterior, curvature.to_dense()


def expected_precision(posterior, statistic):
    damping = torch.cat([lam.expand(p.numel) for lam, p in zip(posterior.block_damping(), posterior.plans)])
    return (N / TAU) * (statistic + torch.diag(damping))


@pytest.mark.parametrize("structure", FAMILIES)
def test_precision_is_scaled_damped_statistic(structure):
    posterior, statistic = fitted(structure)
    expected_damping = torch.full((len(posterior.plans),), TAU * DELTA / N + GAMMA, dtype=torch.float64)
    torch.testing.assert_close(posterior.block_damping(), expected_damping)
    precision = posterior.precision_dense()
    torch.testing.assert_close(precision, expected_precision(posterior, statistic), **TOL)
    eye = torch.eye(posterior.numel, dtype=torch.float64)
    torch.testing.assert_close(posterior.covariance_dense() @ precision, eye, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(posterior.variance(), posterior.covariance_dense().diagonal(), **TOL)


@pytest.mark.parametrize("structure", FAMILIES)
def test_precondition_solves_with_the_damped_statistic(structure):
    posterior, statistic = fitted(structure)
    v = torch.randn(3, posterior.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.solve(expected_precision(posterior, statistic) * (TAU / N), v.T).T
    torch.testing.assert_close(posterior.precondition(v), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", FAMILIES)
def test_entropy_log_det_and_kl_match_torch_distributions(structure):
    posterior, _ = fitted(structure)
    precision = posterior.precision_dense()
    q = torch.distributions.MultivariateNormal(posterior.mean(), precision_matrix=precision)
    prior = torch.distributions.MultivariateNormal(
        torch.zeros(posterior.numel, dtype=torch.float64), precision_matrix=DELTA * torch.eye(posterior.numel).double()
    )
    torch.testing.assert_close(posterior.log_det_precision(), torch.logdet(precision), **TOL)
    torch.testing.assert_close(posterior.entropy(), q.entropy(), **TOL)
    torch.testing.assert_close(posterior.kl_to_prior(), torch.distributions.kl_divergence(q, prior), **TOL)


@pytest.mark.parametrize("structure", FAMILIES)
def test_samples_have_the_posterior_mean_and_covariance(structure):
    posterior, _ = fitted(structure)
    n = 40000
    samples = posterior.sample(n, generator=torch.Generator().manual_seed(1))
    cov = posterior.covariance_dense()
    std = cov.diagonal().sqrt()
    # Standard errors of the sample mean and covariance entries; 5.5 sigma over ~2,000 entries.
    assert ((samples.mean(0) - posterior.mean()).abs() <= 5.5 * std / n**0.5).all()
    se = ((cov.diagonal().unsqueeze(0) * cov.diagonal().unsqueeze(1) + cov.square()) / n).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() <= 5.5 * se).all()


@pytest.mark.parametrize("structure", FAMILIES)
def test_noise_is_the_symmetric_root_of_the_covariance_applied_to_eps(structure):
    """θ - μ = Σ^(1/2) ε with the unique symmetric positive root, so the noise does not depend on the eigenvectors
    eigh picks for repeated eigenvalues (the statistic's null space): equal statistics give equal samples."""
    posterior, statistic = fitted(structure)
    noise, eps = posterior.sample_noise(posterior.numel, torch.Generator().manual_seed(0))
    root = torch.linalg.solve(eps, noise)  # the rows are noise_i = R ε_i with R symmetric: noise = eps R
    covariance = torch.linalg.inv(expected_precision(posterior, statistic))
    torch.testing.assert_close(root, root.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(root @ root, covariance, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(root + root.T).min() > 0


def test_deterministic_blocks_are_point_masses_without_prior():
    posterior, statistic = fitted("kron")
    posterior.deterministic = {"1"}  # the GroupNorm: parameters 20..27 after the Conv1d's 20
    where = slice(20, 28)
    assert posterior.block_damping()[1] == GAMMA
    samples = posterior.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples[:, where], posterior.mean()[where].expand(5, -1))
    assert posterior.covariance_dense()[where].abs().max() == 0
    assert posterior.variance()[where].abs().max() == 0
    ones = torch.ones(posterior.numel, dtype=torch.float64)
    expected = torch.linalg.solve(statistic[where, where] + GAMMA * torch.eye(8, dtype=torch.float64), ones[where])
    torch.testing.assert_close(posterior.precondition(ones)[where], expected, **TOL)  # still preconditioned


def test_update_statistic_copies_first_then_averages_with_beta():
    posterior, _ = fitted("diag")
    first = posterior.statistic.blocks["3"].values.clone()
    case = CASES_BY_NAME["layernorm_groupnorm"]
    model, x, y = case.data(batch_size=6, seed=3)
    posterior.module.load_state_dict(model.state_dict())
    new = CurvatureEngine(posterior.module, case.likelihood, "ggn", "diag").compute(x, y) * (1 / 6)
    posterior.update_statistic(new, beta=0.9)
    torch.testing.assert_close(posterior.statistic.blocks["3"].values, 0.9 * first + 0.1 * new.blocks["3"].values)


def test_refresh_false_keeps_the_previous_decomposition():
    posterior, _ = fitted("kron")
    before = posterior.precondition(torch.ones(posterior.numel, dtype=torch.float64))
    doubled = posterior.statistic * 2.0
    posterior.update_statistic(doubled, beta=0.0, refresh=False)
    torch.testing.assert_close(posterior.precondition(torch.ones(posterior.numel, dtype=torch.float64)), before)
    posterior.refresh()
    assert not torch.allclose(posterior.precondition(torch.ones(posterior.numel, dtype=torch.float64)), before)


@pytest.mark.parametrize("structure", FAMILIES)
def test_state_dict_round_trip(structure):
    posterior, _ = fitted(structure)
    posterior.deterministic = {"1"}
    other = FAMILIES[structure](posterior.module)
    other.load_state_dict(posterior.state_dict())
    torch.testing.assert_close(other.precision_dense(), posterior.precision_dense(), rtol=0, atol=0)
    assert other.deterministic == {"1"} and other.dataset_size == N and other.temperature == TAU
    with pytest.raises(ValueError, match="state is for a"):
        FAMILIES["full" if structure != "full" else "diag"](posterior.module).load_state_dict(posterior.state_dict())


def test_mean_is_the_module_parameters():
    posterior, _ = fitted("diag", case="mlp")
    model = posterior.module
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(posterior.mean(), flat)
    posterior.set_mean(flat + 1)
    assert torch.equal(model[0].bias.detach(), flat[20:24] + 1)
    with pytest.raises(ValueError, match="the mean must have shape \\(39,\\), got \\(3,\\)"):
        posterior.set_mean(torch.zeros(3))


def test_perturbed_restores_the_mean_bit_exactly_after_an_exception():
    posterior, _ = fitted("kron", case="mlp")
    before = [p.detach().clone() for p in posterior.module.parameters()]
    noise = posterior.sample_noise(1, torch.Generator().manual_seed(0))[0][0]
    with pytest.raises(KeyError), posterior.perturbed(noise):
        assert not torch.equal(next(posterior.module.parameters()), before[0])
        raise KeyError("boom")
    assert all(torch.equal(p, b) for p, b in zip(posterior.module.parameters(), before))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(prior_precision=0.0), "prior_precision must be positive and finite, got 0.0"),
        (dict(prior_precision={"": -1.0}), "prior_precision must be positive and finite"),
        (dict(prior_precision={"nope": 1.0}), "modules without a posterior block: \\['nope'\\]"),
        (dict(dataset_size=0), "dataset_size must be a positive number, got 0"),
        (dict(temperature=-1.0), "temperature must be positive and finite, got -1.0"),
        (dict(damping=-0.1), "damping must be non-negative and finite, got -0.1"),
    ],
)
def test_bad_hyperparameters(options, match):
    with pytest.raises(ValueError, match=match):
        DiagonalGaussian(nn.Linear(3, 2), **options)


def test_precision_needs_the_dataset_size():
    posterior = DiagonalGaussian(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="dataset_size is unknown"):
        posterior.sample()
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        DiagonalGaussian(nn.Linear(3, 2), dataset_size=10).sample(0)


def test_per_module_prior_precision():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    posterior = DiagonalGaussian(model, prior_precision={"1": 5.0}, dataset_size=10)
    assert posterior.prior_precision.tolist() == [1.0, 5.0]
    torch.testing.assert_close(posterior.variance()[-6:], torch.full((6,), 0.2))  # zero statistic: the prior


@pytest.mark.parametrize("structure", FAMILIES)
def test_update_statistic_is_all_or_nothing_and_cut_from_autograd(structure, monkeypatch):
    posterior, _ = fitted(structure)
    before = posterior.precondition(torch.ones(posterior.numel, dtype=torch.float64))
    statistic = posterior.statistic
    new = posterior.statistic * 2.0
    for block in new.blocks.values():
        block.tensors()[0].requires_grad_(True)

    def fail(block):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(posterior, "_eigenbasis", fail)
    with pytest.raises(torch.linalg.LinAlgError):
        posterior.update_statistic(new, beta=0.5)
    assert posterior.statistic is statistic
    torch.testing.assert_close(posterior.precondition(torch.ones(posterior.numel, dtype=torch.float64)), before)
    monkeypatch.undo()
    posterior.update_statistic(new, beta=0.5)
    assert not any(t.requires_grad for block in posterior.statistic.blocks.values() for t in block.tensors())


def test_snapshot_and_restore_cover_hyperparameters_and_statistic():
    posterior, _ = fitted("kron")
    saved = posterior.snapshot()
    precision = posterior.precision_dense()
    posterior.temperature, posterior.damping, posterior.prior_precision = 3.0, 0.5, 9.0
    posterior.deterministic.add("0")
    posterior.update_statistic(posterior.statistic * 3.0, beta=0.0)
    posterior.restore(saved)
    torch.testing.assert_close(posterior.precision_dense(), precision, rtol=0, atol=0)
    assert posterior.deterministic == set()
    with pytest.raises(ValueError, match="temperature must be positive"), posterior.atomic():
        posterior.damping = 0.25
        posterior.temperature = -1.0
    assert posterior.damping == GAMMA


@pytest.mark.parametrize("structure", FAMILIES)
def test_the_damped_cache_never_serves_an_earlier_prior(structure):
    """Set the prior many times, sometimes twice without a use in between (where a freed tensor's id
    could come back): every use must see the prior set last."""
    posterior, statistic = fitted(structure)
    generator = torch.Generator().manual_seed(0)
    for round_ in range(60):
        posterior.prior_precision = float(torch.rand((), generator=generator, dtype=torch.float64)) * 10 + 0.1
        if round_ % 3 == 0:
            continue  # set again before any use
        expected = torch.linalg.inv(expected_precision(posterior, statistic)).diagonal()
        torch.testing.assert_close(posterior.variance(), expected, rtol=1e-7, atol=1e-10)
