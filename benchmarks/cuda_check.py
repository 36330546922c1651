"""Devices and dtypes on CUDA: fit, predict, Laplace, ``to("cuda")`` and round trips, on a GPU machine.

    python benchmarks/cuda_check.py          (needs torch with CUDA; DEVICES_CHECK_DEVICE=cpu: a dry run)

Each check prints PASS or FAIL with its error; the exit status is the number of failures. Small MLPs on
random data, so the whole run takes well under two minutes (most of it CUDA start-up).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import traceback

import torch
from torch import nn

from bayesso import BayesianModel, Ensemble
from bayesso.optim import SecondOrderOptimizer
from bayesso.predict.metrics import evaluate

# DEVICES_CHECK_DEVICE=cpu runs the same checks on the CPU (a dry run of the script itself)
CUDA = torch.device(os.environ.get("DEVICES_CHECK_DEVICE", "cuda:0"))
CHECKS = []


def check(function):
    CHECKS.append(function)
    return function


def run(function) -> bool:
    start = time.perf_counter()
    try:
        function()
    except Exception:
        print(f"FAIL {function.__name__}\n{traceback.format_exc()}", flush=True)
        return False
    print(f"PASS {function.__name__} ({time.perf_counter() - start:.1f} s)", flush=True)
    return True


def network(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, outputs))


def data(n: int = 64, regression: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    if regression:
        return x, x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loader(regression: bool = False):
    x, y = data(regression=regression)  # CPU batches, pinned: the entry points move them (non-blocking)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, pin_memory=True)


def on_cuda(model: BayesianModel) -> None:
    posterior = model.posterior
    tensors = [*model.module.parameters(), posterior.prior_precision]
    tensors += [t for block in posterior.statistic.blocks.values() for t in block.tensors()]
    tensors += [t for b in posterior._bases.values() for t in vars(b).values() if isinstance(t, torch.Tensor)]
    if model.optimizer is not None:
        tensors.append(model.optimizer._momentum)
        generators = [model.optimizer.generator, model.optimizer.label_generator]
        assert all(g.device == CUDA for g in generators), [g.device for g in generators]
    bad = [t.device for t in tensors if t.device != CUDA]
    assert not bad, f"tensors off {CUDA}: {bad}"


@check
def fit_and_predict_on_cuda():
    for method, structure in [("vogn", "diag"), ("noisy_kfac", "kron"), ("ivon", "diag")]:
        model = BayesianModel(network().to(CUDA), "classification", posterior=structure)
        history = model.fit(loader(), method=method, epochs=2, progress=False)
        assert history[-1]["loss"] < history[0]["loss"] * 1.5, history
        on_cuda(model)
        x, _ = data(8)  # a CPU batch
        for method_ in ("mc", "linearized", "probit"):
            for generator in (None, torch.Generator().manual_seed(0), torch.Generator(device=CUDA).manual_seed(0)):
                probs = model.predict(x, 4, method=method_, generator=generator).probs
                assert probs.device == CUDA and torch.allclose(probs.sum(1), torch.ones(8, device=CUDA), atol=1e-5)


@check
def laplace_evidence_and_grid_on_cuda():
    for structure in ("diag", "kron", "full"):
        model = BayesianModel(network().to(CUDA), "classification", posterior=structure)
        model.fit_laplace(loader(), progress=False)
        generator = torch.Generator(device=CUDA).manual_seed(0)
        model.fit_laplace(loader(), kind="fisher_mc", generator=generator, progress=False)
        on_cuda(model)
        model.optimize_prior_precision("marglik", granularity="module")
        model.optimize_prior_precision("grid", val_loader=loader(), grid=[0.1, 1.0, 10.0])
        metrics = evaluate(model, loader(), "probit", ood_loader=loader(), progress=False)
        assert 0 <= metrics["accuracy"] <= 1, metrics
    regression = BayesianModel(network(outputs=1).to(CUDA), "regression", posterior="kron")
    regression.fit(loader(regression=True), epochs=2, progress=False)
    regression.fit_laplace(loader(regression=True), progress=False)
    regression.optimize_prior_precision("marglik", optimize_sigma=True)  # log σ beside log δ on the GPU
    assert evaluate(regression, loader(regression=True), "linearized", progress=False)["rmse"] > 0


@check
def to_cuda_matches_cpu_and_round_trips_exactly():
    model = BayesianModel(network(), "classification", posterior="kron")
    model.fit(loader(), method="noisy_kfac", epochs=1, progress=False)
    x, y = data(8)
    probit = model.predict(x, method="probit").probs
    mc = model.predict(x, 16, generator=torch.Generator().manual_seed(3)).probs
    state = copy.deepcopy(model.posterior.state_dict()), copy.deepcopy(model.module.state_dict())
    momentum = model.optimizer._momentum.clone()
    assert model.to(CUDA) is model
    on_cuda(model)
    torch.testing.assert_close(model.predict(x, method="probit").probs.cpu(), probit, rtol=1e-4, atol=1e-5)
    # a CPU generator draws the same noise for a CUDA model
    same = model.predict(x, 16, generator=torch.Generator().manual_seed(3)).probs.cpu()
    torch.testing.assert_close(same, mc, rtol=1e-4, atol=1e-5)

    def closure():
        model.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.module(x.to(CUDA)), y.to(CUDA))
        loss.backward()
        return loss

    model.to("cpu").to(CUDA, torch.float64).to("cpu", torch.float32)
    assert all(p.device.type == "cpu" for p in model.module.parameters())
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, state[1][key]), key
    for name, tensors in model.posterior.state_dict()["statistic"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, state[0]["statistic"][name])), name
    assert torch.equal(model.optimizer._momentum, momentum)
    model.to(CUDA)
    model.optimizer.step(closure)  # continues on the GPU with generators moved there
    on_cuda(model)


@check
def module_moved_by_hand_is_followed():
    model = BayesianModel(network(), "classification", posterior="diag")
    model.fit(loader(), method="vogn", epochs=1, progress=False)
    model.module.to(CUDA, torch.float64)
    x, y = data(8)
    assert model.predict(x, 4).probs.dtype == torch.float64
    model.fit(loader(), method="vogn", epochs=1, progress=False)
    on_cuda(model)
    assert model.posterior.dtype == torch.float64 and model.optimizer._momentum.dtype == torch.float64

    module = network()
    optimizer = SecondOrderOptimizer(module, "classification", lr=0.1)
    module.to(CUDA)
    xc, yc = x.to(CUDA), y.to(CUDA)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(xc), yc)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    assert optimizer.generator.device == CUDA and optimizer._momentum.device == CUDA


@check
def ensemble_across_devices():
    members = []
    for seed, device in [(0, CUDA), (1, "cpu")]:
        member = BayesianModel(network(seed).to(device), "classification", posterior="diag")
        member.fit_laplace(loader(), progress=False)
        members.append(member)
    x, _ = data(8)
    for method in ("mc", "map", "probit"):
        probs = Ensemble(members).predict(x, 4, method=method).probs
        assert probs.device == CUDA, probs.device
    assert 0 <= evaluate(Ensemble(members), loader(), "map", progress=False)["accuracy"] <= 1


@check
def bad_moves_change_nothing():
    model = BayesianModel(network().to(CUDA), "classification", posterior="kron")
    model.fit(loader(), method="noisy_kfac", epochs=1, progress=False)
    before = [p.clone() for p in model.module.parameters()]
    for args in [(torch.float16,), ("cuda:99",), ("meta",)]:
        try:
            model.to(*args)
        except ValueError as error:
            print(f"    refused {args}: {str(error)[:100]}")
        else:
            raise AssertionError(f"to{args} was accepted")
        on_cuda(model)
        assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters()))


if __name__ == "__main__":
    if CUDA.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        sys.exit(1)
    name = torch.cuda.get_device_name(CUDA) if CUDA.type == "cuda" else str(CUDA)
    print(f"torch {torch.__version__} on {name}", flush=True)
    start = time.perf_counter()
    failures = [function.__name__ for function in CHECKS if not run(function)]
    seconds = time.perf_counter() - start
    print(f"{len(CHECKS) - len(failures)} passed, {len(failures)} failed {failures} in {seconds:.0f} s")
    sys.exit(len(failures))
