"""``fit(method="bbb")``: Bayes by Backprop with Pyro's AutoNormal and Trace_ELBO, installed as a diagonal posterior."""

from __future__ import annotations

import math
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule
from torch import nn

from bayesso import BayesianModel
from bayesso.bbb import BayesByBackprop
from bayesso.checkpoint import read_checkpoint
from bayesso.data import make_loader
from bayesso.distributed import ProcessGrid
from bayesso.posteriors import DiagonalGaussian
from bayesso.training import DivergenceWarning
from tests.state import assert_unchanged, snapshot
from tests.test_training import FailingDataset


def _data(n=120):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _model(structure="diag", **options) -> BayesianModel:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    return BayesianModel(net, "classification", structure, **{"prior_precision": 2.0, **options})


def _loader(fail_at=None, error=RuntimeError):
    dataset = FailingDataset(*_data(), fail_at=fail_at, error=error)
    return torch.utils.data.DataLoader(dataset, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(2))


def _guide(model: BayesianModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(loc, scale) of the fitted guide per module parameter."""
    bbb = model.optimizer
    with pyro.settings.context(module_local_params=True):
        return {name: tuple(t.detach() for t in bbb.guide._get_loc_and_scale(site)) for name, site in bbb.sites.items()}


def test_bbb_lowers_the_negative_elbo_and_learns():
    model = _model()
    history = model.fit(_loader(), "bbb", epochs=12, progress=False, lr=3e-2)
    assert [record["epoch"] for record in history] == list(range(1, 13))
    assert history[-1]["neg_elbo"] < 0.8 * history[0]["neg_elbo"]
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["accuracy"] > 0.85
    assert history[-1]["prior_precision"] == [2.0, 2.0]
    x, y = _data()
    probs = model.predict(x, method="mc", n_samples=8, generator=torch.Generator().manual_seed(0)).probs
    assert float((probs.argmax(-1) == y).float().mean()) > 0.85


def test_the_posterior_is_the_guide_and_the_module_stays_plain():
    model = _model("kron", temperature=0.5)
    module, parameters = model.module, list(model.module.parameters())
    store = dict(pyro.get_param_store().items())
    model.fit(_loader(), "bbb", epochs=2, progress=False)
    guide = _guide(model)
    posterior = model.posterior
    assert isinstance(posterior, DiagonalGaussian) and posterior.damping == 0.0
    assert (posterior.dataset_size, posterior.temperature) == (120, 0.5)
    assert posterior.prior_precision.tolist() == [2.0, 2.0]
    names = [name for name, _ in module.named_parameters()]
    assert torch.equal(posterior.mean(), torch.cat([guide[name][0].reshape(-1) for name in names]))
    scales = torch.cat([guide[name][1].reshape(-1) for name in names])
    torch.testing.assert_close(posterior.variance(), scales.square(), rtol=1e-5, atol=0)
    assert model.module is module and list(module.parameters()) == parameters  # the same objects, updated
    assert type(module) is nn.Sequential and not any(isinstance(m, PyroModule) for m in module.modules())
    assert dict(pyro.get_param_store().items()) == store  # Pyro's global store untouched


def test_modules_outside_the_posterior_are_point_estimates():
    model = _model(modules="last_layer")
    first = model.module[0].weight.detach().clone()
    model.fit(_loader(), "bbb", epochs=1, progress=False)
    assert list(model.optimizer.sites) == ["3.weight", "3.bias"]
    assert not torch.equal(model.module[0].weight, first)  # trained, as a point estimate
    assert model.posterior.numel == 16 * 3 + 3


def test_the_same_seed_gives_the_same_run_without_touching_the_global_generator():
    runs = []
    for seed in (3, 3, 4):
        model = _model()
        state = torch.get_rng_state()
        history = model.fit(make_loader(*_data(), 20, seed=0), "bbb", epochs=2, progress=False, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((history, torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]),
                     model.posterior.variance()))  # fmt: skip
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_the_step_is_svi_with_pyro_adam():
    x, y = _data(40)
    ours, theirs = (BayesByBackprop(_model(), lr=0.05, dataset_size=120) for _ in range(2))
    ours.prepare(x, y)
    theirs.prepare(x, y)
    svi = SVI(theirs.network, theirs.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(max_plate_nesting=0))
    for _ in range(3):
        ours.step(x, y)
        with theirs._sampling():
            svi.step(x, y)
    for (name, a), b in zip(ours.elbo.state_dict().items(), theirs.elbo.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "option, value",
    [("lr", 0.0), ("lr", -1e-3), ("lr", "fast"), ("lr", math.nan), ("init_scale", math.inf), ("mc_samples", 0),
     ("mc_samples", 1.5), ("seed", True), ("temperature", -1.0), ("prior_precision", 0.0), ("init_scale", 0.8)],
)  # fmt: skip
def test_bad_options_are_refused_and_change_nothing(option, value):
    model = _model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{option} must be.*{value!r}" if option != "prior_precision" else option):
        model.fit(_loader(), "bbb", progress=False, **{option: value})
    assert_unchanged(before, model)


def test_a_failure_mid_run_restores_the_model_and_the_checkpoint_resumes_it_exactly(tmp_path):
    reference = _model()
    expected = reference.fit(_loader(), "bbb", epochs=2, progress=False)
    model = _model()
    before = snapshot(model)
    loader = _loader(fail_at=120 + 3 * 20 + 7)  # in epoch 2, batch 4: after the checkpoint at update 8
    with pytest.raises(RuntimeError, match="the data source failed"):
        model.fit(loader, "bbb", epochs=2, progress=False, checkpoint=tmp_path / "run.pt", checkpoint_every=4)
    assert_unchanged(before, model)
    saved = read_checkpoint(tmp_path / "run.pt", "fit")
    assert saved["method"] == "bbb" and (saved["progress"]["epoch"], saved["progress"]["step"]) == (1, 8)
    loader.dataset.fail_at = None
    history = model.fit(loader, "bbb", epochs=2, progress=False, checkpoint=tmp_path / "run.pt", checkpoint_every=4)
    assert history == expected
    for a, b in zip(model.module.state_dict().values(), reference.module.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(model.posterior.variance(), reference.posterior.variance())


def test_an_interrupt_installs_the_updates_made_so_far():
    model = _model()
    start = [p.detach().clone() for p in model.module.parameters()]
    with pytest.raises(KeyboardInterrupt):
        model.fit(_loader(fail_at=70, error=KeyboardInterrupt), "bbb", progress=False)  # in the fourth batch
    assert isinstance(model.optimizer, BayesByBackprop) and model.posterior is model.optimizer.posterior
    assert not any(torch.equal(p, q) for p, q in zip(model.module.parameters(), start))
    guide = _guide(model)
    assert all(torch.equal(p, guide[name][0]) for name, p in model.module.named_parameters())


def test_a_bad_batch_restores_the_model():
    model = _model()
    x, y = _data()
    y[70] = 5  # in the fourth batch of 20
    before = snapshot(model)
    with pytest.raises(ValueError, match="epoch 1, batch 4.*class"):
        model.fit(make_loader(x, y, 20, shuffle=False), "bbb", progress=False)
    assert_unchanged(before, model)


def test_a_run_whose_loss_at_the_mean_rises_warns(monkeypatch):
    series = iter([1.0, 0.5, 2.0, 2.0])
    monkeypatch.setattr(BayesByBackprop, "loss_at_mean", lambda self, x, y: next(series))
    with pytest.warns(DivergenceWarning, match=r"fit \(bbb\), epoch 4: .* diverging. Lower lr$"):
        _model().fit(make_loader(*_data(), 60), "bbb", epochs=4, progress=False)


def test_regression_learns_sigma():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64).unsqueeze(1)
    y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
    model = BayesianModel(nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)), "regression", sigma=1.0)
    history = model.fit(make_loader(x, y, 64), "bbb", epochs=40, progress=False, lr=5e-2)
    assert history[-1]["sigma"] == model.likelihood.sigma_value < 0.7 * history[0]["sigma"]
    assert history[-1]["neg_elbo"] < 0.8 * history[0]["neg_elbo"]


def test_scales_stay_below_the_prior_std_and_the_posterior_is_exact():
    model = _model(prior_precision={"0": 2.0, "3": 8.0})
    model.fit(make_loader(*_data(), 20), "bbb", epochs=3, progress=False, init_scale=0.3, lr=0.5)
    guide = _guide(model)
    for name, (_, scale) in guide.items():
        assert float(scale.max()) < (2.0 if name.startswith("0.") else 8.0) ** -0.5
    scales = torch.cat([guide[name][1].reshape(-1) for name, _ in model.module.named_parameters()])
    assert float(scales.max()) > 0.9 * 2.0**-0.5  # pressed against the bound
    torch.testing.assert_close(model.posterior.variance(), scales.square(), rtol=1e-5, atol=0)


def test_a_fitted_model_moves_with_its_guide():
    model = _model()
    model.fit(_loader(), "bbb", progress=False)
    model.to(torch.float64)
    assert model.posterior.variance().dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.optimizer.elbo.parameters())
    assert model.predict(_data()[0].double(), method="mc", n_samples=2).probs.dtype == torch.float64


def test_a_process_grid_is_refused():
    with pytest.raises(ValueError, match="one process, got a ProcessGrid of world size 2"):
        BayesByBackprop(_model(), grid=ProcessGrid(rank=0, world_size=2))


def test_without_pyro_fit_names_the_extra(monkeypatch):
    model = _model()
    before = snapshot(model)
    monkeypatch.setitem(sys.modules, "pyro", None)
    monkeypatch.delitem(sys.modules, "bayesso.bbb")
    with pytest.raises(ImportError, match=r"pip install 'bayesso\[pyro\]'"):
        model.fit(_loader(), "bbb", progress=False)
    assert_unchanged(before, model)


@pytest.mark.slow  # a new interpreter imports torch
def test_bayesso_imports_without_pyro():
    code = "import sys; sys.modules['pyro'] = None; import bayesso, bayesso.training; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
