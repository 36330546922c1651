"""SecondOrderOptimizer against Newton's method and dense damped solves (float64)."""

import copy
import math

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine, KronBlock
from bayesso.likelihoods import Regression
from bayesso.optim import SecondOrderOptimizer
from tests.cases import CASES_BY_NAME, mixed_structures
from tests.dense import posterior_index


def _closure(optimizer, module, likelihood, x, y):
    def closure():
        optimizer.zero_grad()
        loss = likelihood.nll(module(x), y) / len(y)
        loss.backward()
        return loss

    return closure


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_one_exact_full_step_on_least_squares_is_newtons_and_lands_on_the_solution():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(3, 2, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(40, 2, generator=gen).double()
    module = nn.Linear(3, 2).double()
    likelihood = Regression(1.0)
    optimizer = SecondOrderOptimizer(module, likelihood, kind="ggn", structure="full", lr=1.0, damping=0.0,
                                     momentum=0.0, kl_clip=None)  # fmt: skip
    optimizer.step(_closure(optimizer, module, likelihood, x, y))
    phi = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(phi, y).solution  # (4, 2)
    torch.testing.assert_close(module.weight.detach(), solution[:3].T)
    torch.testing.assert_close(module.bias.detach(), solution[3])


def _dense_step(case_name: str, structure: str, kfac_damping: str, damping: float = 0.3, lr: float = 0.5):
    """(actual parameter change, expected -lr (F + damping)⁻¹ g from the engine's dense blocks)."""
    case = CASES_BY_NAME[case_name]
    module, x, y = case.data(batch_size=7)
    if structure == "mixed":
        structure = mixed_structures(module)
    optimizer = SecondOrderOptimizer(module, case.likelihood, kind="ggn", structure=structure, lr=lr, damping=damping,
                                     momentum=0.0, kl_clip=None, kfac_damping=kfac_damping)  # fmt: skip
    curvature = CurvatureEngine(module, case.likelihood, "ggn", structure).compute(x, y) * (1 / 7)
    module.zero_grad()
    (case.likelihood.nll(module(x), y) / 7).backward()
    index = posterior_index(optimizer.preconditioner)
    gradient = torch.cat([p.grad.reshape(-1) for p in module.parameters()])[index]
    blocks = []
    for block in curvature.blocks.values():
        if isinstance(block, KronBlock) and kfac_damping == "factored":
            dim_a, dim_g = block.A.shape[-1], block.G.shape[-1]
            trace_a = block.A.diagonal(dim1=1, dim2=2).sum(1) / dim_a
            trace_g = block.G.diagonal(dim1=1, dim2=2).sum(1) / dim_g
            pi = (trace_a / trace_g).sqrt()[:, None, None]
            root = math.sqrt(damping)
            eye_a, eye_g = torch.eye(dim_a, dtype=torch.float64), torch.eye(dim_g, dtype=torch.float64)
            damped = KronBlock(block.names, block.shapes, block.A + pi * root * eye_a, block.G + root / pi * eye_g,
                               block.n, block.layout)  # fmt: skip
            blocks.append(damped.to_dense())
        else:
            dense = block.to_dense()
            blocks.append(dense + damping * torch.eye(len(dense), dtype=torch.float64))
    matrix = torch.block_diag(*blocks)
    before = _flat(module)[index]
    optimizer.step(_closure(optimizer, module, case.likelihood, x, y))
    return _flat(module)[index] - before, -lr * torch.linalg.solve(matrix, gradient)


@pytest.mark.parametrize(
    "structure, kfac_damping",
    [
        ("diag", "exact"),
        ("full", "exact"),
        ("kron", "exact"),
        ("kron", "factored"),
        ("mixed", "exact"),
        ("mixed", "factored"),
    ],
)
@pytest.mark.parametrize("name", ["mlp", "conv2d", "layernorm_groupnorm", "batchnorm", "embedding", "mlp_regression"])
def test_the_step_is_a_dense_damped_solve_for_every_structure(name, structure, kfac_damping):
    actual, expected = _dense_step(name, structure, kfac_damping)
    torch.testing.assert_close(actual, expected)


def test_moving_a_scalar_between_the_kronecker_factors_leaves_the_factored_step_unchanged():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=7)
    optimizer = SecondOrderOptimizer(module, case.likelihood, kind="ggn", damping=0.3, kl_clip=None, momentum=0.0)
    optimizer.step(_closure(optimizer, module, case.likelihood, x, y))
    vector = torch.randn(optimizer.preconditioner.numel, dtype=torch.float64)
    before = optimizer.preconditioner.precondition(vector)
    statistic = optimizer.preconditioner.statistic
    for block in statistic.blocks.values():
        block.A.mul_(7.0)
        block.G.div_(7.0)
    optimizer.preconditioner.refresh()
    torch.testing.assert_close(optimizer.preconditioner.precondition(vector), before)


def test_kl_clip_scales_the_step_to_the_trust_region():
    _, expected = _dense_step("mlp", "full", "exact", damping=0.3, lr=0.5)  # the unclipped step
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=7)
    direction = -expected / 0.5  # = (F + γ)⁻¹ g
    module.zero_grad()
    (case.likelihood.nll(module(x), y) / 7).backward()
    optimizer = SecondOrderOptimizer(module, case.likelihood, kind="ggn", structure="full", lr=0.5, damping=0.3,
                                     momentum=0.0, kl_clip=1e-4)  # fmt: skip
    index = posterior_index(optimizer.preconditioner)
    gradient = torch.cat([p.grad.reshape(-1) for p in module.parameters()])[index]
    quadratic = 0.25 * float(direction @ gradient)
    assert quadratic > 1e-4  # the clip is active
    before = _flat(module)[index]
    optimizer.step(_closure(optimizer, module, case.likelihood, x, y))
    torch.testing.assert_close(_flat(module)[index] - before, expected * math.sqrt(1e-4 / quadratic))


def test_l2_in_the_curvature_and_decoupled_weight_decay():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=7)
    twin = copy.deepcopy(module)
    common = {"kind": "ggn", "structure": "full", "lr": 0.5, "damping": 0.1, "momentum": 0.0, "kl_clip": None}
    l2 = SecondOrderOptimizer(module, case.likelihood, weight_decay=0.2, **common)
    index = posterior_index(l2.preconditioner)
    theta = _flat(module)[index]
    curvature = CurvatureEngine(module, case.likelihood, "ggn", "full").compute(x, y).to_dense()[index][:, index] / 7
    module.zero_grad()
    (case.likelihood.nll(module(x), y) / 7).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in module.parameters()])[index]
    eye = torch.eye(len(theta), dtype=torch.float64)
    l2.step(_closure(l2, module, case.likelihood, x, y))
    expected = theta - 0.5 * torch.linalg.solve(curvature + 0.3 * eye, gradient + 0.2 * theta)
    torch.testing.assert_close(_flat(module)[index], expected)
    decoupled = SecondOrderOptimizer(twin, case.likelihood, decoupled_weight_decay=0.2, **common)
    decoupled.step(_closure(decoupled, twin, case.likelihood, x, y))
    expected = theta - 0.5 * torch.linalg.solve(curvature + 0.1 * eye, gradient) - 0.5 * 0.2 * theta
    torch.testing.assert_close(_flat(twin)[index], expected)


def _run(optimizer, module, likelihood, batches):
    for x, y in batches:
        optimizer.step(_closure(optimizer, module, likelihood, x, y))


def _batches(case, n=6, size=5):
    return [case.data(batch_size=size, seed=seed)[1:] for seed in range(n)]


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_state_dict_round_trip_continues_identically(structure):
    case = CASES_BY_NAME["conv2d"]
    module = case.data()[0]
    batches = _batches(case)
    options = {"structure": structure, "lr": 0.05, "curv_interval": 2, "inv_interval": 3}
    optimizer = SecondOrderOptimizer(module, case.likelihood, **options)
    _run(optimizer, module, case.likelihood, batches[:3])
    saved_module, saved = copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict())
    _run(optimizer, module, case.likelihood, batches[3:])
    resumed_module = case.data()[0]
    resumed_module.load_state_dict(saved_module)
    resumed = SecondOrderOptimizer(resumed_module, case.likelihood, **options, seed=99)
    resumed.load_state_dict(saved)
    _run(resumed, resumed_module, case.likelihood, batches[3:])
    torch.testing.assert_close(_flat(resumed_module), _flat(module), rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_accumulating_two_half_batches_equals_one_batch(structure):
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=8)
    twin = copy.deepcopy(module)
    common = {"kind": "ggn", "structure": structure, "lr": 0.3, "kl_clip": None}
    whole = SecondOrderOptimizer(module, case.likelihood, **common)
    halves = SecondOrderOptimizer(twin, case.likelihood, accumulation_steps=2, **common)
    for _ in range(2):
        whole.step(_closure(whole, module, case.likelihood, x, y))
        halves.step(_closure(halves, twin, case.likelihood, x[:4], y[:4]))
        halves.step(_closure(halves, twin, case.likelihood, x[4:], y[4:]))
    torch.testing.assert_close(_flat(twin), _flat(module))
    with pytest.raises(RuntimeError, match="middle of gradient accumulation"):
        halves.step(_closure(halves, twin, case.likelihood, x[:4], y[:4]))
        halves.state_dict()


def test_lr_scheduler_sets_the_learning_rate_of_each_step():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=8)
    manual, constant = copy.deepcopy(module), copy.deepcopy(module)
    options = {"kind": "ggn", "lr": 0.4}
    scheduled = SecondOrderOptimizer(module, case.likelihood, **options)
    scheduler = torch.optim.lr_scheduler.StepLR(scheduled, step_size=1, gamma=0.5)
    by_hand = SecondOrderOptimizer(manual, case.likelihood, **options)
    fixed = SecondOrderOptimizer(constant, case.likelihood, **options)
    for lr in (0.4, 0.2, 0.1):
        by_hand.param_groups[0]["lr"] = lr
        for optimizer, net in [(scheduled, module), (by_hand, manual), (fixed, constant)]:
            optimizer.step(_closure(optimizer, net, case.likelihood, x, y))
        scheduler.step()
    torch.testing.assert_close(_flat(module), _flat(manual), rtol=0, atol=0)
    assert not torch.allclose(_flat(module), _flat(constant))


def test_intervals_refresh_curvature_and_decompositions_on_schedule():
    case = CASES_BY_NAME["mlp"]
    module = case.data()[0]
    optimizer = SecondOrderOptimizer(module, case.likelihood, curv_interval=2, inv_interval=3, lr=0.01)
    revisions = []
    for x, y in _batches(case, n=7):
        optimizer.step(_closure(optimizer, module, case.likelihood, x, y))
        revisions.append(optimizer.preconditioner._revision)
    changed = [i for i in range(1, 7) if revisions[i] != revisions[i - 1]]
    assert changed == [2, 3, 4, 6]  # curvature at steps 0, 2, 4, 6; decompositions at 0, 3, 6
    assert optimizer._stale is False


def test_training_reduces_the_loss_on_several_module_types():
    for name in ["conv2d", "layernorm_groupnorm", "residual"]:
        case = CASES_BY_NAME[name]
        module, x, y = case.data(batch_size=16)
        optimizer = SecondOrderOptimizer(module, case.likelihood, lr=0.1, damping=1e-2, kl_clip=1e-2)
        losses = [float(optimizer.step(_closure(optimizer, module, case.likelihood, x, y))) for _ in range(30)]
        assert losses[-1] < 0.8 * losses[0], (name, losses)


def test_bad_hyperparameters_and_non_finite_steps():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=8)
    for options, message in [
        ({"lr": -0.5}, "lr must be non-negative and finite, got -0.5"),
        ({"damping": -1.0}, "damping must be non-negative and finite, got -1.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"beta": 1.0}, r"beta must be in \[0, 1\)"),
        ({"curv_interval": 0}, "curv_interval must be a positive integer, got 0"),
        ({"inv_interval": 1.5}, "inv_interval must be a positive integer, got 1.5"),
        ({"kl_clip": -1.0}, "kl_clip must be positive and finite"),
        ({"weight_decay": float("nan")}, "weight_decay must be non-negative and finite"),
        ({"kind": "hessian"}, "kind must be one of"),
        ({"structure": "dense"}, "structure must be one of 'diag', 'kron', 'full' or a mapping; got 'dense'"),
        ({"kfac_damping": "tikhonov"}, "kfac_damping must be 'exact' or 'factored'"),
    ]:
        with pytest.raises(ValueError, match=message):
            SecondOrderOptimizer(module, case.likelihood, **options)
    optimizer = SecondOrderOptimizer(module, case.likelihood)
    optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be non-negative and finite, got -1.0"):
        optimizer.step(_closure(optimizer, module, case.likelihood, x, y))
    optimizer.param_groups[0]["lr"] = 0.1
    with pytest.raises(ValueError, match="step\\(\\) needs a closure"):
        optimizer.step(None)
    before = _flat(module)

    def bad():
        optimizer.zero_grad()
        loss = (case.likelihood.nll(module(x), y) / 8) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        optimizer.step(bad)
    assert torch.equal(_flat(module), before) and not optimizer.preconditioner.initialized
    skipping = SecondOrderOptimizer(module, case.likelihood, skip_nonfinite=True)
    skipping.step(bad)
    assert skipping.skipped_steps == 1 and torch.equal(_flat(module), before)
