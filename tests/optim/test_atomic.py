"""One optimizer step, all or nothing: failures restore everything, skips move the generators on."""

import warnings

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.optim import VOGN, NoisyKFAC, SecondOrderOptimizer
from tests.state import assert_unchanged, snapshot


def _setup(structure="diag", seed=0):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return BayesianModel(module, "classification", structure, prior_precision=2.0, dataset_size=100), x, y


def _closure(optimizer, module, x, y, scale=1.0):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y) * scale
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("preset, structure", [(VOGN, "diag"), (NoisyKFAC, "kron")])
def test_a_failed_step_restores_the_generators_and_a_skipped_one_moves_them_on(preset, structure):
    model, x, y = _setup(structure)
    optimizer = preset(model)
    optimizer.step(_closure(optimizer, model.module, x, y))
    before = snapshot(model, optimizer)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        optimizer.step(_closure(optimizer, model.module, x, y, scale=float("nan")))
    assert_unchanged(before, model, optimizer)
    sampling = optimizer.generator.get_state()
    optimizer.skip_nonfinite = True
    optimizer.step(_closure(optimizer, model.module, x, y, scale=float("nan")))
    assert optimizer.skipped_steps == 1 and not torch.equal(optimizer.generator.get_state(), sampling)


def test_uneven_micro_batches_are_warned_about_once_per_update():
    model, x, y = _setup()
    optimizer = VOGN(model, accumulation_steps=2)
    optimizer.step(_closure(optimizer, model.module, x[:16], y[:16]))
    with pytest.warns(UserWarning, match=r"micro-batches of sizes \[16, 4\].*equal size \(drop_last=True\)"):
        optimizer.step(_closure(optimizer, model.module, x[16:20], y[16:20]))
    second_order = SecondOrderOptimizer(model.module, "classification", accumulation_steps=2)
    second_order.step(_closure(second_order, model.module, x[:16], y[:16]))
    with pytest.warns(UserWarning, match=r"sizes \[16, 8\]"):
        second_order.step(_closure(second_order, model.module, x[16:24], y[16:24]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # 16 and 15: within 10 %
            optimizer.step(_closure(optimizer, model.module, x[:16], y[:16]))
            optimizer.step(_closure(optimizer, model.module, x[16:31], y[16:31]))
