"""Blocks: dense layout of Kronecker factors, arithmetic, EMA and flat buffers."""

import itertools

import pytest
import torch

from bayesso.curvature import AffineLayout, DenseBlock, DiagBlock, KronBlock

TOL = dict(rtol=1e-12, atol=1e-12)


def random_spd(*shape):
    m = torch.randn(*shape, dtype=torch.float64)
    return m @ m.transpose(-1, -2) + torch.eye(shape[-1], dtype=torch.float64)


def kron_block(groups=1, out=3, inp=4, has_weight=True, has_bias=True, n=5.0):
    layout = AffineLayout(groups, out, inp, has_weight, has_bias)
    names, shapes = [], []
    if has_weight:
        names.append("w")
        shapes.append((groups * out, inp))
    if has_bias:
        names.append("b")
        shapes.append((groups * out,))
    A = random_spd(groups, layout.input_dim, layout.input_dim)
    return KronBlock(tuple(names), tuple(shapes), A, random_spd(groups, out, out), n, layout)


def dense_by_definition(block: KronBlock) -> torch.Tensor:
    """Entry (p, q) = G[o_p, o_q] A[j_p, j_q] for parameters in the same group, by explicit loops."""
    lay = block.layout
    coords = []  # (group, out, input-side index) of each flat parameter, in flat order
    if lay.has_weight:
        coords += [
            (r // lay.out_features, r % lay.out_features, j)
            for r in range(lay.groups * lay.out_features)
            for j in range(lay.in_features)
        ]
    if lay.has_bias:
        bias_col = lay.in_features if lay.has_weight else 0
        coords += [
            (r // lay.out_features, r % lay.out_features, bias_col) for r in range(lay.groups * lay.out_features)
        ]
    out = torch.zeros(len(coords), len(coords), dtype=torch.float64)
    for (p, (g, o, j)), (q, (h, u, k)) in itertools.product(enumerate(coords), repeat=2):
        if g == h:
            out[p, q] = block.G[g, o, u] * block.A[g, j, k]
    return out


@pytest.mark.parametrize(
    "config", [dict(), dict(groups=2), dict(has_bias=False), dict(has_weight=False), dict(groups=3, out=2, inp=2)]
)
def test_kron_dense_layout_and_diagonal(config):
    torch.manual_seed(0)
    block = kron_block(**config)
    expected = dense_by_definition(block)
    torch.testing.assert_close(block.to_dense(), expected, **TOL)
    torch.testing.assert_close(block.diagonal(), expected.diagonal(), **TOL)
    assert block.numel == expected.shape[0]


def test_kron_sum_averages_the_input_factor_and_sums_the_output_factor():
    torch.manual_seed(0)
    a, b = kron_block(n=2.0), kron_block(n=6.0)
    b.names, b.shapes = a.names, a.shapes
    total = a + b
    torch.testing.assert_close(total.A, (2 * a.A + 6 * b.A) / 8, **TOL)
    torch.testing.assert_close(total.G, a.G + b.G, **TOL)
    assert total.n.item() == 8
    torch.testing.assert_close((3 * a).to_dense(), 3 * a.to_dense(), **TOL)


@pytest.mark.parametrize("make", ["diag", "dense", "kron"])
def test_flatten_is_additive_and_round_trips(make):
    torch.manual_seed(0)

    def new():
        if make == "diag":
            return DiagBlock(("w",), ((2, 3),), torch.rand(6, dtype=torch.float64))
        if make == "dense":
            return DenseBlock(("w",), ((2, 3),), random_spd(6, 6))
        return kron_block(n=float(torch.randint(1, 9, ()).item()))

    a, b = new(), new()
    total = a + b
    torch.testing.assert_close(a.flatten() + b.flatten(), total.flatten(), **TOL)
    restored = new().load_flat_(a.flatten() + b.flatten())
    torch.testing.assert_close(restored.to_dense(), total.to_dense(), **TOL)
    assert a.flat_numel == a.flatten().numel()
    with pytest.raises(ValueError, match=f"buffer has {a.flat_numel + 1} elements, the block needs {a.flat_numel}"):
        new().load_flat_(torch.zeros(a.flat_numel + 1, dtype=torch.float64))


def test_ema_weighs_the_old_value_with_beta():
    torch.manual_seed(0)
    old, new = kron_block(), kron_block()
    A0, G0 = old.A.clone(), old.G.clone()
    old.ema_(new, 0.9)
    torch.testing.assert_close(old.A, 0.9 * A0 + 0.1 * new.A, **TOL)
    torch.testing.assert_close(old.G, 0.9 * G0 + 0.1 * new.G, **TOL)
    diag = DiagBlock(("w",), ((3,),), torch.ones(3))
    diag.ema_(DiagBlock(("w",), ((3,),), torch.zeros(3)), 0.25)
    torch.testing.assert_close(diag.values, torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\], got 1.5"):
        diag.ema_(diag, 1.5)


def test_combining_different_blocks_is_an_error():
    diag = DiagBlock(("w",), ((3,),), torch.ones(3))
    with pytest.raises(ValueError, match="cannot combine"):
        diag + DiagBlock(("v",), ((3,),), torch.ones(3))
    with pytest.raises(ValueError, match="cannot combine"):
        diag + DenseBlock(("w",), ((3,),), torch.eye(3))


@pytest.mark.parametrize("groups,has_weight,has_bias", [(1, True, True), (2, True, False), (3, False, True)])
def test_isotropic_block_is_value_times_identity_for_every_structure(groups, has_weight, has_bias):
    kron = kron_block(groups=groups, has_weight=has_weight, has_bias=has_bias)
    diag = DiagBlock(kron.names, kron.shapes, torch.rand(kron.numel, dtype=torch.float64))
    dense = DenseBlock(kron.names, kron.shapes, random_spd(kron.numel, kron.numel))
    eye = torch.eye(kron.numel, dtype=torch.float64)
    for block in (kron, diag, dense):
        iso = block.isotropic(0.3)
        assert type(iso) is type(block) and iso.names == block.names
        torch.testing.assert_close(iso.to_dense(), 0.3 * eye, **TOL)
    torch.testing.assert_close(dense_by_definition(kron.isotropic(0.3)), 0.3 * eye, **TOL)
