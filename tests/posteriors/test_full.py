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
