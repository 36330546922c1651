"""VIOptimizer and presets: closed forms, sampling std, IVON positivity, resume, schedulers, bad input."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import vector_to_parameters

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.optim import IVON, VOGN, NoisyAdam, NoisyKFAC, VIOptimizer
from bayesso.optim.ivon import ivon_hessian_update
from tests import dense
from tests.cases import CASES_BY_NAME


def linear_regression(n=40, sigma=0.5, delta=2.0, seed=0):
    """Data, and the exact posterior precision and mean over [W.flatten(), b]."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + sigma * torch.randn(n, generator=gen).double()
    Xb = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    precision = Xb.T @ Xb / sigma**2 + delta * torch.eye(4, dtype=torch.float64)
    return X, y.unsqueeze(1), precision, torch.linalg.solve(precision, Xb.T @ y / sigma**2)


def regression_model(structure, n=40, sigma=0.5, delta=2.0):
    torch.manual_seed(1)
    return BayesianModel(
        nn.Linear(3, 1).double(), "regression", posterior=structure, prior_precision=delta, dataset_size=n, sigma=sigma
    )


def closure_for(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = model.likelihood.nll(model.module(x), y) / len(y)
        loss.backward()
        return loss

    return closure


def test_full_gaussian_is_the_exact_posterior_after_one_step():
    X, y, precision, mean = linear_regression()
    model = regression_model("full")
    optimizer = VIOptimizer(model, lr=1.0, curvature="ggn", betas=(0.0, 0.0))
    optimizer.step(closure_for(model, optimizer, X, y))  # first step at the mean, beta2 = 0
    torch.testing.assert_close(model.posterior.precision_dense(), precision, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(model.posterior.mean(), mean, rtol=1e-12, atol=1e-12)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 / (1 + t / 20))
    for _ in range(300):  # noisy steps at sampled weights keep the mean at the exact posterior mean
        optimizer.step(closure_for(model, optimizer, X, y))
        scheduler.step()
    std = model.posterior.variance().sqrt()
    assert ((model.posterior.mean() - mean).abs() < 0.25 * std).all()


def test_a_mixed_posterior_takes_the_per_block_newton_step_from_the_mean():
    """First step at the mean with betas 0 and lr 1: S is the batch's GGN per block (dense for the full block, the
    K-FAC block for the Kronecker one) and the mean moves by -(S + λ)⁻¹(g + δ̃μ) in each block."""
    X, y, _, _ = linear_regression()
    torch.manual_seed(2)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    structures = {"0": "full", nn.Linear: "kron"}
    model = BayesianModel(module, "regression", structures, prior_precision=2.0, dataset_size=40, sigma=0.5)
    start = model.posterior.mean()
    optimizer = VIOptimizer(model, lr=1.0, curvature="ggn", betas=(0.0, 0.0))
    optimizer.step(closure_for(model, optimizer, X, y))
    module_at_start = copy.deepcopy(module)
    vector_to_parameters(start, module_at_start.parameters())
    gauss_newton = dense.ggn(module_at_start, model.likelihood, X, y) / 40
    kron = CurvatureEngine(module_at_start, model.likelihood, "ggn", "kron").compute(X, y).blocks["2"].to_dense() / 40
    first = slice(0, 16)
    statistic = torch.block_diag(gauss_newton[first, first], kron)
    damping = 1.0 * 2.0 / 40
    precision = statistic + damping * torch.eye(21, dtype=torch.float64)
    torch.testing.assert_close(model.posterior.precision_dense(), 40 * precision, rtol=1e-10, atol=1e-10)
    module_at_start.zero_grad()
    (model.likelihood.nll(module_at_start(X), y) / 40).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in module_at_start.parameters()])
    expected = start - torch.linalg.solve(precision, gradient + damping * start)
    torch.testing.assert_close(model.posterior.mean(), expected, rtol=1e-10, atol=1e-12)


def test_diagonal_gaussian_reaches_the_mean_field_optimum():
    X, y, precision, mean = linear_regression()
    model = regression_model("diag")
    optimizer = VIOptimizer(model, lr=1.0, curvature="ggn", betas=(0.0, 0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 if t == 0 else 0.5 / (1 + t / 20))
    for _ in range(400):
        optimizer.step(closure_for(model, optimizer, X, y))
        scheduler.step()
    # Mean-field optimum for a Gaussian target: precision diag(Λ), mean the exact mean.
    torch.testing.assert_close(
        model.posterior.precision_dense(), torch.diag(precision.diagonal()), rtol=1e-10, atol=1e-9
    )
    std = model.posterior.variance().sqrt()
    assert ((model.posterior.mean() - mean).abs() < 0.25 * std).all()


def classifier(structure="diag", seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = (
        [nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)]
        if batchnorm
        else [nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)]
    )
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return BayesianModel(nn.Sequential(*layers), "classification", posterior=structure, dataset_size=320), x, y


def test_vogn_sampling_std():
    model, x, y = classifier()
    optimizer = VOGN(model, lr=1e-3, temperature=0.5, damping=1e-3, prior_precision=4.0)
    for _ in range(3):
        optimizer.step(closure_for(model, optimizer, x, y))
    s = model.posterior.statistic.diagonal()
    expected = (0.5 / (320 * (s + 0.5 * 4.0 / 320 + 1e-3))).sqrt()
    torch.testing.assert_close(
        model.posterior.variance().sqrt(), expected.float() if expected.dtype != torch.float32 else expected
    )
    samples = model.posterior.sample(20000, generator=torch.Generator().manual_seed(0))
    assert ((samples.std(0) / expected - 1).abs() < 0.04).all()  # 20,000 samples: std error ~0.5%


@pytest.mark.parametrize("seed", range(5))
def test_ivon_precision_stays_positive_for_any_estimate(seed):
    gen = torch.Generator().manual_seed(seed)
    h = (0.1 + torch.rand(1000, generator=gen, dtype=torch.float64)) * 10.0 ** torch.randint(
        -6, 3, (1000,), generator=gen
    )
    estimate = torch.randn(1000, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -3, 6, (1000,), generator=gen
    )
    for damping in (0.0, 1e-4, 1.0):
        new = ivon_hessian_update(h, estimate, 0.99, torch.tensor(damping, dtype=torch.float64))
        assert ((new + damping) >= 0.5 * (h + damping) * (1 - 1e-12)).all()
        if damping == 0.0:
            assert (new > 0).all()


def test_ivon_step_keeps_a_valid_posterior_under_huge_gradients():
    model, x, y = classifier()
    optimizer = IVON(model, lr=0.1, hess_init=0.01)

    def closure():
        optimizer.zero_grad()
        loss = 1e4 * model.likelihood.nll(model.module(x), y) / len(y)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    assert (model.posterior.variance() > 0).all() and torch.isfinite(model.posterior.mean()).all()


PRESETS = [(VOGN, "diag", {}), (NoisyAdam, "diag", {}), (NoisyKFAC, "kron", {}), (IVON, "diag", {})]


@pytest.mark.parametrize("preset, structure, options", PRESETS, ids=lambda p: getattr(p, "__name__", ""))
def test_state_dict_round_trip_continues_identically(preset, structure, options, tmp_path):
    model, x, y = classifier(structure, batchnorm=True)
    optimizer = preset(model, mc_samples=2, **options)
    for _ in range(3):
        optimizer.step(closure_for(model, optimizer, x, y))
    model.save(tmp_path / "model.pt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    reference = []
    for _ in range(3):
        optimizer.step(closure_for(model, optimizer, x, y))
        reference.append(model.posterior.mean())

    fresh = copy.deepcopy(model.module)
    restored = BayesianModel.load(tmp_path / "model.pt", fresh)
    resumed = preset(restored, mc_samples=2, seed=123, **options)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=False))
    for expected in reference:
        resumed.step(closure_for(restored, resumed, x, y))
        assert torch.equal(restored.posterior.mean(), expected)


def test_lr_scheduler_drives_the_step_size():
    model, x, y = classifier()
    optimizer = VOGN(model, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.0 + 1e-9)
    optimizer.step(closure_for(model, optimizer, x, y))
    scheduler.step()
    before = model.posterior.mean()
    optimizer.step(closure_for(model, optimizer, x, y))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-12)
    assert (model.posterior.mean() - before).abs().max() < 1e-6


def test_gradient_accumulation_matches_one_full_batch_step():
    model_a, x, y = classifier()
    model_b = copy.deepcopy(model_a)
    full = VOGN(model_a, lr=1e-2, init_precision=None)
    full.step(closure_for(model_a, full, x, y))  # without h0 the first step is at the mean: deterministic
    micro = VOGN(model_b, lr=1e-2, accumulation_steps=2, init_precision=None)
    micro.step(closure_for(model_b, micro, x[:16], y[:16]))
    assert not torch.equal(model_b.posterior.mean(), model_a.posterior.mean())  # no update after one micro-batch
    micro.step(closure_for(model_b, micro, x[16:], y[16:]))
    torch.testing.assert_close(model_b.posterior.mean(), model_a.posterior.mean())
    torch.testing.assert_close(model_b.posterior.statistic.diagonal(), model_a.posterior.statistic.diagonal())


def test_temperature_warmup_is_linear():
    model, x, y = classifier()
    optimizer = VOGN(model, temperature=1.0, temperature_warmup=(0.1, 4))
    seen = []
    for _ in range(6):
        optimizer.step(closure_for(model, optimizer, x, y))
        seen.append(model.posterior.temperature)
    assert seen == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 1.0])


def test_batchnorm_is_deterministic_and_without_prior_by_default():
    model, _, _ = classifier(batchnorm=True)
    VOGN(model)
    assert model.posterior.deterministic == {"1"}
    assert model.posterior.block_damping()[1] == model.posterior.damping  # gamma only: no prior term
    model2, _, _ = classifier(batchnorm=True)
    VOGN(model2, deterministic_batchnorm=False)
    assert model2.posterior.deterministic == set()


def test_curvature_and_inverse_intervals():
    model, x, y = classifier("kron")
    optimizer = NoisyKFAC(model, curv_interval=2, inv_interval=4)
    statistics = []
    for _ in range(5):
        optimizer.step(closure_for(model, optimizer, x, y))
        statistics.append(model.posterior.statistic.blocks["0"].G.clone())
    assert torch.equal(statistics[0], statistics[1]) and not torch.equal(statistics[1], statistics[2])
    assert torch.equal(statistics[2], statistics[3])


def test_nonfinite_loss_raises_and_leaves_everything_unchanged():
    model, x, y = classifier()
    optimizer = VOGN(model)
    optimizer.step(closure_for(model, optimizer, x, y))
    mean, statistic = model.posterior.mean(), model.posterior.statistic.diagonal().clone()
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1.*unchanged.*skip_nonfinite=True"):
        optimizer.step(closure_for(model, optimizer, bad_x, y))
    assert torch.equal(model.posterior.mean(), mean) and torch.equal(model.posterior.statistic.diagonal(), statistic)
    assert optimizer._step == 1
    skipping = VOGN(model, skip_nonfinite=True)
    skipping.step(closure_for(model, skipping, bad_x, y))
    assert skipping.skipped_steps == 1 and skipping._step == 0 and torch.equal(model.posterior.mean(), mean)


def test_nonfinite_outputs_under_mc_fisher_capture_are_rejected_cleanly():
    model, x, y = classifier("kron")
    optimizer = NoisyKFAC(model)
    optimizer.step(closure_for(model, optimizer, x, y))
    mean = model.posterior.mean()
    bad_x = x.clone()
    bad_x[3] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        optimizer.step(closure_for(model, optimizer, bad_x, y))
    assert torch.equal(model.posterior.mean(), mean)
    assert all(not m._forward_hooks for m in model.module.modules())


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(lr=-1e-3), "lr must be non-negative and finite, got -0.001"),
        (dict(lr=float("inf")), "lr must be non-negative and finite, got inf"),
        (dict(mc_samples=0), "mc_samples must be a positive integer, got 0"),
        (dict(prior_precision=-1.0), "prior_precision must be positive and finite"),
        (dict(dataset_size=0), "dataset_size must be a positive number, got 0"),
        (dict(temperature=0.0), "temperature must be positive and finite, got 0.0"),
        (dict(betas=(0.9, 1.0)), "betas must be two numbers in \\[0, 1\\)"),
        (dict(momentum="nesterov"), "momentum must be 'raw' or 'adam', got 'nesterov'"),
        (dict(curvature="hessian"), "curvature must be one of"),
        (dict(init_precision=0.0), "init_precision must be positive and finite"),
        (dict(accumulation_steps=0), "accumulation_steps must be a positive integer"),
    ],
)
def test_bad_hyperparameters_raise_value_error(options, match):
    model, _, _ = classifier()
    with pytest.raises(ValueError, match=match):
        VIOptimizer(model, **options)


def test_presets_check_the_posterior_and_the_closure():
    model, _, _ = classifier("diag")
    with pytest.raises(ValueError, match="NoisyKFAC needs a KroneckerGaussian .*, got DiagonalGaussian"):
        NoisyKFAC(model)
    kron, _, _ = classifier("kron")
    with pytest.raises(ValueError, match="IVON needs a DiagonalGaussian posterior, got KroneckerGaussian"):
        IVON(kron)
    with pytest.raises(ValueError, match="step\\(\\) needs a closure"):
        VOGN(model).step()
    optimizer = VOGN(model)
    optimizer.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr must be non-negative and finite, got nan"):
        optimizer.step(lambda: torch.tensor(0.0))


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_rescale_multiplies_the_statistic_and_the_momentum(structure):
    model, x, y = classifier(structure)
    optimizer = VOGN(model, lr=1e-2)
    optimizer.step(closure_for(model, optimizer, x, y))
    statistic, momentum = model.posterior.statistic.to_dense(), optimizer._momentum.clone()
    optimizer.rescale(0.25)
    torch.testing.assert_close(model.posterior.statistic.to_dense(), 0.25 * statistic)
    torch.testing.assert_close(optimizer._momentum, 0.25 * momentum)


def test_kl_clip_bounds_the_step_in_the_posterior_metric():
    model, x, y = classifier("diag")
    optimizer = VOGN(model, lr=10.0, kl_clip=1e-3, init_precision=1e-4, betas=(0.0, 0.999))
    before = model.posterior.mean()

    def closure():
        optimizer.zero_grad()
        loss = 100.0 * nn.functional.cross_entropy(model.module(x), y)  # a large gradient
        loss.backward()
        return loss

    optimizer.step(closure)
    step = model.posterior.mean() - before
    metric = model.posterior.precision_dense() / (model.posterior.dataset_size / model.posterior.temperature)
    assert float(step @ metric @ step) == pytest.approx(1e-3, rel=1e-4)  # α² vᵀ(S + λ)⁻¹v = κ exactly
    with pytest.raises(ValueError, match="kl_clip must be positive"):
        VOGN(model, kl_clip=0.0)


def _diagonal_vi_reference(net, x, y, lr, delta, n, tau, gamma, h0, betas, momentum, steps, seed):
    """docs/vi.md §1 on flat float64 vectors, per-example gradients by a loop: λ = τδ/N + γ per block,
    θ = μ + ε/sqrt((N/τ)(S + λ)), S <- β2 S + (1 - β2) mean_i g_i², m <- β1 m + d (raw) or the bias-corrected
    EMA of d (adam), d = ĝ + (τδ/N) μ, μ <- μ - α m̂/(S + λ)."""
    generator, twin = torch.Generator().manual_seed(seed), copy.deepcopy(net)
    params = list(net.parameters())
    prior = torch.cat(
        [torch.full((p.numel(),), delta[i // 2] * tau / n, dtype=torch.float64) for i, p in enumerate(params)]
    )
    mu = torch.nn.utils.parameters_to_vector(params).detach()
    s, m = torch.full_like(mu, h0), torch.zeros_like(mu)
    for t in range(1, steps + 1):
        eps = torch.randn(1, mu.numel(), dtype=torch.float64, generator=generator)[0]
        torch.nn.utils.vector_to_parameters(mu + eps / (n / tau * (s + prior + gamma)).sqrt(), twin.parameters())
        per_example = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                nn.functional.cross_entropy(twin(x[i : i + 1]), y[i : i + 1]), list(twin.parameters())
            )])
            for i in range(len(y))
        ]  # fmt: skip
        grad = torch.stack(per_example).mean(0)
        s = betas[1] * s + (1 - betas[1]) * torch.stack(per_example).square().mean(0)
        direction = grad + prior * mu
        m = betas[0] * m + direction if momentum == "raw" else betas[0] * m + (1 - betas[0]) * direction
        velocity = m if momentum == "raw" else m / (1 - betas[0] ** t)
        mu = mu - lr * velocity / (s + prior + gamma)
    return mu, s


@pytest.mark.parametrize("momentum", ["raw", "adam"])
def test_diagonal_steps_follow_the_vi_equations_with_per_block_priors(momentum):
    """VOGN (raw momentum) and noisy Adam's update (adam momentum; empirical Fisher so the labels are known)."""
    net, x, y = CASES_BY_NAME["mlp"].data(batch_size=6)  # Linear(5, 4), Tanh, Linear(4, 3), float64
    lr, delta, n, tau, gamma, h0, betas = 0.05, (3.0, 0.5), 30, 0.7, 1e-2, 0.4, (0.8, 0.9)
    reference = _diagonal_vi_reference(copy.deepcopy(net), x, y, lr, delta, n, tau, gamma, h0, betas, momentum, 3, 5)
    model = BayesianModel(net, "classification", posterior="diag", prior_precision={"0": delta[0], "2": delta[1]})
    optimizer = VIOptimizer(model, lr, betas=betas, momentum=momentum, damping=gamma, dataset_size=n,
                            temperature=tau, init_precision=h0, seed=5)  # fmt: skip

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    start = model.posterior.mean()
    for _ in range(3):
        optimizer.step(closure)
    torch.testing.assert_close(model.posterior.mean(), reference[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.posterior.statistic.diagonal(), reference[1], rtol=1e-12, atol=1e-14)
    assert (model.posterior.mean() - start).abs().max() > 1e-3  # the steps moved the mean


@pytest.mark.parametrize("structure, default", [("diag", 1), ("kron", 1), ("full", 10)])
def test_inv_interval_defaults_to_the_posteriors_and_is_checked(structure, default):
    model, _, _ = classifier(structure)
    assert model.posterior.default_inv_interval == default
    assert VOGN(model).inv_interval == default and VOGN(model, inv_interval=3).inv_interval == 3
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"inv_interval must be a positive integer, got {bad}"):
            VOGN(model, inv_interval=bad)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values by the host (each one a device synchronisation on a GPU)."""

    READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("preset", "structure", "reads"),
    [(VOGN, "diag", 5), (NoisyAdam, "diag", 5), (IVON, "diag", 3), (NoisyKFAC, "kron", 5)],
    ids=["vogn", "noisy_adam", "ivon", "noisy_kfac"],
)
def test_a_step_reads_the_host_only_for_its_non_finite_checks(preset, structure, reads):
    """One batched non-finite check of the evaluated step, one of the new statistic (all blocks at once), one of
    the new mean; with the curvature engine also the loss before the curvature is assembled and the model outputs
    in the capture. Not per block, not for the KL clip, not for the loss without other ranks."""
    module, x, y = CASES_BY_NAME["mlp"].data(batch_size=6)
    model = BayesianModel(module, "classification", posterior=structure, prior_precision=1.0, dataset_size=60)
    optimizer = preset(model, inv_interval=2) if preset is NoisyKFAC else preset(model)
    closure = closure_for(model, optimizer, x, y)
    for _ in range(3):  # past the first step; the fourth keeps the decompositions of the third
        optimizer.step(closure)
    counter = HostReads()
    with counter:
        optimizer.step(closure)
    assert counter.count == reads
