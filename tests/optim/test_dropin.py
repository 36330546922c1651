"""The drop-in form's posterior over torch param groups, and the errors of optimizers that need a BayesianModel."""

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.optim import IVON, VOGN, NoisyAdam, NoisyKFAC, SecondOrderOptimizer, VIOptimizer
from bayesso.optim.dropin import parameter_model
from tests.state import assert_unchanged, snapshot


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_the_posterior_mean_is_the_given_parameters_one_block_per_group():
    net = _net()
    first, second = list(net[0].parameters()), list(net[2].parameters())
    model = parameter_model([{"params": first, "weight_decay": 1e-2}, {"params": second}], ess=50, weight_decay=4e-3)
    posterior = model.posterior
    assert [plan.name for plan in posterior.plans] == ["0", "1"]
    assert all(a is b for a, b in zip(posterior.parameters, net.parameters()))  # the same objects, not copies
    assert [(s.start, s.stop) for s in posterior.block_slices()] == [(0, 40), (40, 67)]
    new = torch.arange(posterior.numel, dtype=torch.float32)
    posterior.set_mean(new)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), new, rtol=0, atol=0)
    # ivon-opt's weight decay is δ/N: δ = weight_decay · ess per group, and λ = τδ/N = weight_decay (τ = 1, γ = 0).
    torch.testing.assert_close(posterior.prior_precision, torch.tensor([1e-2 * 50, 4e-3 * 50]))
    torch.testing.assert_close(posterior.block_damping(), torch.tensor([1e-2, 4e-3]))
    assert posterior.dataset_size == 50
    assert [g["weight_decay"] for g in model.param_groups] == [1e-2, 4e-3]


def test_without_weight_decay_the_prior_is_the_bayesian_models_default():
    net = _net()
    model = parameter_model(net.parameters(), ess=200, weight_decay=None)
    assert len(model.param_groups) == 1 and model.param_groups[0]["weight_decay"] == 1 / 200
    torch.testing.assert_close(model.posterior.prior_precision, torch.ones(1))  # δ = 1, the prior N(0, I)
    reference = BayesianModel(net, "classification", dataset_size=200).posterior
    torch.testing.assert_close(model.posterior.prior_precision, reference.prior_precision[:1])


@pytest.mark.parametrize("preset", [VOGN, NoisyAdam, NoisyKFAC, VIOptimizer], ids=lambda p: p.__name__)
@pytest.mark.parametrize(
    "given, described",
    [
        (lambda net: net.parameters(), r"parameters \(generator\)"),
        (lambda net: [{"params": list(net.parameters())}], r"parameters \(list\)"),
        (lambda net: net, r"an nn.Module \(Sequential\)"),
    ],
    ids=["parameters", "param groups", "module"],
)
def test_optimizers_that_need_the_module_name_the_right_constructor(preset, given, described):
    net = _net()
    before = snapshot(net)
    name = preset.__name__
    with pytest.raises(
        ValueError, match=rf"{name} needs a BayesianModel, got {described}: .*per-example.*hooks"
    ) as info:
        preset(given(net))
    assert f'{name}(BayesianModel(net, "classification"), ...)' in str(info.value)
    assert "IVON(net.parameters(), lr=..., ess=N)" in str(info.value)
    assert_unchanged(before, net)


def test_second_order_optimizer_needs_the_module():
    net = _net()
    with pytest.raises(ValueError, match="SecondOrderOptimizer needs the nn.Module, got generator: .*hooks"):
        SecondOrderOptimizer(net.parameters(), "classification")


def _groups_with(**entries):
    return lambda net: [{"params": list(net[0].parameters())}, {"params": list(net[2].parameters()), **entries}]


@pytest.mark.parametrize(
    "params, options, match",
    [
        (lambda net: net, {"ess": 10}, r"IVON got an nn.Module \(Sequential\): pass its parameters"),
        (lambda net: net.parameters(), {}, "needs ess=N, the number of training examples"),
        (lambda net: net.parameters(), {"ess": 0}, "ess must be positive and finite, got 0"),
        (lambda net: net.parameters(), {"ess": 10, "weight_decay": 0.0}, "weight_decay must be positive and finite"),
        (lambda net: next(net.parameters()), {"ess": 10}, "params must be an ordered iterable .* got Parameter"),
        (lambda net: set(net.parameters()), {"ess": 10}, "params must be an ordered iterable .* got set"),
        (lambda net: [], {"ess": 10}, "params is empty"),
        (_groups_with(beta2=0.9), {"ess": 10}, "param group 1 sets 'beta2', which all groups share here"),
        (_groups_with(lr=-1.0), {"ess": 10}, "param group 1: lr must be non-negative and finite, got -1.0"),
        (_groups_with(weight_decay=-1.0), {"ess": 10}, "param group 1: weight_decay must be positive and finite"),
        (lambda net: [{"params": []}], {"ess": 10}, "param group 0 has no parameters"),
        (lambda net: [{"lr": 0.1}], {"ess": 10}, "param group 0 must be a dict with a 'params' entry"),
        (lambda net: [net[0].weight.detach()], {"ess": 10}, "entry 0 must be an nn.Parameter, got Tensor"),
        (lambda net: [net[0].weight, net[0].weight], {"ess": 10}, r"parameter 1 \(shape \(8, 4\)\) appears more"),
        (lambda net: net.parameters(), {"ess": 10, "dataset_size": 10}, "dataset_size does not apply to the drop-in"),
        (lambda net: net.parameters(), {"ess": 10, "prior_precision": 1.0}, "prior_precision does not apply"),
        (lambda net: net.parameters(), {"ess": 10, "betas": (0.9, 0.9), "beta1": 0.5}, "either betas or beta1/beta2"),
        (lambda net: net.parameters(), {"ess": 10, "lr": -0.1}, "lr must be non-negative and finite, got -0.1"),
    ],
)
def test_bad_drop_in_arguments_raise_value_error_and_change_nothing(params, options, match):
    net = _net()
    before = snapshot(net)
    with pytest.raises(ValueError, match=match):
        IVON(params(net), **options)
    assert_unchanged(before, net)


def test_frozen_and_mixed_parameters_are_refused():
    net = _net()
    net[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(8,\)\) does not require grad; leave it out"):
        IVON(list(net.parameters()), ess=10)
    net[0].bias.requires_grad_(True)
    net[2].double()
    with pytest.raises(
        ValueError, match="share one device and dtype: param group 0 has one on cpu \\(torch.float64\\)"
    ):
        IVON(net.parameters(), ess=10)


def test_the_bayesian_model_form_refuses_the_drop_in_arguments():
    model = BayesianModel(_net(), "classification", dataset_size=10)
    with pytest.raises(ValueError, match="ess is for the drop-in form .* dataset_size and prior_precision"):
        IVON(model, ess=10)
    with pytest.raises(ValueError, match="weight_decay is for the drop-in form"):
        IVON(model, weight_decay=1e-3)
