"""Curvature: the dense view, and arithmetic that keeps the meaning "curvature of a batch"."""

import pytest
import torch

from bayesso.curvature import CurvatureEngine
from tests.cases import CASES_BY_NAME

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_sum_over_batches_equals_curvature_of_the_union(structure):
    case = CASES_BY_NAME["conv2d"]
    model, x, y = case.data(batch_size=6)
    engine = CurvatureEngine(model, case.likelihood, "ggn", structure)
    parts = engine.compute(x[:2], y[:2]) + engine.compute(x[2:], y[2:])
    whole = engine.compute(x, y)
    assert parts.n_examples == 6
    torch.testing.assert_close(parts.to_dense(), whole.to_dense(), **TOL)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_flat_buffers_add_like_batches(structure):
    case = CASES_BY_NAME["linear_sequence"]
    model, x, y = case.data(batch_size=6)
    engine = CurvatureEngine(model, case.likelihood, "fisher_emp", structure)
    first, second = engine.compute(x[:4], y[:4]), engine.compute(x[4:], y[4:])
    buffer = first.flatten() + second.flatten()  # what a summed all-reduce produces
    merged = engine.compute(x[:1], y[:1]).load_flat_(buffer)
    torch.testing.assert_close(merged.to_dense(), engine.compute(x, y).to_dense(), **TOL)
    with pytest.raises(ValueError, match="buffer has 1 elements"):
        merged.load_flat_(buffer[:1])


def test_scale_ema_and_views():
    case = CASES_BY_NAME["mlp"]
    model, x, y = case.data()
    engine = CurvatureEngine(model, case.likelihood, "ggn", "kron")
    a, b = engine.compute(x[:2], y[:2]), engine.compute(x[2:], y[2:])
    torch.testing.assert_close((0.5 * a).to_dense(), 0.5 * a.to_dense(), **TOL)
    A0 = a.blocks["0"].A.clone()
    a.ema_(b, 0.75)
    torch.testing.assert_close(a.blocks["0"].A, 0.75 * A0 + 0.25 * b.blocks["0"].A, **TOL)
    torch.testing.assert_close(a.diagonal(), a.to_dense().diagonal(), **TOL)
    assert a.structures == {"0": "kron", "2": "kron"}
    assert "kind='ggn'" in repr(a)


def test_curvatures_over_different_modules_do_not_combine():
    case = CASES_BY_NAME["mlp"]
    model, x, y = case.data()
    full = CurvatureEngine(model, case.likelihood, "ggn", "diag").compute(x, y)
    last = CurvatureEngine(model, case.likelihood, "ggn", "diag", modules="last_layer").compute(x, y)
    with pytest.raises(ValueError, match="different modules"):
        full + last
    assert last.to_dense(covered_only=True).shape == (15, 15)
    assert last.to_dense().shape == (39, 39)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_entry_sum_adds_every_stored_entry_and_turns_non_finite_with_any_of_them(structure):
    case = CASES_BY_NAME["mlp"]
    model, x, y = case.data(batch_size=6)
    curvature = CurvatureEngine(model, case.likelihood, "ggn", structure).compute(x, y)
    stored = [t for block in curvature.blocks.values() for t in block.tensors()]
    torch.testing.assert_close(curvature.entry_sum(), torch.cat([t.reshape(-1) for t in stored]).sum())
    stored[-1].view(-1)[0] = float("nan")
    assert not torch.isfinite(curvature.entry_sum())
