"""CurvatureEngine against dense torch.func references (float64) and the exactness facts."""

import warnings

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine
from bayesso.likelihoods import Classification, Regression
from tests import dense
from tests.cases import CASES, CASES_BY_NAME, mixed_structures

EXACT_KINDS = ["ggn", "fisher_emp", "hessian"]
TOL = dict(rtol=1e-10, atol=1e-12)


def engine(model, likelihood, kind, structure, **kwargs):
    return CurvatureEngine(model, likelihood, kind, structure, **kwargs)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_full_equals_dense_reference_blocks(case, kind):
    model, x, y = case.data()
    reference = dense.reference(kind, model, case.likelihood, x, y)
    expected = dense.block_diagonal(reference, model, dense.module_blocks(model))
    result = engine(model, case.likelihood, kind, "full").compute(x, y)
    torch.testing.assert_close(result.to_dense(), expected, **TOL)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_diag_equals_dense_reference_diagonal(case, kind):
    model, x, y = case.data()
    reference = dense.reference(kind, model, case.likelihood, x, y)
    result = engine(model, case.likelihood, kind, "diag").compute(x, y)
    torch.testing.assert_close(result.diagonal(), reference.diagonal(), **TOL)
    torch.testing.assert_close(result.to_dense(), torch.diag(reference.diagonal()), **TOL)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_mixed_structures_equal_the_references_block_by_block(case, kind):
    """Per-module structures: full blocks are the dense reference's blocks, diagonal blocks its diagonal, and
    Kronecker blocks the single-structure K-FAC blocks (themselves checked against their definition)."""
    model, x, y = case.data()
    structures = mixed_structures(model, ("full", "diag") if kind == "hessian" else ("full", "kron", "diag"))
    reference = dense.reference(kind, model, case.likelihood, x, y)
    result = engine(model, case.likelihood, kind, structures).compute(x, y)
    kron = None if kind == "hessian" else engine(model, case.likelihood, kind, "kron").compute(x, y)
    where = dense.offsets(model)
    for name, block in result.blocks.items():
        index = torch.cat([torch.arange(where[n].start, where[n].stop) for n in block.names])
        expected = reference[index.unsqueeze(1), index.unsqueeze(0)]
        if structures[name] == "full":
            assert block.structure == "full"
            torch.testing.assert_close(block.to_dense(), expected, **TOL)
        elif block.structure == "diag":  # asked for, or "kron" without a K-FAC rule
            torch.testing.assert_close(block.to_dense(), torch.diag(expected.diagonal()), **TOL)
        else:
            assert structures[name] == "kron" and kron.blocks[name].structure == "kron"
            torch.testing.assert_close(block.to_dense(), kron.blocks[name].to_dense(), **TOL)


@pytest.mark.parametrize("kind", ["ggn", "fisher_emp", "fisher_mc"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kron_keeps_exact_diagonal_for_modules_without_kfac(case, kind):
    model, x, y = case.data()
    gen = torch.Generator().manual_seed(3)
    result = engine(model, case.likelihood, kind, "kron").compute(x, y, generator=gen)
    gen.manual_seed(3)
    exact = engine(model, case.likelihood, kind, "diag").compute(x, y, generator=gen)
    for name, block in result.blocks.items():
        if block.structure == "diag":
            torch.testing.assert_close(block.values, exact.blocks[name].values, **TOL)
    assert set(result.structures.values()) <= {"diag", "kron"}


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fisher_mc_is_empirical_fisher_of_sampled_labels(case, structure):
    model, x, y = case.data()
    gen = torch.Generator().manual_seed(7)
    result = engine(model, case.likelihood, "fisher_mc", structure).compute(x, y, generator=gen)
    sampled = case.likelihood.sample(model(x).detach(), torch.Generator().manual_seed(7))
    reference = dense.empirical_fisher(model, case.likelihood, x, sampled.reshape(y.shape))
    if structure == "full":
        expected = dense.block_diagonal(reference, model, dense.module_blocks(model))
        torch.testing.assert_close(result.to_dense(), expected, **TOL)
    else:
        torch.testing.assert_close(result.diagonal(), reference.diagonal(), **TOL)


@pytest.mark.parametrize("name", ["mlp", "mlp_regression", "mlp_binary", "mlp_heteroscedastic"])
def test_fisher_mc_averages_to_ggn(name):
    case = CASES_BY_NAME[name]
    model, x, y = case.data(batch_size=4)
    n = 4000
    result = engine(model, case.likelihood, "fisher_mc", "full", mc_samples=n)
    mc = result.compute(x, y, generator=torch.Generator().manual_seed(0)).to_dense()
    ggn = dense.block_diagonal(dense.ggn(model, case.likelihood, x, y), model, dense.module_blocks(model))
    # The estimator's entries have standard deviation of order |GGN| / sqrt(n) ~ 1.6% here.
    relative = (mc - ggn).norm() / ggn.norm()
    assert relative < 0.05, relative


@pytest.mark.parametrize("kind", ["ggn", "fisher_mc", "fisher_emp", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_diag_is_diagonal_of_full(case, kind):
    model, x, y = case.data()
    diag = engine(model, case.likelihood, kind, "diag").compute(x, y, generator=torch.Generator().manual_seed(1))
    full = engine(model, case.likelihood, kind, "full").compute(x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(diag.diagonal(), full.to_dense().diagonal(), **TOL)


def test_hessian_of_linear_gaussian_model_equals_ggn():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    likelihood = Regression(sigma=0.4)
    hessian = engine(model, likelihood, "hessian", "full").compute(x, y).to_dense()
    ggn = engine(model, likelihood, "ggn", "full").compute(x, y).to_dense()
    torch.testing.assert_close(hessian, ggn, **TOL)
    # and both are the closed form (X~^T X~ / sigma^2) ⊗ I over rows of W (bias appended)
    xb = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], dim=1)
    block = torch.kron(torch.eye(3, dtype=torch.float64), xb.T @ xb) / 0.4**2
    order = torch.cat([torch.arange(15).view(3, 5)[:, :4].reshape(-1), torch.arange(15).view(3, 5)[:, 4]])
    torch.testing.assert_close(ggn, block[order][:, order], **TOL)


@pytest.mark.parametrize("name", ["mlp", "mlp_heteroscedastic"])
@pytest.mark.parametrize("kind", ["ggn", "fisher_emp"])
def test_kron_equals_exact_block_for_one_example_through_linear_layers(kind, name):
    case = CASES_BY_NAME[name]
    model, x, y = case.data(batch_size=1)
    kron = engine(model, case.likelihood, kind, "kron").compute(x, y).to_dense()
    exact = dense.block_diagonal(dense.reference(kind, model, case.likelihood, x, y), model, dense.module_blocks(model))
    torch.testing.assert_close(kron, exact, **TOL)


def test_kron_exact_when_all_examples_share_the_input():
    """With identical layer inputs the input factor is exact: sum_i (g g^T) ⊗ (a a^T) = G ⊗ A."""
    case = CASES_BY_NAME["mlp"]
    model, x, _ = case.data(batch_size=1)
    x = x.expand(4, -1)
    y = torch.tensor([0, 1, 2, 1])
    kron = engine(model, case.likelihood, "fisher_emp", "kron").compute(x, y).to_dense()
    exact = dense.block_diagonal(
        dense.empirical_fisher(model, case.likelihood, x, y), model, dense.module_blocks(model)
    )
    torch.testing.assert_close(kron, exact, **TOL)


@pytest.mark.parametrize("modules", [["2"], "last_layer"])
def test_restricting_to_a_subset_of_modules(modules):
    case = CASES_BY_NAME["mlp"]
    model, x, y = case.data()
    result = engine(model, case.likelihood, "ggn", "full", modules=modules).compute(x, y)
    assert list(result.blocks) == ["2"]
    reference = dense.ggn(model, case.likelihood, x, y)
    expected = dense.block_diagonal(reference, model, [["2.weight", "2.bias"]])
    torch.testing.assert_close(result.to_dense(), expected, **TOL)
    torch.testing.assert_close(result.to_dense(covered_only=True), reference[-15:, -15:], **TOL)


def test_subset_given_as_module_objects():
    case = CASES_BY_NAME["conv2d"]
    model, x, y = case.data()
    result = engine(model, case.likelihood, "ggn", "diag", modules=[model[0], model[5]]).compute(x, y)
    assert list(result.blocks) == ["0", "5"]


def test_frozen_parameters_are_left_out():
    case = CASES_BY_NAME["mlp"]
    model, x, y = case.data()
    model[0].weight.requires_grad_(False)
    result = engine(model, case.likelihood, "ggn", "full").compute(x, y)
    assert result.parameter_names == ("0.bias", "2.weight", "2.bias")
    expected = dense.block_diagonal(
        dense.ggn(model, case.likelihood, x, y), model, [["0.bias"], ["2.weight", "2.bias"]]
    )
    torch.testing.assert_close(result.to_dense(), expected, **TOL)
    kron = engine(model, case.likelihood, "ggn", "kron").compute(x, y)
    assert kron.blocks["0"].A.shape == (1, 1, 1)  # bias only: input factor is the constant 1


def test_bias_free_layer_kron_and_full():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    kron = engine(model, Classification(), "ggn", "kron").compute(x, y).to_dense()
    exact = dense.block_diagonal(dense.ggn(model, Classification(), x, y), model, dense.module_blocks(model))
    torch.testing.assert_close(kron, exact, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_gives_float32_curvature(dtype):
    case = CASES_BY_NAME["conv2d"]
    model, x, y = case.data()
    low = model.to(dtype)
    result = engine(low, case.likelihood, "ggn", "diag").compute(x.to(dtype), y)
    assert result.diagonal().dtype == torch.float32
    reference = dense.ggn(low.double(), case.likelihood, x.to(dtype).double(), y).diagonal()
    # Forward and backward run in the model's precision (8 or 11 mantissa bits).
    tolerance = {torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    assert (result.diagonal().double() - reference).norm() / reference.norm() < tolerance
    hessian = engine(low.to(dtype), case.likelihood, "hessian", "diag").compute(x.to(dtype), y)
    assert hessian.diagonal().dtype == torch.float32


def test_compute_leaves_grads_hooks_and_parameters_untouched():
    case = CASES_BY_NAME["residual"]
    model, x, y = case.data()
    before = {n: p.clone() for n, p in model.named_parameters()}
    for kind in ["ggn", "fisher_mc", "fisher_emp", "hessian"]:
        engine(model, case.likelihood, kind, "diag").compute(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_compute_accepts_a_tuple_of_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    torch.manual_seed(0)
    model = TwoInputs().double()
    u, v, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    result = engine(model, Classification(), "ggn", "full").compute((u, v), y).to_dense()
    assert result.shape == (14, 14) and torch.isfinite(result).all()
    assert result[:8, 8:].abs().max() == 0  # block-diagonal over modules


def test_fallback_warning_names_each_module_once():
    case = CASES_BY_NAME["functional"]
    model, x, y = case.data()
    with pytest.warns(UserWarning, match=r"'custom' \(ScaleShift\).*'act' \(PReLU\).*falls back to 'diag'"):
        eng = CurvatureEngine(model, case.likelihood, "ggn", "kron")
    with pytest.warns(UserWarning, match=r"'fc' \(Linear\).*not called through its own forward"):
        eng.compute(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng.compute(x, y)


def test_batchnorm_in_training_mode_warns():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.warns(UserWarning, match="'1' \\(BatchNorm1d\\).*training mode"):
        CurvatureEngine(model, "classification", "ggn", "diag").compute(x, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="laplace"), "kind must be one of .*'laplace'"),
        (dict(structure="block"), "structure must be one of .*'block'"),
        (dict(kind="hessian", structure="kron"), "structure='kron'"),
        (dict(kfac_approx="mean"), "kfac_approx must be one of .*'mean'"),
        (dict(kind="fisher_mc", mc_samples=0), "mc_samples must be a positive integer, got 0"),
        (dict(modules=["nope"]), "'nope', which is not a submodule"),
        (dict(modules="last"), "modules must be None, 'last_layer'"),
        (dict(likelihood="poisson"), "likelihood must be one of .*'poisson'"),
    ],
)
def test_bad_configuration_raises_value_error(kwargs, match):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    args = dict(likelihood="classification", kind="ggn", structure="diag") | kwargs
    with pytest.raises(ValueError, match=match):
        CurvatureEngine(model, **args)


def test_full_block_above_the_limit_is_refused_up_front():
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    with pytest.raises(ValueError, match=r"33,280 x 33,280 block for module '0' \(Linear\).*4.13 GiB.*'kron'"):
        CurvatureEngine(model, "classification", "ggn", "full")
    with pytest.raises(ValueError, match="Hessian-vector product per parameter"):
        CurvatureEngine(model, "classification", "hessian", "diag")
    CurvatureEngine(model, "classification", "ggn", "full", modules="last_layer")  # 5,130 parameters fit


BAD_BATCHES = [
    ("classification", torch.randn(4, 3), torch.tensor([0, 1, -1, 0]), "in \\[0, C\\), got target -1"),
    ("classification", torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), "C=2, got target 2"),
    ("classification", torch.randn(4, 3), torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer class indices.*float32"),
    ("classification", torch.randn(4, 3), torch.tensor([0, 1, 1]), "batch size mismatch.*\\[4\\].*3"),
    ("classification", torch.randn(0, 3), torch.zeros(0, dtype=torch.long), "batch is empty"),
    ("classification", torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), "shape \\(B,\\), got \\(4, 2\\)"),
    ("binary", torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0]), "binary targets must be 0 or 1, got 2.0"),
    ("regression", torch.randn(4, 3), torch.tensor([[0.0, float("nan")]] * 4), "regression targets must be finite"),
    ("regression", torch.randn(4, 3), torch.zeros(4), "outputs' shape \\(4, 2\\), got \\(4,\\)"),
    ("regression", torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), "floating point, got dtype torch.int64"),
]


@pytest.mark.parametrize("likelihood, x, y, match", BAD_BATCHES)
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_bad_batch_raises_and_mutates_nothing(likelihood, x, y, match, kind):
    n_out = 1 if likelihood == "binary" else 2
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, n_out))
    before = [p.clone() for p in model.parameters()]
    eng = CurvatureEngine(model, likelihood, kind, "diag")
    with pytest.raises(ValueError, match=match):
        eng.compute(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_non_finite_outputs_raise_floating_point_error():
    model = nn.Linear(3, 2)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        CurvatureEngine(model, "classification").compute(torch.tensor([[float("inf"), 0.0, 1.0]]), torch.tensor([0]))


def test_model_returning_a_tuple_is_a_clear_error():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(ValueError, match="must return a tensor of outputs, got tuple"):
        CurvatureEngine(Pair(), "classification").compute(torch.randn(2, 3), torch.tensor([0, 1]))


def test_module_seeing_the_batch_in_another_dimension_is_a_clear_error():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.transpose(0, 1)).mean(dim=0)

    model = SequenceFirst()
    with pytest.raises(ValueError, match="batch \\(4\\) in dimension 0"):
        CurvatureEngine(model, "classification").compute(torch.randn(4, 5, 3), torch.tensor([0, 1, 1, 0]))
    assert not model.fc._forward_hooks
