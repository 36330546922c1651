"""Posteriors as torch distributions, and KroneckerNormal / MatrixNormal, against dense MultivariateNormal."""

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, kl_divergence

from bayesso.posteriors.distributions import BlockNormal, KroneckerNormal, MatrixNormal
from tests.posteriors.test_base import FAMILIES, expected_precision, fitted

TOL = dict(rtol=1e-9, atol=1e-10)
VARIANTS = [*FAMILIES, "kron_factored"]


def fitted_variant(variant: str):
    if variant == "kron_factored":
        return fitted("kron", kfac_damping="factored")
    return fitted(variant)


def spd(n: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    return a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_log_prob_entropy_and_moments_equal_the_dense_gaussian(variant):
    posterior, statistic = fitted_variant(variant)
    q = posterior.distribution()
    assert isinstance(q, BlockNormal) and q.event_shape == (posterior.numel,)
    if variant == "kron_factored":  # not the engine's dense statistic: the factored damping's own precision
        reference = MultivariateNormal(posterior.mean(), precision_matrix=posterior.precision_dense())
    else:
        reference = MultivariateNormal(posterior.mean(), precision_matrix=expected_precision(posterior, statistic))
    points = reference.sample((5,)) + 0.1
    torch.testing.assert_close(q.log_prob(points), reference.log_prob(points), **TOL)
    torch.testing.assert_close(q.entropy(), reference.entropy(), **TOL)
    torch.testing.assert_close(q.mean, posterior.mean(), rtol=0, atol=0)
    torch.testing.assert_close(q.variance, reference.covariance_matrix.diagonal(), **TOL)
    kinds = {type(block.distribution).__name__ for block, _ in q.blocks.values()}
    expected = {"diag": {"Independent"}, "full": {"MultivariateNormal"}}.get(variant, {"Independent"})
    assert kinds == expected or (variant == "mixed" and kinds == {"Independent", "MultivariateNormal"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_samples_have_the_covariance(variant):
    posterior, _ = fitted_variant(variant)
    q = posterior.distribution()
    torch.manual_seed(0)
    n = 40000
    samples = q.rsample((n,))
    cov = posterior.covariance_dense()
    std = cov.diagonal().sqrt()
    assert ((samples.mean(0) - posterior.mean()).abs() <= 5.5 * std / n**0.5).all()
    se = ((cov.diagonal().unsqueeze(0) * cov.diagonal().unsqueeze(1) + cov.square()) / n).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() <= 5.5 * se).all()


@pytest.mark.parametrize("other", ["diag", "kron", "full", "mixed"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_between_two_posteriors_is_the_dense_kl(variant, other):
    p, _ = fitted_variant(variant)
    q, _ = fitted(other)
    q.prior_precision, q.temperature = 5.0, 1.3  # a different Gaussian over the same parameters
    with torch.no_grad():
        for parameter in q.module.parameters():
            parameter.add_(0.05)
    dense_p = MultivariateNormal(p.mean(), precision_matrix=p.precision_dense())
    dense_q = MultivariateNormal(q.mean(), precision_matrix=q.precision_dense())
    expected = kl_divergence(dense_p, dense_q)
    torch.testing.assert_close(kl_divergence(p.distribution(), q.distribution()), expected, rtol=1e-8, atol=1e-9)


def test_factored_kronecker_blocks_are_matrix_normal_and_deterministic_blocks_are_left_out():
    posterior, _ = fitted("kron", kfac_damping="factored")
    q = posterior.distribution()
    for block, _ in q.blocks.values():
        if isinstance(block.distribution, Independent) and isinstance(block.distribution.base_dist, KroneckerNormal):
            for variances in block.distribution.base_dist.variances:  # one (out, in) matrix per group: rank one
                assert torch.linalg.matrix_rank(variances).item() == 1
    posterior.deterministic = {"0", "4"}
    q = posterior.distribution()
    assert q.blocks.keys() == {"1", "3", "6"}
    assert q.event_shape == (sum(plan.numel for plan in posterior.plans if plan.name in {"1", "3", "6"}),)


def test_matrix_normal_is_the_gaussian_with_kronecker_covariance():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    rows, columns = spd(3, gen), spd(4, gen)
    mn = MatrixNormal(loc, rows, columns)
    dense = MultivariateNormal(loc.reshape(-1), torch.kron(rows, columns))
    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(mn.log_prob(x), dense.log_prob(x.reshape(6, -1)), **TOL)
    torch.testing.assert_close(mn.entropy(), dense.entropy(), **TOL)
    torch.testing.assert_close(mn.variance.reshape(-1), torch.kron(rows, columns).diagonal(), **TOL)
    torch.testing.assert_close(mn.dense_covariance(), torch.kron(rows, columns), **TOL)
    other = MatrixNormal(loc + 0.3, spd(3, gen), spd(4, gen))
    other_dense = MultivariateNormal(other.loc.reshape(-1), other.dense_covariance())
    torch.testing.assert_close(kl_divergence(mn, other), kl_divergence(dense, other_dense), **TOL)
    torch.manual_seed(1)
    samples = mn.rsample((40000,)).reshape(40000, -1)
    cov = torch.kron(rows, columns)
    se = ((cov.diagonal().unsqueeze(0) * cov.diagonal().unsqueeze(1) + cov.square()) / 40000).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() <= 5.5 * se).all()


def test_kronecker_normal_root_is_symmetric_and_batches_expand():
    gen = torch.Generator().manual_seed(2)
    mn = MatrixNormal(torch.zeros(2, 3, dtype=torch.float64), spd(2, gen), spd(3, gen))
    eye = torch.eye(6, dtype=torch.float64).reshape(6, 2, 3)
    root = mn.root(eye).reshape(6, 6)  # row k is R e_k
    torch.testing.assert_close(root, root.T, **TOL)
    torch.testing.assert_close(root @ root, mn.dense_covariance(), **TOL)
    expanded = mn.expand((4,))
    assert expanded.batch_shape == (4,) and expanded.rsample((5,)).shape == (5, 4, 2, 3)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda z: KroneckerNormal(z(2, 3), z(2, 2), z(3, 3), z(3, 2)), "loc and variances must be"),
        (lambda z: KroneckerNormal(z(2, 3), z(3, 3), z(3, 3), z(2, 3) + 1), r"row_vectors must be \(\.\.\., 2, 2\)"),
        (lambda z: MatrixNormal(z(2, 3), -torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)),
         "must be positive definite"),
    ],
)  # fmt: skip
def test_bad_shapes_and_covariances_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build(lambda *shape: torch.zeros(*shape, dtype=torch.float64))
