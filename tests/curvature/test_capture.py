"""CurvatureCapture: the curvature of a user's training step equals compute() on the batch."""

import pytest
import torch

from bayesso.curvature import CurvatureEngine
from tests.cases import CASES, CASES_BY_NAME, mixed_structures

TOL = dict(rtol=1e-10, atol=1e-12)


def mean_nll_step(model, likelihood, x, y):
    model.zero_grad()
    loss = likelihood.nll(model(x), y) / len(y)
    loss.backward()
    return loss


@pytest.mark.parametrize("structure", ["diag", "kron", "full", "mixed"])
@pytest.mark.parametrize("kind", ["ggn", "fisher_mc", "fisher_emp"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_capture_equals_compute_and_keeps_the_gradient(case, kind, structure):
    model, x, y = case.data()
    if structure == "mixed":
        structure = mixed_structures(model)
    engine = CurvatureEngine(model, case.likelihood, kind, structure)
    with engine.capture(generator=torch.Generator().manual_seed(5)) as capture:
        mean_nll_step(model, case.likelihood, x, y)
    captured = capture.curvature()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = engine.compute(x, y, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(captured.to_dense(), expected.to_dense(), **TOL)
    mean_nll_step(model, case.likelihood, x, y)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, p.grad, **TOL)
    assert all(not m._forward_hooks for m in model.modules())


def test_step_without_backward_is_a_clear_error():
    case = CASES_BY_NAME["mlp"]
    model, x, _ = case.data()
    engine = CurvatureEngine(model, case.likelihood, "fisher_emp", "diag")
    with engine.capture() as capture:
        model(x)
    with pytest.raises(RuntimeError, match="no backward pass reached the model output"):
        capture.curvature()


def test_two_forwards_in_one_capture_are_refused_and_hooks_removed():
    case = CASES_BY_NAME["mlp"]
    model, x, y = case.data()
    engine = CurvatureEngine(model, case.likelihood, "ggn", "diag")
    with pytest.raises(ValueError, match="called more than once"), engine.capture():
        model(x)
        model(x)
    assert all(not m._forward_hooks for m in model.modules())
    with engine.capture() as capture:  # forwards without gradients are ignored
        with torch.no_grad():
            model(x)
        mean_nll_step(model, case.likelihood, x, y)
    assert capture.curvature().n_examples == len(x)


def test_hessian_cannot_be_captured():
    case = CASES_BY_NAME["mlp"]
    model, _, _ = case.data()
    with pytest.raises(ValueError, match="capture\\(\\) supports kind .* got kind='hessian'"):
        CurvatureEngine(model, case.likelihood, "hessian", "diag").capture()
