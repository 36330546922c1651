"""Exact Hessian blocks: structure-level facts not covered by the zoo comparisons."""

import torch
from torch import nn

from bayesso.curvature.hessian import hessian_blocks
from bayesso.likelihoods import Classification


def test_unused_parameters_have_zero_blocks_and_diag_matches_full():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    model.forward = lambda x: model["used"](x)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    blocks = {"used": ["used.weight", "used.bias"], "unused": ["unused.weight", "unused.bias"]}
    full = hessian_blocks(model, Classification(), (x,), y, blocks, False, torch.float64)
    diag = hessian_blocks(model, Classification(), (x,), y, blocks, True, torch.float64)
    assert torch.count_nonzero(full["unused"]) == 0
    assert full["used"].abs().max() > 0
    torch.testing.assert_close(full["used"], full["used"].T)
    torch.testing.assert_close(diag["used"], full["used"].diagonal())
