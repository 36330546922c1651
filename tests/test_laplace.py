"""Post-hoc Laplace and its marginal likelihood against closed forms and dense float64 references."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.data import make_loader
from bayesso.laplace import optimize_prior_precision
from bayesso.likelihoods import Regression
from bayesso.optim import VOGN
from tests.cases import CASES_BY_NAME, mixed_structures
from tests.dense import block_diagonal, flat_parameters, ggn, loss_hessian, module_blocks, posterior_index

SIGMA, DELTA = 0.4, 2.0


def _linear_regression(structure: str, n: int = 30, d: int = 3, outputs: int = 2, seed: int = 0):
    """A Linear model at the MAP of Bayesian linear regression, its loader, and the design Φ, targets Y.

    "diag" is exact when ΦᵀΦ is diagonal: orthogonal inputs and no bias.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    bias = structure != "diag"
    if not bias:
        x = torch.linalg.qr(x).Q * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)[:d]
    phi = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
    y = phi @ torch.randn(phi.shape[1], outputs, generator=gen, dtype=torch.float64)
    y = y + SIGMA * torch.randn(n, outputs, generator=gen, dtype=torch.float64)
    precision = phi.T @ phi / SIGMA**2 + DELTA * torch.eye(phi.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(precision, phi.T @ y / SIGMA**2)  # the MAP, one column per output
    module = nn.Linear(d, outputs, bias=bias).double()
    with torch.no_grad():
        module.weight.copy_(weights[:d].T)
        if bias:
            module.bias.copy_(weights[d])
    model = BayesianModel(module, Regression(SIGMA), structure, prior_precision=DELTA)
    return model, make_loader(x, y, batch_size=7, shuffle=False), phi, y, precision


def _exact_precision(phi: torch.Tensor, precision: torch.Tensor, outputs: int, bias: bool) -> torch.Tensor:
    """The posterior precision over (W row-major, b): one copy of ΦᵀΦ/σ² + δI per output."""
    d = phi.shape[1] - int(bias)
    size = outputs * phi.shape[1]
    dense = torch.zeros(size, size, dtype=torch.float64)
    for o in range(outputs):
        index = torch.tensor([o * d + j for j in range(d)] + ([outputs * d + o] if bias else []))
        dense[index.unsqueeze(1), index.unsqueeze(0)] = precision
    return dense


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_linear_gaussian_laplace_is_the_exact_posterior_and_evidence(structure, kind):
    if structure == "kron" and kind == "hessian":
        kind = "ggn"  # the Hessian has no Kronecker structure; the GGN equals it here
    model, loader, phi, y, precision = _linear_regression(structure)
    posterior = model.fit_laplace(loader, kind=kind, progress=False)
    expected = _exact_precision(phi, precision, 2, bias=structure != "diag")
    torch.testing.assert_close(posterior.precision_dense(), expected, rtol=1e-10, atol=1e-9)
    marginal = torch.distributions.MultivariateNormal(
        torch.zeros(len(y), dtype=torch.float64),
        SIGMA**2 * torch.eye(len(y), dtype=torch.float64) + phi @ phi.T / DELTA,
    )
    evidence = sum(marginal.log_prob(y[:, o]) for o in range(y.shape[1]))
    assert model.log_marginal_likelihood().item() == pytest.approx(evidence.item(), rel=1e-10)
    assert model.laplace_fit.n_examples == 30 and posterior.dataset_size == 30


SEQUENTIAL = ["mlp", "mlp_binary", "mlp_regression", "mlp_heteroscedastic", "conv1d", "conv2d", "batchnorm",
              "layernorm_groupnorm"]  # fmt: skip


@pytest.mark.parametrize("structure", ["diag", "full", "mixed"])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("name", SEQUENTIAL)
def test_diag_full_and_mixed_keep_each_modules_dense_block_or_its_diagonal(name, kind, structure):
    """Summed over the loader; "mixed": full and diagonal modules in turn (``mixed_structures``)."""
    case = CASES_BY_NAME[name]
    module, x, y = case.data(batch_size=9)
    structures = mixed_structures(module, ("full", "diag") if structure == "mixed" else (structure,))
    model = BayesianModel(
        module, case.likelihood, structures if structure == "mixed" else structure, prior_precision=0.7
    )
    posterior = model.fit_laplace(make_loader(x, y, 4, shuffle=False), kind=kind, progress=False)
    dense = (ggn if kind == "ggn" else loss_hessian)(module, case.likelihood, x, y)
    reference = block_diagonal(dense, module, module_blocks(module))
    index = posterior_index(posterior)
    expected = reference[index.unsqueeze(1), index.unsqueeze(0)]
    for plan, where in zip(posterior.plans, posterior.block_slices()):
        block = expected[where, where]
        if structures[plan.name] == "full":  # an indefinite Hessian's negative eigenvalues are dropped, per block
            values, vectors = torch.linalg.eigh(block)
            expected[where, where] = vectors @ torch.diag(values.clamp_min(0)) @ vectors.T
        else:  # ... and its negative diagonal entries
            expected[where, where] = torch.diag(block.diagonal().clamp_min(0))
    eye = torch.eye(len(index), dtype=torch.float64)
    torch.testing.assert_close(posterior.precision_dense(), expected + 0.7 * eye, rtol=1e-7, atol=1e-9)
    assert set(posterior.statistic.structures.values()) == set(structures.values())
    assert not module.training  # the zoo's eval mode is kept


def test_kron_over_a_loader_equals_kfac_of_all_the_data_and_is_exact_for_one_example():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=9)
    model = BayesianModel(module, case.likelihood, "kron", prior_precision=0.7)
    posterior = model.fit_laplace(make_loader(x, y, 4, shuffle=False), progress=False)
    whole = CurvatureEngine(module, case.likelihood, "ggn", "kron").compute(x, y).to_dense()
    torch.testing.assert_close(posterior.precision_dense(), whole + 0.7 * torch.eye(len(whole), dtype=torch.float64))
    single = model.fit_laplace([(x[:1], y[:1])], progress=False)
    exact = block_diagonal(ggn(module, case.likelihood, x[:1], y[:1]), module, module_blocks(module))
    torch.testing.assert_close(single.precision_dense(), exact + 0.7 * torch.eye(len(exact), dtype=torch.float64))


def test_last_layer_and_module_subsets():
    case = CASES_BY_NAME["conv2d"]
    module, x, y = case.data(batch_size=6)
    model = BayesianModel(module, case.likelihood, "diag", prior_precision=1.5)
    posterior = model.fit_laplace([(x, y)], structure="kron", modules="last_layer", progress=False)
    assert [p.name for p in posterior.plans] == ["5"] and posterior.numel == 15
    assert posterior.kfac_damping == "exact" and model.posterior is posterior
    engine = CurvatureEngine(module, case.likelihood, "ggn", "kron", modules="last_layer")
    index = posterior_index(posterior)
    kfac = engine.compute(x, y).to_dense()[index.unsqueeze(1), index.unsqueeze(0)]
    torch.testing.assert_close(posterior.precision_dense(), kfac + 1.5 * torch.eye(15, dtype=torch.float64))
    chosen = model.fit_laplace([(x, y)], structure="full", modules=["0", "5"], progress=False)
    assert [p.name for p in chosen.plans] == ["0", "5"]
    torch.testing.assert_close(chosen.prior_precision, torch.full((2,), 1.5, dtype=torch.float64))


def _finite_difference(function, value: float, h: float = 1e-6) -> float:
    return (function(value + h) - function(value - h)) / (2 * h)


def test_marglik_gradients_match_finite_differences():
    model, loader, *_ = _linear_regression("kron")
    model.fit_laplace(loader, progress=False)
    delta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.55, dtype=torch.float64, requires_grad=True)
    value = model.log_marginal_likelihood(delta, sigma)
    grad_delta, grad_sigma = torch.autograd.grad(value, [delta, sigma])

    def at(d, s):
        with torch.no_grad():
            return model.log_marginal_likelihood(torch.tensor(d, dtype=torch.float64), s).item()

    assert grad_delta.item() == pytest.approx(_finite_difference(lambda d: at(d, 0.55), 1.3), rel=1e-6)
    assert grad_sigma.item() == pytest.approx(_finite_difference(lambda s: at(1.3, s), 0.55), rel=1e-6)

    case = CASES_BY_NAME["conv2d"]
    module, x, y = case.data(batch_size=6)
    model = BayesianModel(module, case.likelihood, "kron")
    model.fit_laplace([(x, y)], progress=False)
    per_module = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(model.log_marginal_likelihood(per_module), per_module)
    for i in range(3):

        def at_block(v, i=i):
            values = per_module.detach().clone()
            values[i] = v
            return model.log_marginal_likelihood(values).item()

        assert gradient[i].item() == pytest.approx(_finite_difference(at_block, per_module[i].item()), rel=1e-5)


def test_moving_sigma_matches_a_fit_at_that_sigma():
    model, loader, *_ = _linear_regression("full")
    model.fit_laplace(loader, progress=False)
    moved = model.log_marginal_likelihood(sigma=0.9).item()
    refit, loader, *_ = _linear_regression("full")
    refit.likelihood.sigma = 0.9
    refit.fit_laplace(loader, progress=False)
    assert moved == pytest.approx(refit.log_marginal_likelihood().item(), rel=1e-10)


def test_heteroscedastic_laplace_evidence_and_its_tuning():
    case = CASES_BY_NAME["mlp_heteroscedastic"]
    module, x, y = case.data(batch_size=12)
    model = BayesianModel(module, "heteroscedastic", "full", prior_precision=DELTA)
    posterior = model.fit_laplace(make_loader(x, y, 5, shuffle=False), progress=False)
    eye = torch.eye(posterior.numel, dtype=torch.float64)
    curvature = block_diagonal(ggn(module, case.likelihood, x, y), module, module_blocks(module))  # per module
    precision = curvature + DELTA * eye  # the GGN through the natural parameters
    torch.testing.assert_close(posterior.precision_dense(), precision, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        f = module(x)
    nll = -torch.distributions.Normal(f[:, :2], (f[:, 2:] / 2).exp()).log_prob(y).sum()
    assert model.laplace_fit.nll == pytest.approx(nll.item(), rel=1e-12) and model.laplace_fit.sigma == 1.0
    theta, size = flat_parameters(module), posterior.numel
    prior = torch.distributions.MultivariateNormal(torch.zeros(size, dtype=torch.float64), eye / DELTA)
    laplace = -nll + prior.log_prob(theta) + 0.5 * size * math.log(2 * math.pi) - 0.5 * torch.logdet(precision)
    assert model.log_marginal_likelihood().item() == pytest.approx(laplace.item(), rel=1e-10)

    with pytest.raises(ValueError, match="optimize_sigma needs the regression likelihood.*Heteroscedastic has no σ"):
        model.optimize_prior_precision(optimize_sigma=True)
    with pytest.raises(ValueError, match="not regression \\(its likelihood is Heteroscedastic\\)"):
        model.log_marginal_likelihood(sigma=0.5)
    result = model.optimize_prior_precision()
    assert result["log_marginal_likelihood"] > laplace.item() and result["sigma"] is None
    log_delta = model.posterior.prior_precision[0].log().requires_grad_(True)  # one δ for both blocks
    (slope,) = torch.autograd.grad(model.log_marginal_likelihood(log_delta.exp()), log_delta)
    assert abs(slope.item()) < 1e-6  # a stationary point of the evidence
    with warnings.catch_warnings():  # which end of this small grid wins does not matter here
        warnings.filterwarnings("ignore", message=".*value of the grid")
        grid = model.optimize_prior_precision("grid", val_loader=[(x, y)], grid=[0.1, 1.0, 10.0])  # linearized
    assert all(math.isfinite(score) for score in grid["scores"])


class TwoBlocks(nn.Module):
    """Two linear maps on the two halves of the input, summed: one prior precision each."""

    def __init__(self, d: int, outputs: int) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(d, outputs, bias=False), nn.Linear(d, outputs, bias=False)

    def forward(self, x):
        half = x.shape[1] // 2
        return self.left(x[:, :half]) + self.right(x[:, half:])


def _synthetic(deltas: tuple[float, float], sigma: float, n: int = 400, d: int = 10, outputs: int = 30):
    """Data from y = f(x; θ) + σ ε with θ drawn from the prior N(0, I/δ) of each block."""
    gen = torch.Generator().manual_seed(0)
    module = TwoBlocks(d, outputs).double()
    with torch.no_grad():
        for layer, delta in zip([module.left, module.right], deltas):
            layer.weight.copy_(torch.randn(outputs, d, generator=gen, dtype=torch.float64) / math.sqrt(delta))
    x = torch.randn(n, 2 * d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = module(x) + sigma * torch.randn(n, outputs, generator=gen, dtype=torch.float64)
    return module, x, y


def _map(module: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """Least squares with a small ridge, written into the module (the MAP under a weak prior)."""
    weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y)
    half = x.shape[1] // 2
    with torch.no_grad():
        module.left.weight.copy_(weights[:half].T)
        module.right.weight.copy_(weights[half:].T)


def test_evidence_maximisation_recovers_the_prior_precisions_and_the_noise():
    module, x, y = _synthetic((4.0, 25.0), sigma=0.3)
    _map(module, x, y, ridge=1e-3)
    model = BayesianModel(module, Regression(1.0), "kron", prior_precision=1.0)
    model.fit_laplace(make_loader(x, y, 100, shuffle=False), progress=False)
    result = model.optimize_prior_precision(granularity="module", optimize_sigma=True)
    assert result["sigma"] == pytest.approx(0.3, rel=0.05) and model.likelihood.sigma == result["sigma"]
    torch.testing.assert_close(model.posterior.prior_precision, torch.tensor([4.0, 25.0], dtype=torch.float64),
                               rtol=0.15, atol=0)  # fmt: skip
    assert result["log_marginal_likelihood"] == pytest.approx(model.log_marginal_likelihood().item())
    before = result["log_marginal_likelihood"]
    for nudged in ([4.4, 25.0], [4.0, 22.0]):
        assert model.log_marginal_likelihood(torch.tensor(nudged, dtype=torch.float64)).item() < before
    scalar = model.optimize_prior_precision()
    assert scalar["prior_precision"].unique().numel() == 1 and scalar["sigma"] is None


def test_grid_edge_warnings_point_at_the_callers_line_through_either_entry_point():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=40)
    model = BayesianModel(module, case.likelihood, "kron")
    model.fit_laplace([(x[:30], y[:30])], progress=False)
    options = dict(val_loader=[(x[30:], y[30:])], grid=[1e-8, 2e-8])  # far too small: the edge is chosen
    for call in (
        lambda: model.optimize_prior_precision("grid", **options),
        lambda: optimize_prior_precision(model, "grid", **options),
    ):
        with pytest.warns(UserWarning, match="value of the grid") as caught:
            call()
        assert {Path(w.filename).name for w in caught} == {"test_laplace.py"}


def test_grid_search_picks_the_lowest_validation_nll():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=40)
    model = BayesianModel(module, case.likelihood, "kron")
    model.fit_laplace([(x[:30], y[:30])], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.optimize_prior_precision("grid", val_loader=[(x[30:], y[30:])], grid=[0.01, 1.0, 100.0])
    best = min(range(3), key=result["scores"].__getitem__)
    at_edge = [str(w.message) for w in caught if "value of the grid" in str(w.message)]
    assert len(at_edge) == (best != 1)  # a choice at either end of the grid is reported, one inside is not
    if best != 1:
        assert f"{'largest' if best == 2 else 'smallest'} value of the grid" in at_edge[0]
    scores = result["scores"]
    with warnings.catch_warnings(record=True) as caught:  # a grid around the best value: no warning
        warnings.simplefilter("always")
        value = [0.01, 1.0, 100.0][best]
        inner = model.optimize_prior_precision(
            "grid", val_loader=[(x[30:], y[30:])], grid=[value / 3, value, value * 3]
        )
    assert scores[best] == inner["scores"][1]
    if inner["scores"][1] == min(inner["scores"]):
        assert not [w for w in caught if "value of the grid" in str(w.message)]
    assert result["prior_precision"].tolist() == [[0.01, 1.0, 100.0][best]] * 2  # one per block
    assert result["val_nll"] == min(result["scores"]) and len(set(result["scores"])) == 3
    with pytest.raises(ValueError, match="pass val_loader"):
        model.optimize_prior_precision("grid")
    with pytest.raises(ValueError, match="one scalar prior precision"):
        model.optimize_prior_precision("grid", granularity="module", val_loader=[(x, y)])


def test_vi_starts_from_a_laplace_posterior_and_laplace_refits_at_the_vi_mean():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=12)
    model = BayesianModel(module, case.likelihood, "diag", prior_precision=2.0)
    laplace = model.fit_laplace([(x, y)], progress=False)
    variance = laplace.variance().clone()
    optimizer = VOGN(model, lr=1e-2, damping=0.0, betas=(0.9, 0.99))
    torch.testing.assert_close(model.posterior.variance(), variance)  # the VI posterior starts where Laplace ended
    statistic = laplace.statistic.to_dense().diagonal().clone()

    def closure():
        optimizer.zero_grad()
        loss = case.likelihood.nll(module(x), y) / len(y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    moved = model.posterior.statistic.to_dense().diagonal()
    assert not torch.allclose(moved, statistic) and (moved > 0.5 * 0.99**3 * statistic).all()  # EMA from Laplace's
    refit = model.fit_laplace([(x, y)], progress=False)  # at the VI mean
    index = posterior_index(refit)
    dense = ggn(module, case.likelihood, x, y)[index.unsqueeze(1), index.unsqueeze(0)].diagonal()
    torch.testing.assert_close(refit.precision_dense().diagonal(), dense + 2.0)


def test_bad_input_changes_nothing():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=6)
    model = BayesianModel(module, case.likelihood, "diag")
    original = model.posterior
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        model.fit_laplace([], progress=False)
    with pytest.raises(ValueError, match="batch size mismatch"):
        model.fit_laplace([(x, y[:3])], progress=False)
    with pytest.raises(ValueError, match=r"expected \(x, y\) batches"):
        model.fit_laplace([x], progress=False)
    with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
        model.fit_laplace([(x, y)], prior_precision=-1.0, progress=False)
    with pytest.raises(ValueError, match="structure must be"):
        model.fit_laplace([(x, y)], structure="dense", progress=False)
    with pytest.raises(ValueError, match="call fit_laplace"):
        model.log_marginal_likelihood()
    assert model.posterior is original and model.laplace_fit is None
    with torch.no_grad():
        module[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        model.fit_laplace([(x, y)], progress=False)
    assert model.posterior is original
    with torch.no_grad():
        module[0].weight[0, 0] = 0.1
    model.fit_laplace([(x, y)], progress=False)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        model.log_marginal_likelihood(-1.0)
    with pytest.raises(ValueError, match="one per block"):
        model.log_marginal_likelihood(torch.ones(5))
    with pytest.raises(ValueError, match="not regression"):
        model.log_marginal_likelihood(sigma=1.0)
    with pytest.raises(ValueError, match="optimize_sigma needs the regression likelihood"):
        model.optimize_prior_precision(optimize_sigma=True)
    with pytest.raises(ValueError, match="method must be 'marglik' or 'grid'"):
        model.optimize_prior_precision("bayes")


class AttentionBlock(nn.Module):
    """A small transformer block: attention (generic fallback), layer norm and linear layers (rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        attended, _ = self.attention(h, h, h, need_weights=False)
        return self.head(self.norm(h + attended).mean(dim=1))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_laplace_and_evidence_tuning_on_a_transformer_block(structure):
    torch.manual_seed(0)
    module = AttentionBlock().eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    model = BayesianModel(module, "classification", structure, prior_precision=1.0)
    model.fit_laplace(make_loader(x, y, 10), progress=False)
    statistic = [t for block in model.posterior.statistic.blocks.values() for t in block.tensors()]
    assert not any(t.requires_grad for t in statistic)
    start = float(model.log_marginal_likelihood())
    result = model.optimize_prior_precision()
    assert math.isfinite(result["log_marginal_likelihood"]) and result["log_marginal_likelihood"] > start
    assert model.predict(x, method="probit").probs.shape == (40, 3)


@pytest.mark.filterwarnings("ignore:the best prior precision")
def test_grid_search_on_a_single_class_warns_and_a_mixed_one_does_not():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=40)
    model = BayesianModel(module, case.likelihood, "diag")
    model.fit_laplace([(x, y)], progress=False)
    label = int(y[0])
    one_class = [(x[y == label], y[y == label])]
    with pytest.warns(UserWarning, match=rf"optimize_prior_precision\(method='grid'\): all \d+ held-out labels are "
                      rf"class {label}"):  # fmt: skip
        model.optimize_prior_precision("grid", val_loader=one_class, grid=[0.1, 1.0, 10.0])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*held-out labels are class")
        result = model.optimize_prior_precision("grid", val_loader=[(x, y)], grid=[0.1, 1.0, 10.0])
    assert len(set(y.tolist())) > 1 and len(result["scores"]) == 3
