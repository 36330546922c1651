"""FullGaussian: one dense block per module, refused above the size limit, decomposed where float32 eigh fails."""

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.optim import VOGN
from bayesso.posteriors import FullGaussian


def test_large_blocks_are_refused_up_front():
    with pytest.raises(ValueError, match="32,896 x 32,896 block for module '0' \\(Linear\\).*KroneckerGaussian"):
        FullGaussian(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 2)))
    assert FullGaussian(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 2)), modules="last_layer").numel == 258


def _one_example(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = torch.randn(1, 10), torch.tensor([1])
    return net, x, y


@pytest.mark.parametrize("seed", range(2))
def test_a_one_example_statistic_in_float32_is_decomposed(seed):
    """float32 eigh fails to converge on these rank-deficient blocks; the decomposition falls back to float64."""
    net, x, y = _one_example(seed)
    statistic = CurvatureEngine(net, "classification", "ggn", "full").compute(x, y).blocks["0"].matrix
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.eigh(statistic)  # the failure the fallback exists for
    model = BayesianModel(net, "classification", "full", prior_precision=1.0)
    model.fit_laplace([(x, y)], progress=False)
    reference = statistic.double() + torch.eye(statistic.shape[0], dtype=torch.float64)
    where = model.posterior.block_slices()[0]
    torch.testing.assert_close(
        model.posterior.precision_dense()[where, where].double(), reference, rtol=1e-4, atol=1e-4
    )
    net, x, y = _one_example(seed)
    model = BayesianModel(net, "classification", "full", dataset_size=100)
    optimizer = VOGN(model)
    for _ in range(3):  # VOGN at batch size 1 with a full posterior
        optimizer.step(lambda: _loss(optimizer, net, x, y))
    assert torch.isfinite(model.posterior.mean()).all() and optimizer.state_dict()["vi"]["step"] == 3


def _loss(optimizer, net, x, y):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss


def _regression_vogn(**options):
    """VOGN with a full posterior on a float64 linear regression, whose GGN C = XᵀX / (n σ²) does not depend on w."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    y = (x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(40, generator=gen).double())[
        :, None
    ]
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    model = BayesianModel(net, "regression", posterior="full", dataset_size=40, sigma=0.5)
    optimizer = VOGN(model, curvature="ggn", **options)
    xb = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)  # [W, b] is the block's flat order
    return model, optimizer, lambda: _loss_of(optimizer, net, x, y, model), xb.T @ xb / (40 * 0.5**2)


def _loss_of(optimizer, net, x, y, model):
    optimizer.zero_grad()
    loss = model.likelihood.nll(net(x), y) / len(y)
    loss.backward()
    return loss


def test_full_blocks_decompose_every_tenth_step_while_the_statistic_stays_exact(monkeypatch):
    model, optimizer, closure, curvature = _regression_vogn()
    assert optimizer.inv_interval == FullGaussian.default_inv_interval == 10
    decomposed = []
    original = FullGaussian._eigenbasis
    monkeypatch.setattr(
        FullGaussian, "_eigenbasis", lambda self, block: decomposed.append(optimizer._step) or original(self, block)
    )
    beta, h0 = optimizer.param_groups[0]["betas"][1], 0.5
    eye = torch.eye(4, dtype=torch.float64)
    for t in range(1, 24):
        optimizer.step(closure)
        # S_t = β^t h0 I + (1 - β^t) C, every step, whatever the decomposition's age
        exact = beta**t * h0 * eye + (1 - beta**t) * curvature
        torch.testing.assert_close(model.posterior.statistic.blocks[""].matrix, exact, rtol=1e-12, atol=1e-14)
        last = (t - 1) // 10 * 10 + 1  # the statistic the decomposition comes from: after steps 1, 11, 21
        stale = beta**last * h0 * eye + (1 - beta**last) * curvature
        basis = model.posterior._basis("")
        torch.testing.assert_close(basis.dense(basis.values), stale, rtol=1e-10, atol=1e-12)
    assert decomposed == [0, 10, 20]  # _step counts the steps taken before the current one


def test_inv_interval_one_decomposes_the_current_statistic_every_step():
    model, optimizer, closure, _ = _regression_vogn(inv_interval=1)
    for _ in range(3):
        optimizer.step(closure)
        statistic = model.posterior.statistic.blocks[""].matrix
        values, vectors = torch.linalg.eigh(statistic)  # the decomposition every step made before
        basis = model.posterior._basis("")
        assert model.posterior._decomposed is None
        assert torch.equal(basis.values, values.clamp_min(0)) and torch.equal(basis.Q, vectors)
