"""CallRecorder: hooks are removed on errors; modified inputs are detected."""

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine
from bayesso.curvature.recorder import CallRecorder


def test_hooks_are_removed_when_the_forward_raises():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 2))  # second layer gets the wrong width
    with pytest.raises(RuntimeError), CallRecorder({"0": model[0], "1": model[1]}, batch_size=4):
        model(torch.randn(4, 3))
    assert not model[0]._forward_hooks and not model[1]._forward_hooks


def test_input_modified_in_place_after_use_is_detected():
    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(x)
            out = self.fc(h)
            h.mul_(2)  # invalidates what the layer saw
            return out

    with pytest.raises(RuntimeError, match="input of module 'fc' was modified in place"):
        CurvatureEngine(Mutates(), "classification").compute(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))


def test_output_gradient_is_taken_before_in_place_ops():
    lin = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    with CallRecorder({"lin": lin}, batch_size=5) as recorder:
        out = lin(x)
    pre = out.detach().clone()
    torch.relu_(out)
    weights = torch.arange(4.0)
    torch.autograd.grad((out * weights).sum(), lin.weight)
    (grad,) = recorder.take_grads("lin")
    torch.testing.assert_close(grad, (pre > 0).float() * weights)
    assert torch.equal(recorder.take_grads("lin")[0], torch.zeros(5, 4))  # taken once


def test_the_graph_is_freed_after_compute_and_after_a_captured_step():
    """Hooks hold their targets weakly: a cycle through autograd's C++ hooks would leak every graph."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    outputs = []
    model[0].register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    for kind in ["fisher_mc", "fisher_emp"]:
        engine = CurvatureEngine(model, "classification", kind, "kron")
        engine.compute(x, y)
        with engine.capture() as capture:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        capture.curvature()
        del capture
    gc.collect()
    assert len(outputs) == 4 and all(ref() is None for ref in outputs)
