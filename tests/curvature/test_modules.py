"""Per-module rules: K-FAC factors against their definitions, and user-registered rules.

The references build the layer's input vectors with explicit loops over kernel
offsets (not F.unfold) and the output-side gradients with ``torch.func.vjp`` of
the rest of the network, then apply docs/curvature.md §3:
expand: A = mean_{i,r} a a^T, G = sum_{i,r,k} g g^T;
reduce: A = mean_i a_bar a_bar^T (a_bar = mean_r a), G = sum_{i,k} g_bar g_bar^T (g_bar = sum_r g).
"""

import itertools

import pytest
import torch
from torch import nn
from torch.func import hessian, vjp

from bayesso.curvature import CurvatureEngine, ModuleRule, register_rule
from bayesso.curvature.modules import _RULES
from bayesso.likelihoods import Classification
from tests import dense
from tests.cases import MeanOverPositions, ScaleShift

TOL = dict(rtol=1e-10, atol=1e-12)


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, R, groups, C_g * prod(kernel)) input vectors by explicit indexing."""
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
        padding = "same" if conv.padding == "same" else (0, *conv.padding)
    else:
        kernel, stride, dilation, padding = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        before = [t // 2 for t in total]
    else:
        total, before = [2 * p for p in padding], list(padding)
    batch, channels, height, width = x.shape
    out_h = (height + total[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + total[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    patches = torch.zeros(batch, out_h * out_w, channels, kernel[0], kernel[1], dtype=x.dtype)
    for oh, ow, kh, kw in itertools.product(range(out_h), range(out_w), range(kernel[0]), range(kernel[1])):
        ih = oh * stride[0] - before[0] + kh * dilation[0]
        iw = ow * stride[1] - before[1] + kw * dilation[1]
        if 0 <= ih < height and 0 <= iw < width:
            patches[:, oh * out_w + ow, :, kh, kw] = x[:, :, ih, iw]
    groups = conv.groups
    return patches.reshape(batch, out_h * out_w, groups, -1)


def factor_reference(first: nn.Module, rest: nn.Module, x, y, kind: str, approx: str):
    """A (groups, d_in, d_in) and G (groups, d_out, d_out) from the definitions."""
    h = first(x).detach()
    f, pullback = vjp(rest, h)
    if kind == "fisher_emp":
        vectors = torch.func.grad(lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))(f).unsqueeze(0)
    else:  # ggn: any square root of the output Hessians gives the same G
        hessians = torch.stack(
            [hessian(lambda fi, yi=yi: nn.functional.cross_entropy(fi, yi))(fi) for fi, yi in zip(f, y)]
        )
        values, vecs = torch.linalg.eigh(hessians)
        roots = vecs * values.clamp_min(0).sqrt().unsqueeze(1)
        vectors = roots.permute(2, 0, 1)
    grads = torch.stack([pullback(v)[0] for v in vectors])  # (K, *h.shape)
    if isinstance(first, nn.Linear):
        a = x.reshape(x.shape[0], -1, 1, x.shape[-1])
        g = grads.reshape(grads.shape[0], x.shape[0], -1, 1, grads.shape[-1])
    else:
        a = conv_patches(first, x)
        groups = first.groups
        g = grads.reshape(grads.shape[0], x.shape[0], groups, first.out_channels // groups, -1).permute(0, 1, 4, 2, 3)
    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    if approx == "reduce":
        a_bar, g_bar = a.mean(dim=1), g.sum(dim=2)
        return torch.einsum("bgi,bgj->gij", a_bar, a_bar) / len(x), torch.einsum("kbgo,kbgp->gop", g_bar, g_bar)
    positions = a.shape[1]
    return torch.einsum("brgi,brgj->gij", a, a) / (len(x) * positions), torch.einsum("kbrgo,kbrgp->gop", g, g)


FIRST_LAYERS = {
    "linear": (lambda: nn.Linear(4, 3), (4,)),
    "linear_sequence": (lambda: nn.Linear(4, 3), (5, 4)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2), (2, 9)),
    "conv1d_same": (lambda: nn.Conv1d(2, 2, 4, padding="same"), (2, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 5, 5)),
    "conv2d_groups_same": (lambda: nn.Conv2d(4, 6, 2, groups=2, dilation=2, padding="same"), (4, 4, 4)),
    "conv2d_rectangular": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0)), (2, 4, 5)),
}


def first_layer_model(name):
    torch.manual_seed(0)
    build, shape = FIRST_LAYERS[name]
    first = build().double()
    pool = MeanOverPositions() if name == "linear_sequence" else nn.Flatten()
    with torch.no_grad():
        n_features = pool(torch.tanh(first(torch.zeros(1, *shape, dtype=torch.float64)))).shape[1]
    rest = nn.Sequential(nn.Tanh(), pool, nn.Linear(n_features, 3)).double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    return first, rest, x, torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["ggn", "fisher_emp"])
@pytest.mark.parametrize("name", list(FIRST_LAYERS))
def test_kron_factors_match_their_definition(name, kind, approx):
    first, rest, x, y = first_layer_model(name)
    model = nn.Sequential(first, rest)
    result = CurvatureEngine(model, "classification", kind, "kron", kfac_approx=approx, modules=[first]).compute(x, y)
    A, G = factor_reference(first, rest, x, y, kind, approx)
    block = result.blocks["0"]
    torch.testing.assert_close(block.A, A, **TOL)
    torch.testing.assert_close(block.G, G, **TOL)
    assert block.n.item() == len(x)


def test_expand_and_reduce_agree_without_weight_sharing():
    first, rest, x, y = first_layer_model("linear")
    model = nn.Sequential(first, rest)
    expand = CurvatureEngine(model, "classification", "ggn", "kron").compute(x, y).to_dense()
    reduce = CurvatureEngine(model, "classification", "ggn", "kron", kfac_approx="reduce").compute(x, y).to_dense()
    torch.testing.assert_close(expand, reduce, **TOL)


def test_conv_without_weight_sharing_is_exact_for_one_example():
    """A convolution whose kernel covers the whole input has one position: K-FAC is exact for B = 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(1, 4, 3, 3, dtype=torch.float64), torch.tensor([1])
    kron = CurvatureEngine(model, "classification", "ggn", "kron").compute(x, y)
    exact = dense.ggn(model, Classification(), x, y)
    where = dense.offsets(model)
    conv = torch.arange(where["0.weight"].start, where["0.bias"].stop)
    blocks = kron.to_dense()[conv.unsqueeze(1), conv.unsqueeze(0)]
    expected = exact[conv.unsqueeze(1), conv.unsqueeze(0)]
    # K-FAC keeps the groups as separate blocks: weight (6, 2, 3, 3) is 2 groups x 54, bias 2 x 3.
    group_of = torch.cat([torch.arange(108) // 54, torch.arange(6) // 3])
    group_mask = group_of.unsqueeze(1) == group_of.unsqueeze(0)
    torch.testing.assert_close(blocks, expected * group_mask, **TOL)


class ScaleShiftRule(ModuleRule):
    """x * scale + shift on (B, D): per-example gradients are (g * x, g)."""

    def prepare(self, module, inputs, trainable, dtype):
        return torch.cat([x.to(dtype) for x in inputs], dim=0), trainable

    def output_gradients(self, module, grads, dtype):
        return torch.cat([g.to(dtype) for g in grads], dim=0)

    def per_example_gradients(self, prepared, grads, index):
        x, trainable = prepared
        parts = {"scale": grads[index] * x[index], "shift": grads[index]}
        return [parts[name] for name in trainable]


@pytest.fixture
def scale_shift_rule():
    register_rule(ScaleShift, ScaleShiftRule())
    yield
    del _RULES[ScaleShift]


def test_registered_rule_replaces_the_fallback(scale_shift_rule, recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), ScaleShift(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    result = CurvatureEngine(model, "classification", "ggn", "full").compute(x, y)
    assert not [w for w in recwarn if "fallback" in str(w.message)]
    expected = dense.block_diagonal(dense.ggn(model, Classification(), x, y), model, dense.module_blocks(model))
    torch.testing.assert_close(result.to_dense(), expected, **TOL)


def test_register_rule_rejects_non_rules():
    with pytest.raises(ValueError, match="rule must be a ModuleRule, got function"):
        register_rule(nn.Linear, lambda module: None)
