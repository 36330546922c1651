"""Devices and dtypes across BayesianModel: to(), round trips, optimizer state, batches moved at every entry point."""

import pytest
import torch
from torch import nn

import bayesso.batches
import bayesso.predict.metrics
from bayesso import BayesianModel, Ensemble
from bayesso.data import make_loader
from bayesso.ensemble import train_map
from bayesso.optim import SecondOrderOptimizer
from bayesso.predict.metrics import evaluate
from tests.state import assert_unchanged, posterior_tensors, snapshot

PROBS = dict(rtol=0, atol=1e-6)  # probabilities from float32 and float64 forwards of the same weights


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def digits(n: int = 24, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def fitted_vi(method: str, structure: str) -> BayesianModel:
    x, y = digits()
    model = BayesianModel(network(), "classification", posterior=structure)
    model.fit(make_loader(x, y, 8, shuffle=False), method=method, epochs=1, progress=False)
    return model


def cross_entropy_closure(module: nn.Module, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return loss

    return closure


def dtypes(model: BayesianModel) -> set[torch.dtype]:
    """The dtypes of the module's parameters, every posterior tensor and the optimizer's momentum."""
    tensors = [*model.module.parameters(), *posterior_tensors(model.posterior).values()]
    if model.optimizer is not None:
        tensors.append(model.optimizer._momentum)
    return {t.dtype for t in tensors}


@pytest.mark.parametrize("method, structure", [("vogn", "diag"), ("noisy_kfac", "kron")])
def test_vi_round_trip_float32_float64_float32(method, structure):
    model, twin = fitted_vi(method, structure), fitted_vi(method, structure)
    x, y = digits(6)
    probit = model.predict(x, method="probit").probs
    assert model.to(torch.float64) is model
    assert dtypes(model) == {torch.float64} and model.optimizer.engine.dtype == torch.float64
    torch.testing.assert_close(model.predict(x, method="probit").probs, probit.double(), **PROBS)
    model.to(torch.float32)
    assert dtypes(model) == {torch.float32} and model.optimizer.engine.dtype == torch.float32
    for key, value in posterior_tensors(model.posterior).items():
        assert torch.equal(value, posterior_tensors(twin.posterior)[key]), key
    sample = torch.Generator().manual_seed(2)
    assert torch.equal(
        model.predict(x, 4, generator=sample).probs, twin.predict(x, 4, generator=sample.manual_seed(2)).probs
    )
    # the momentum and the generators came back bit for bit: the next steps agree
    model.optimizer.step(cross_entropy_closure(model.module, model.optimizer, x, y))
    twin.optimizer.step(cross_entropy_closure(twin.module, twin.optimizer, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.module.parameters(), twin.module.parameters()))


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_laplace_round_trip_float32_float64_float32(structure):
    x, y = digits()
    model = BayesianModel(network(), "classification", posterior=structure)
    model.fit_laplace(make_loader(x, y, 8, shuffle=False), progress=False)
    probit, evidence = model.predict(x, method="probit").probs, model.log_marginal_likelihood()
    precision = model.posterior.precision_dense()
    model.to(torch.float64)
    assert dtypes(model) == {torch.float64}
    torch.testing.assert_close(model.predict(x, method="probit").probs, probit.double(), **PROBS)
    torch.testing.assert_close(model.log_marginal_likelihood(), evidence, rtol=1e-6, atol=0)
    model.to(torch.float32)
    assert dtypes(model) == {torch.float32} and torch.equal(model.posterior.precision_dense(), precision)
    assert torch.equal(model.predict(x, method="probit").probs, probit)


def test_posterior_and_optimizer_follow_a_module_cast_by_hand():
    model = fitted_vi("vogn", "diag")
    model.module.double()  # behind the model's back
    x, y = digits(8, torch.float64)
    model.optimizer.step(cross_entropy_closure(model.module, model.optimizer, x, y))
    assert dtypes(model) == {torch.float64}
    history = model.fit(make_loader(*digits(), 8), method="vogn", progress=False)  # float32 data, cast
    assert dtypes(model) == {torch.float64} and history[0]["loss"] > 0


def test_second_order_optimizer_follows_its_module_exactly_and_back():
    x, y = digits(8)
    runs = []
    for cast in (False, True):
        module = network()
        optimizer = SecondOrderOptimizer(module, "classification", lr=0.1)
        closure = cross_entropy_closure(module, optimizer, x, y)
        optimizer.step(closure)
        if cast:
            module.double()
            optimizer.follow_module()
            assert optimizer._momentum.dtype == optimizer.preconditioner.dtype == torch.float64
            assert optimizer.engine.dtype == torch.float64
            module.float()
        optimizer.step(closure)
        runs.append(list(module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_an_optimizer_keeps_training_the_module_when_a_move_replaces_its_parameters(monkeypatch):
    model = fitted_vi("vogn", "diag")
    monkeypatch.setattr(torch.__future__, "_overwrite_module_params_on_conversion", True)  # torch's opt-in
    old = list(model.module.parameters())
    model.to(torch.float64)
    new = list(model.module.parameters())
    assert all(a is not b for a, b in zip(old, new))
    grouped = [p for group in model.optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(new) and all(a is b for a, b in zip(grouped, new))
    model.optimizer.step(cross_entropy_closure(model.module, model.optimizer, *digits(8, torch.float64)))
    assert not all(torch.equal(a.double(), b) for a, b in zip(old, new))  # the step moved the module's own weights


def test_to_meta_moves_every_tensor_of_a_laplace_model():
    x, y = digits()
    model = BayesianModel(network(), "classification", posterior="kron")
    model.fit_laplace(make_loader(x, y, 8), progress=False)
    model.to("meta")
    tensors = [*model.module.parameters(), *posterior_tensors(model.posterior).values()]
    assert all(t.device.type == "meta" for t in tensors)


def test_a_failed_move_leaves_module_posterior_and_optimizer_as_they_were():
    model = fitted_vi("noisy_kfac", "kron")
    parameters, bases = list(model.module.parameters()), dict(model.posterior._bases)
    groups = [list(g["params"]) for g in model.optimizer.param_groups]
    before = snapshot(model)
    for args, message in [
        ((torch.float16,), "dtype must be torch.float32 or torch.float64, got torch.float16"),
        ((torch.int64,), "got torch.int64"),
        (("gpu",), "got 'gpu'"),
        (("meta",), "device 'meta' cannot hold the optimizer's random generator"),  # after the module moved
    ]:
        with pytest.raises(ValueError, match=message):
            model.to(*args)
        assert_unchanged(before, model)
        assert all(a is b for a, b in zip(parameters, model.module.parameters()))
        assert model.posterior._bases == bases and [g["params"] for g in model.optimizer.param_groups] == groups


@pytest.fixture
def transfers(monkeypatch) -> list:
    """Every batch tensor moved by bayesso.batches.transfer: (shape, its dtype, target device, target dtype)."""
    calls, original = [], bayesso.batches.transfer

    def spy(tensor, device, dtype):
        calls.append((tuple(tensor.shape), tensor.dtype, device, dtype))
        return original(tensor, device, dtype)

    monkeypatch.setattr(bayesso.batches, "transfer", spy)
    monkeypatch.setattr(bayesso.predict.metrics, "transfer", spy)
    return calls


def laplace_model() -> BayesianModel:
    x, y = digits()
    model = BayesianModel(network(), "classification", posterior="diag")
    model.fit_laplace(make_loader(x, y, 8), progress=False)
    return model


ENTRY_POINTS = {  # name: (run on a float32 model with float64 inputs, the x and y moves it makes)
    "fit": (lambda m, other, x, y: m.fit(make_loader(x, y, 8), progress=False), 3, 3),
    "fit_laplace": (lambda m, other, x, y: m.fit_laplace(make_loader(x, y, 8), progress=False), 3, 3),
    "predict mc": (lambda m, other, x, y: m.predict(x, 2), 1, 0),
    "predict linearized": (lambda m, other, x, y: m.predict(x, 2, method="linearized"), 1, 0),
    "predict probit": (lambda m, other, x, y: m.predict(x, method="probit"), 1, 0),
    "evaluate": (
        lambda m, other, x, y: evaluate(m, [(x, y)], "probit", ood_loader=[(x[:4], y[:4])], progress=False),
        2,
        1,
    ),
    "grid": (
        lambda m, other, x, y: m.optimize_prior_precision("grid", val_loader=[(x, y)], grid=[0.5, 1.0, 2.0]),
        3,
        3,
    ),
    "ensemble mc": (lambda m, other, x, y: Ensemble([m, other]).predict(x, 2), 2, 0),
    "ensemble map": (lambda m, other, x, y: Ensemble([m, other]).predict(x, method="map"), 2, 0),
    "train_map": (
        lambda m, other, x, y: train_map(m.module, make_loader(x, y, 8), "classification", progress=False),
        3,
        3,
    ),
}


@pytest.mark.filterwarnings("ignore:the best prior precision")  # the grid's edge: no matter here
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_moves_each_batch_to_the_module_device_and_dtype(entry, transfers):
    run, x_moves, y_moves = ENTRY_POINTS[entry]
    model, other = laplace_model(), laplace_model()
    x, y = digits(24, torch.float64)  # float64 inputs: a float32 nn.Linear refuses them unless they are cast
    transfers.clear()
    run(model, other, x, y)
    device = next(model.module.parameters()).device
    inputs = [c for c in transfers if c[1] == torch.float64]
    targets = [c for c in transfers if c[1] == torch.int64]
    assert len(inputs) == x_moves and len(targets) == y_moves and len(transfers) == x_moves + y_moves
    assert all(c[2] == device and c[3] == torch.float32 for c in inputs)
    assert all(c[2] == device for c in targets)


def test_complex_inputs_are_refused_by_name_and_change_nothing():
    model = laplace_model()
    x = torch.randn(8, 5, dtype=torch.complex64)
    before = snapshot(model)
    with pytest.raises(ValueError, match="fit, epoch 1, batch 1: x is a torch.complex64 tensor .* torch.float32"):
        model.fit([(x, torch.zeros(8, dtype=torch.long))], dataset_size=8, progress=False)
    with pytest.raises(ValueError, match="x is a torch.complex64 tensor"):
        model.predict(x)
    assert_unchanged(before, model)
