"""KroneckerGaussian: factored (π) damping, its scale invariance, and the matrix-normal samples."""

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine, DiagBlock, KronBlock
from bayesso.posteriors import KroneckerGaussian
from tests.cases import CASES_BY_NAME
from tests.posteriors.test_base import DELTA, GAMMA, TAU, N, fitted


def test_factored_damping_is_the_pi_split_of_noisy_kfac():
    posterior, _ = fitted("kron", case="conv2d", kfac_damping="factored")
    precision = posterior.precision_dense()
    lam = TAU * DELTA / N + GAMMA
    for plan in posterior.plans:
        block = posterior.statistic.blocks[plan.name]
        if not isinstance(block, KronBlock):
            continue
        d_a, d_g = block.A.shape[-1], block.G.shape[-1]
        pi = ((block.A.diagonal(dim1=1, dim2=2).sum(1) / d_a) / (block.G.diagonal(dim1=1, dim2=2).sum(1) / d_g)).sqrt()
        A = block.A + (pi * lam**0.5).view(-1, 1, 1) * torch.eye(d_a, dtype=torch.float64)
        G = block.G + (lam**0.5 / pi).view(-1, 1, 1) * torch.eye(d_g, dtype=torch.float64)
        expected = (N / TAU) * KronBlock(block.names, block.shapes, A, G, 1.0, block.layout).to_dense()
        where = posterior._slices[plan.name]
        torch.testing.assert_close(precision[where, where], expected, rtol=1e-9, atol=1e-9)


def test_factored_damping_is_unchanged_when_a_scalar_moves_between_factors():
    posterior, _ = fitted("kron", case="conv2d", kfac_damping="factored")
    v = torch.randn(posterior.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = posterior.precondition(v)
    for block in posterior.statistic.blocks.values():
        if isinstance(block, KronBlock):
            block.A.mul_(7.0)
            block.G.div_(7.0)
    posterior.refresh()
    torch.testing.assert_close(posterior.precondition(v), before, rtol=1e-9, atol=1e-12)


def test_matrix_normal_samples_have_the_output_side_covariance_right():
    """The seed library sampled L_A E L_G^T instead of L_G E L_A^T; check a non-square layer's covariance."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    posterior = KroneckerGaussian(model, prior_precision=1.0, dataset_size=1, kfac_damping="factored")
    A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    G = torch.tensor([[1.5, -0.4], [-0.4, 0.6]], dtype=torch.float64)
    block = posterior.statistic.blocks[""]
    block.A.copy_(A.unsqueeze(0))
    block.G.copy_(G.unsqueeze(0))
    posterior.initialized = True
    posterior.refresh()
    pi = ((A.trace() / 3) / (G.trace() / 2)).sqrt()
    A_gamma, G_gamma = A + pi * torch.eye(3, dtype=torch.float64), G + torch.eye(2, dtype=torch.float64) / pi
    expected = torch.kron(torch.linalg.inv(G_gamma), torch.linalg.inv(A_gamma))  # vec_row(W) covariance
    samples = posterior.sample(200000, generator=torch.Generator().manual_seed(0)) - posterior.mean()
    torch.testing.assert_close(torch.cov(samples.T), expected, rtol=0, atol=0.01)


def test_module_without_own_forward_call_becomes_diagonal():
    case = CASES_BY_NAME["functional"]
    model, x, y = case.data()
    posterior = KroneckerGaussian(model, dataset_size=10)
    assert posterior.statistic.blocks["fc"].structure == "kron"
    with pytest.warns(UserWarning, match="'fc' \\(Linear\\) uses the generic.*not called through its own forward"):
        curvature = CurvatureEngine(model, case.likelihood, "ggn", "kron").compute(x, y)
    with pytest.warns(UserWarning, match="its posterior block becomes diagonal"):
        posterior.update_statistic(curvature)
    assert isinstance(posterior.statistic.blocks["fc"], DiagBlock)
    assert torch.isfinite(posterior.sample(2)).all()


def test_bad_kfac_damping():
    with pytest.raises(ValueError, match="kfac_damping must be 'exact' or 'factored', got 'pi'"):
        KroneckerGaussian(nn.Linear(2, 2), kfac_damping="pi")
