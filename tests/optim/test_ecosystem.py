"""The optimizers with torch's tools: lr = 0, lr schedulers, gradient clipping, autocast and GradScaler."""

import copy

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.optim import IVON, VOGN, NoisyAdam, NoisyKFAC, SecondOrderOptimizer
from tests.cases import CASES_BY_NAME
from tests.state import assert_unchanged, snapshot

N = 100
BUILDERS = {
    "VOGN": lambda net, **o: VOGN(BayesianModel(net, "classification", dataset_size=N), **o),
    "NoisyAdam": lambda net, **o: NoisyAdam(BayesianModel(net, "classification", dataset_size=N), **o),
    "NoisyKFAC": lambda net, **o: NoisyKFAC(
        BayesianModel(net, "classification", posterior="kron", dataset_size=N), **{"curvature": "ggn", **o}
    ),
    "IVON": lambda net, **o: IVON(BayesianModel(net, "classification", dataset_size=N), **o),
    "IVON drop-in": lambda net, **o: IVON(net.parameters(), ess=N, **o),
    "SecondOrderOptimizer": lambda net, **o: SecondOrderOptimizer(net, "classification", kind="ggn", **o),
}
CLOSURE_OPTIMIZERS = [name for name in BUILDERS if name != "IVON drop-in"]


def _data(dtype=torch.float32):
    case = CASES_BY_NAME["mlp"]  # Linear(5, 4), Tanh, Linear(4, 3): classification
    net, x, y = case.data(batch_size=16)
    return net.to(dtype), x.to(dtype), y


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _statistic(optimizer):
    posterior = getattr(optimizer, "posterior", None) or optimizer.preconditioner
    return posterior.statistic.to_dense()


def _closure(optimizer, net, x, y, autocast=None, clip=None, seen=None):
    """torch's closure: zero, forward (under ``autocast``), backward, optionally clip (recording the gradient)."""

    def closure():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if seen is not None:
            seen.append(_flat_grad(net))
        return loss

    return closure


def _flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def _step(name, optimizer, net, x, y, **closure_options):
    """A closure step, or for the drop-in IVON the loop of ivon-opt: sampled_params, backward, step()."""
    if name != "IVON drop-in":
        return optimizer.step(_closure(optimizer, net, x, y, **closure_options))
    for _ in range(optimizer.mc_samples):
        with optimizer.sampled_params(train=True):
            _closure(optimizer, net, x, y, **closure_options)()
    return optimizer.step()


# ---- lr = 0 and schedulers ---------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILDERS)
def test_lr_zero_leaves_the_mean_unchanged_and_updates_the_statistic(name):
    net, x, y = _data()
    optimizer = BUILDERS[name](net, lr=0.0)
    assert getattr(optimizer, "kl_clip", None) or optimizer.param_groups[0]["kl_clip"]  # no κ / 0 in the trust region
    _step(name, optimizer, net, x, y)
    before, statistic = _flat(net), _statistic(optimizer)
    _step(name, optimizer, net, x[:8], y[:8])  # another batch: new curvature at the same weights
    assert torch.equal(_flat(net), before)
    assert not torch.equal(_statistic(optimizer), statistic)


@pytest.mark.parametrize("name", BUILDERS)
def test_a_warmup_from_zero_drives_the_lr_that_each_step_uses(name):
    net, x, y = _data()
    manual = copy.deepcopy(net)
    scheduled, by_hand = BUILDERS[name](net), BUILDERS[name](manual)
    base = scheduled.param_groups[0]["lr"]
    warmup = torch.optim.lr_scheduler.LambdaLR(scheduled, lambda t: min(1.0, t / 2))
    assert scheduled.param_groups[0]["lr"] == 0.0
    start = _flat(net)
    for t in range(4):
        by_hand.param_groups[0]["lr"] = base * min(1.0, t / 2)
        _step(name, scheduled, net, x, y)
        _step(name, by_hand, manual, x, y)
        warmup.step()
        if t == 0:
            assert torch.equal(_flat(net), start)
    assert torch.equal(_flat(net), _flat(manual)) and not torch.equal(_flat(net), start)


def test_step_lr_scales_each_param_group_of_the_drop_in_form():
    net, x, y = _data()
    manual, constant = copy.deepcopy(net), copy.deepcopy(net)

    def groups(module):
        return [{"params": list(module[0].parameters()), "lr": 0.2}, {"params": list(module[2].parameters())}]

    scheduled, by_hand, fixed = (IVON(groups(m), lr=0.05, ess=N) for m in (net, manual, constant))
    decay = torch.optim.lr_scheduler.StepLR(scheduled, step_size=1, gamma=0.5)
    for t in range(3):
        for group, base in zip(by_hand.param_groups, (0.2, 0.05)):
            group["lr"] = base * 0.5**t
        for optimizer, module in [(scheduled, net), (by_hand, manual), (fixed, constant)]:
            _step("IVON drop-in", optimizer, module, x, y)
        decay.step()
    assert torch.equal(_flat(net), _flat(manual)) and not torch.equal(_flat(net), _flat(constant))


# ---- gradient clipping -----------------------------------------------------------------------
def _used_gradient(name, optimizer, before, after):
    """The gradient a first step used, solved from its update with the statistic it left (diagonal, no momentum,
    no trust region): Δ = -α (g + δ̃μ)/(s + λ), with δ̃ = 0 and λ = γ for ``SecondOrderOptimizer``."""
    lr = optimizer.param_groups[0]["lr"]
    if name == "SecondOrderOptimizer":
        damping = optimizer.param_groups[0]["damping"]
        return -(after - before) / lr * (optimizer.preconditioner.statistic.diagonal().clamp_min(0) + damping)
    posterior = optimizer.posterior
    damping = torch.cat([lam.expand(p.numel) for lam, p in zip(posterior.block_damping(), posterior.plans)])
    prior = (damping - posterior.damping) * before
    return -(after - before) / lr * (posterior.statistic.diagonal() + damping) - prior


@pytest.mark.parametrize(
    "name, options",
    [
        ("SecondOrderOptimizer", {"structure": "diag", "momentum": 0.0, "kl_clip": None, "damping": 0.1}),
        ("VOGN", {"init_precision": None, "kl_clip": None}),  # the first step is at the mean
        ("IVON drop-in", {"kl_clip": None}),  # the bias-corrected momentum of the first step is the gradient
    ],
)
def test_a_gradient_clipped_in_the_closure_is_the_one_the_step_uses(name, options):
    net, x, y = _data(torch.float64)
    optimizer = BUILDERS[name](net, **options)
    before, seen = _flat(net), []
    _step(name, optimizer, net, x, y, clip=1e-2, seen=seen)
    (clipped,) = seen
    assert float(clipped.norm()) == pytest.approx(1e-2, rel=1e-5)  # the clip was active
    torch.testing.assert_close(_used_gradient(name, optimizer, before, _flat(net)), clipped, rtol=1e-9, atol=1e-12)


# ---- mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILDERS)
def test_bfloat16_autocast_in_the_closure_matches_the_float32_step(name):
    net, x, y = _data()
    low = copy.deepcopy(net)
    options = {"damping": 0.1} if name == "SecondOrderOptimizer" else {}  # K-FAC's inverse amplifies roundings
    full_precision, mixed = BUILDERS[name](net, **options), BUILDERS[name](low, **options)
    start = _flat(net)
    _step(name, full_precision, net, x, y)
    _step(name, mixed, low, x, y, autocast=torch.bfloat16)
    reference, step = _flat(net) - start, _flat(low) - start
    error = float((step - reference).norm() / reference.norm())
    assert 0 < error < 0.02  # bf16 rounds to 2^-8 ≈ 0.4 %: a few roundings, and autocast was active


@pytest.mark.parametrize("name", CLOSURE_OPTIMIZERS)
def test_grad_scaler_refuses_closure_steps_clearly_and_changes_nothing(name):
    net, x, y = _data()
    optimizer = BUILDERS[name](net)
    _step(name, optimizer, net, x, y)
    scaler = torch.amp.GradScaler("cpu")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        return loss

    with pytest.raises(RuntimeError, match="Closure use is not currently supported if GradScaler is enabled"):
        scaler.step(optimizer, closure=closure)  # torch's own refusal
    closure()
    before = snapshot(net, optimizer)
    match = "step\\(closure\\) evaluates its own samples" if name == "IVON" else "GradScaler does not support"
    with pytest.raises(ValueError, match=match):
        scaler.step(optimizer, closure)
    assert_unchanged(before, net, optimizer)
    _step(name, optimizer, net, x, y)  # and plain steps go on


def _scaled_step(optimizer, scaler, net, x, y, factor=1.0, autocast=None):
    for _ in range(optimizer.mc_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.float16, enabled=autocast is not None):
                loss = nn.functional.cross_entropy(net(x), y) * factor
            scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_grad_scaler_with_the_closure_free_ivon_unscales_the_recorded_gradients():
    net, x, y = _data()
    scaled_net = copy.deepcopy(net)
    plain, scaled = IVON(net.parameters(), ess=N, mc_samples=2), IVON(scaled_net.parameters(), ess=N, mc_samples=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    for _ in range(3):
        _step("IVON drop-in", plain, net, x, y)
        _scaled_step(scaled, scaler, scaled_net, x, y)
    assert scaler.get_scale() == 2.0**15  # no overflow: the scale grew every step
    assert torch.equal(_flat(scaled_net), _flat(net))  # a power-of-two scale divides out exactly
    assert not hasattr(scaled, "found_inf") and not hasattr(scaled, "grad_scale")


def test_grad_scaler_overflow_skips_the_ivon_step_and_lowers_the_scale():
    net, x, y = _data()
    optimizer = IVON(net.parameters(), ess=N)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _scaled_step(optimizer, scaler, net, x, y)
    before, statistic = _flat(net), _statistic(optimizer)
    _scaled_step(optimizer, scaler, net, x, y, factor=float("inf"))
    assert torch.equal(_flat(net), before) and torch.equal(_statistic(optimizer), statistic)
    assert optimizer.skipped_steps == 1 and optimizer._recorded == [] and scaler.get_scale() == 2.0**11
    _scaled_step(optimizer, scaler, net, x, y)
    assert not torch.equal(_flat(net), before)


def test_float16_autocast_with_grad_scaler_matches_the_float32_ivon_step():
    net, x, y = _data()
    low = copy.deepcopy(net)
    full_precision, mixed = IVON(net.parameters(), ess=N), IVON(low.parameters(), ess=N)
    start = _flat(net)
    _step("IVON drop-in", full_precision, net, x, y)
    _scaled_step(mixed, torch.amp.GradScaler("cpu"), low, x, y, autocast=torch.float16)
    reference, step = _flat(net) - start, _flat(low) - start
    assert 0 < float((step - reference).norm() / reference.norm()) < 0.005  # float16 rounds to 2^-11 ≈ 0.05 %


def test_grad_scaler_unscale_is_refused_with_ivon():
    net, x, y = _data()
    optimizer = IVON(net.parameters(), ess=N)
    scaler = torch.amp.GradScaler("cpu")
    with optimizer.sampled_params(train=True):
        scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    scaler.unscale_(optimizer)
    before = snapshot(net, optimizer)
    with pytest.raises(ValueError, match="scaler.unscale_\\(optimizer\\) is not supported with IVON"):
        scaler.step(optimizer)
    assert_unchanged(before, net, optimizer)
