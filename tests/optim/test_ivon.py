"""IVON's drop-in form: the same update as the BayesianModel form, ivon-opt's equations, sampled_params, state."""

import copy

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.optim import IVON, VIOptimizer
from tests.cases import CASES_BY_NAME
from tests.state import assert_unchanged, snapshot


def _data(dtype=torch.float32, batch_size=16):
    case = CASES_BY_NAME["mlp"]  # Linear(5, 4), Tanh, Linear(4, 3): classification
    net, x, y = case.data(batch_size=batch_size)
    return net.to(dtype), x.to(dtype), y


def _loss(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def _sampled_step(optimizer, net, x, y, samples=1):
    for _ in range(samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            _loss(net, x, y).backward()
    return optimizer.step()


def _closure(optimizer, net, x, y):
    def closure():
        optimizer.zero_grad()
        loss = _loss(net, x, y)
        loss.backward()
        return loss

    return closure


def _groups(net, decays=(1e-2, 3e-3), rates=(0.1, 0.1)):
    return [
        {"params": list(net[0].parameters()), "weight_decay": decays[0], "lr": rates[0]},
        {"params": list(net[2].parameters()), "weight_decay": decays[1], "lr": rates[1]},
    ]


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_one_drop_in_step_is_bit_for_bit_the_bayesian_model_forms_step():
    net, x, y = _data()
    sampled, closure_net, model_sampled = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    n, options = 100, {"mc_samples": 2, "hess_init": 0.3, "seed": 7}

    def bayesian_model(module):
        return BayesianModel(module, "classification", prior_precision={"0": 1e-2 * n, "2": 3e-3 * n}, dataset_size=n)

    model = bayesian_model(net)
    reference = IVON(model, lr=0.1, **options)
    model_form_sampled = IVON(bayesian_model(model_sampled), lr=0.1, **options)
    dropin = IVON(_groups(sampled), ess=n, **options)
    dropin_closure = IVON(_groups(closure_net), ess=n, **options)
    for _ in range(4):
        reference.step(_closure(reference, net, x, y))
        assert _sampled_step(dropin, sampled, x, y, samples=2) is None
        dropin_closure.step(_closure(dropin_closure, closure_net, x, y))
        _sampled_step(model_form_sampled, model_sampled, x, y, samples=2)
        for other in (sampled, closure_net, model_sampled):
            assert torch.equal(_flat(other), _flat(net))
    for other in (dropin, dropin_closure, model_form_sampled):
        assert torch.equal(other.posterior.statistic.diagonal(), model.posterior.statistic.diagonal())
        assert torch.equal(other._momentum, reference._momentum)


def _ivon_opt_reference(net, x, y, groups, ess, hess_init, beta1, beta2, clip_radius, samples, steps, seed):
    """ivon-opt's update (Shen et al. 2024, its rescale_lr=True), written out on flat vectors.

    σ = 1/sqrt(N (h + wd)); ĥ = mean(noise ∘ g) (h + wd) N; m <- β1 m + (1 - β1) mean g;
    h <- β2 h + (1 - β2) ĥ + ½(1 - β2)²(h - ĥ)²/(h + wd);
    μ <- μ - lr (h0 + wd) clip((m/(1 - β1^t) + wd μ)/(h + wd), ±ξ), all per group.
    """
    generator = torch.Generator().manual_seed(seed)
    sizes = [sum(p.numel() for p in g["params"]) for g in groups]
    wd = torch.cat([torch.full((s,), g["weight_decay"], dtype=torch.float64) for s, g in zip(sizes, groups)])
    lr = torch.cat([torch.full((s,), g["lr"], dtype=torch.float64) for s, g in zip(sizes, groups)])
    mu = _flat(net)
    h, m = torch.full_like(mu, hess_init), torch.zeros_like(mu)
    twin = copy.deepcopy(net)
    for t in range(1, steps + 1):
        grads, nxg = [], []
        for _ in range(samples):
            noise = torch.randn(1, mu.numel(), dtype=torch.float64, generator=generator)[0] / (ess * (h + wd)).sqrt()
            torch.nn.utils.vector_to_parameters(mu + noise, twin.parameters())
            grad = torch.autograd.grad(_loss(twin, x, y), list(twin.parameters()))
            grads.append(torch.cat([g.reshape(-1) for g in grad]))
            nxg.append(noise * grads[-1])
        m = beta1 * m + (1 - beta1) * torch.stack(grads).mean(0)
        estimate = torch.stack(nxg).mean(0) * (h + wd) * ess
        h = beta2 * h + (1 - beta2) * estimate + 0.5 * (1 - beta2) ** 2 * (h - estimate).square() / (h + wd)
        step = ((m / (1 - beta1**t) + wd * mu) / (h + wd)).clamp(-clip_radius, clip_radius)
        mu = mu - lr * (hess_init + wd) * step
    return mu, h


def test_the_drop_in_form_follows_ivon_opts_equations_with_param_groups():
    net, x, y = _data(torch.float64)
    reference_net = copy.deepcopy(net)
    ess, h0, beta1, beta2, clip, decays, rates = 60, 0.3, 0.8, 0.99, 0.05, (2e-2, 5e-3), (0.3, 0.1)
    groups = _groups(net, decays, rates)
    # ivon-opt's lr ℓ (rescale_lr) is α = ℓ (h0 + weight_decay) per group here; kl_clip is ours, off in ivon-opt.
    ours = [{**g, "lr": g["lr"] * (h0 + g["weight_decay"])} for g in groups]
    optimizer = IVON(ours, ess=ess, hess_init=h0, beta1=beta1, beta2=beta2, clip_radius=clip, mc_samples=2,
                     kl_clip=None, seed=3)  # fmt: skip
    for _ in range(3):
        _sampled_step(optimizer, net, x, y, samples=2)
    mean, h = _ivon_opt_reference(reference_net, x, y, groups, ess, h0, beta1, beta2, clip, 2, 3, seed=3)
    torch.testing.assert_close(_flat(net), mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(optimizer.posterior.statistic.diagonal(), h, rtol=1e-12, atol=1e-14)
    assert (_flat(net) - _flat(reference_net)).abs().max() > 1e-3  # the steps moved the mean


def test_a_groups_weight_decay_is_read_at_every_step():
    net, x, y = _data()
    optimizer = IVON(_groups(net), ess=100)
    optimizer.param_groups[1]["weight_decay"] = 0.5
    _sampled_step(optimizer, net, x, y)
    torch.testing.assert_close(optimizer.posterior.prior_precision, torch.tensor([1e-2 * 100, 0.5 * 100]))
    torch.testing.assert_close(optimizer.posterior.block_damping(), torch.tensor([1e-2, 0.5]))
    optimizer.param_groups[0]["weight_decay"] = 0.0
    before = snapshot(net, optimizer)
    with pytest.raises(ValueError, match="param group 0: weight_decay must be positive and finite, got 0.0"):
        optimizer.sampled_params(train=True).__enter__()
    assert_unchanged(before, net, optimizer)


def test_sampled_params_restores_the_mean_exactly_when_the_body_raises():
    net, x, y = _data()
    optimizer = IVON(net.parameters(), ess=100)
    before, generator = _flat(net), optimizer.generator.get_state()
    with pytest.raises(RuntimeError, match="boom"), optimizer.sampled_params(train=True):
        assert not torch.equal(_flat(net), before)  # a sample is in the parameters
        _loss(net, x, y).backward()
        raise RuntimeError("boom")
    assert torch.equal(_flat(net), before) and optimizer._recorded == []
    assert torch.equal(optimizer.generator.get_state(), generator)
    with optimizer.sampled_params(train=False, generator=torch.Generator().manual_seed(0)):
        assert not torch.equal(_flat(net), before)
    assert torch.equal(_flat(net), before) and optimizer._recorded == []
    assert torch.equal(optimizer.generator.get_state(), generator)  # prediction samples leave training's stream


def test_a_body_without_backward_records_nothing_and_says_so():
    net, x, y = _data()
    optimizer = IVON(net.parameters(), ess=100)
    before = snapshot(net, optimizer)
    no_gradient = "found no gradient: call loss.backward\\(\\) inside the block"
    with pytest.raises(ValueError, match=no_gradient), optimizer.sampled_params(train=True):
        _loss(net, x, y)
    assert_unchanged(before, net, optimizer)


@pytest.mark.parametrize(
    "recorded, mc_samples, match",
    [
        (0, 1, r"step\(\) without a closure updates from the samples .* none were recorded since the last step"),
        (1, 2, r"step\(\) found 1 samples recorded by sampled_params\(train=True\), but mc_samples=2"),
        (3, 2, "found 3 samples .* or pass mc_samples=3"),
    ],
)
def test_a_closure_free_step_needs_mc_samples_recorded_samples(recorded, mc_samples, match):
    net, x, y = _data()
    optimizer = IVON(net.parameters(), ess=100, mc_samples=mc_samples)
    _sampled_step(optimizer, net, x, y, samples=mc_samples)  # one full step first
    for _ in range(recorded):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            _loss(net, x, y).backward()
    before = snapshot(net, optimizer)
    with pytest.raises(ValueError, match=match):
        optimizer.step()
    assert_unchanged(before, net, optimizer)


def test_misplaced_steps_and_nested_samples_are_refused():
    net, x, y = _data()
    optimizer = IVON(net.parameters(), ess=100)
    with optimizer.sampled_params(train=True):
        _loss(net, x, y).backward()
        with pytest.raises(ValueError, match="step\\(\\) was called inside a sampled_params block"):
            optimizer.step()
        with pytest.raises(ValueError, match="sampled_params blocks cannot be nested"), optimizer.sampled_params():
            pass
    before = snapshot(net, optimizer)
    with pytest.raises(ValueError, match="step\\(closure\\) evaluates its own samples"):
        optimizer.step(_closure(optimizer, net, x, y))
    assert_unchanged(before, net, optimizer)
    with pytest.raises(RuntimeError, match="state_dict\\(\\) while samples recorded by sampled_params"):
        optimizer.state_dict()
    optimizer.step()
    assert len(optimizer.state_dict()["vi"]["momentum"]) == optimizer.posterior.numel


def test_step_hooks_run_once_per_step():
    net, x, y = _data()
    VIOptimizer(BayesianModel(copy.deepcopy(net), "classification", dataset_size=10))  # torch hooks its step too
    optimizer = IVON(net.parameters(), ess=10)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    _sampled_step(optimizer, net, x, y)
    optimizer.step(_closure(optimizer, net, x, y))
    assert calls == ["pre", "post", "pre", "post"]


def test_drop_in_state_dict_round_trip_continues_identically():
    net, x, y = _data()
    optimizer = IVON(_groups(net), ess=100, mc_samples=2)
    for _ in range(2):
        _sampled_step(optimizer, net, x, y, samples=2)
    saved_net, saved = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    reference = []
    for _ in range(3):
        _sampled_step(optimizer, net, x, y, samples=2)
        reference.append(_flat(net))
    fresh, _, _ = _data()
    fresh.load_state_dict(saved_net)
    resumed = IVON(_groups(fresh, decays=(0.1, 0.1)), ess=100, mc_samples=2, seed=5)
    resumed.load_state_dict(saved)
    assert [g["weight_decay"] for g in resumed.param_groups] == [1e-2, 3e-3]
    for expected in reference:
        _sampled_step(resumed, fresh, x, y, samples=2)
        assert torch.equal(_flat(fresh), expected)
