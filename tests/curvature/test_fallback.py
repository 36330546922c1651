"""Generic fallback: per-example gradients through torch.func, and its failure message."""

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine
from bayesso.curvature.fallback import per_example_gradients
from bayesso.likelihoods import Classification
from tests import dense
from tests.cases import CASES_BY_NAME


def test_per_example_gradients_match_the_dense_reference():
    case = CASES_BY_NAME["functional"]
    model, x, y = case.data()
    names = [n for n, _ in model.named_parameters()]
    grads = dense.per_example_gradients(model, case.likelihood, x, y)  # (B, P)
    vectors = case.likelihood.gradient(model(x).detach(), y).unsqueeze(0)
    result = per_example_gradients(model, (x,), names, vectors, slice(1, 4))
    torch.testing.assert_close(result[:, 0], grads[1:4], rtol=1e-10, atol=1e-12)


def test_unvmappable_model_gives_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale if x.sum() > 0 else -x * self.scale

    model = DataDependent()
    with pytest.raises(RuntimeError, match="generic curvature fallback for parameters \\['scale'\\].*vmap"):
        CurvatureEngine(model, Classification(), "ggn", "diag").compute(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_fallback_statistics_hold_no_autograd_graph():
    """The fallback's torch.func passes must not tie their results to the module's parameters (a leak per step)."""
    case = CASES_BY_NAME["functional"]  # PReLU, a custom module and a bare parameter go through the fallback
    model, x, y = case.data()
    engine = CurvatureEngine(model, case.likelihood, "fisher_mc", "diag")
    assert any(plan.rule is None for plan in engine.plans)
    blocks = engine.compute(x, y, generator=torch.Generator().manual_seed(0)).blocks.values()
    assert not any(t.requires_grad or t.grad_fn is not None for block in blocks for t in block.tensors())
    with engine.capture(torch.Generator().manual_seed(0)) as capture:
        (case.likelihood.nll(model(x), y) / len(y)).backward()
    blocks = capture.curvature().blocks.values()
    assert not any(t.requires_grad for block in blocks for t in block.tensors())
