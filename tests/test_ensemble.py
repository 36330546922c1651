"""Ensembles: mixture equations, the MAP predictive, validation, the deep-ensemble baseline, per-member fits."""

import math

import pytest
import torch
from torch import nn

from bayesso import BayesianModel, Ensemble
from bayesso.curvature import CurvatureEngine
from bayesso.data import make_loader
from bayesso.ensemble import deep_ensemble, map_predictive, train_map
from bayesso.likelihoods import Regression
from bayesso.predict.metrics import evaluate
from tests.cases import CASES_BY_NAME


def members(name: str, k: int, sigmas=None) -> tuple[list[BayesianModel], torch.Tensor]:
    """k float64 zoo models with different weights and Kronecker posteriors from a batch's GGN; one test batch."""
    case, models = CASES_BY_NAME[name], []
    for m in range(k):
        module, x, y = case.data(batch_size=8, seed=m)
        likelihood = Regression(sigmas[m]) if sigmas else case.likelihood
        model = BayesianModel(module, likelihood, posterior="kron", prior_precision=3.0, dataset_size=50)
        model.posterior.update_statistic(CurvatureEngine(module, likelihood, "ggn", "kron").compute(x, y) * (1 / 8))
        models.append(model)
    return models, case.data(batch_size=6, seed=99)[1]


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n 2-D points from three Gaussian blobs (float64) and their labels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    centres = torch.tensor([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]], dtype=torch.float64)
    return centres[y] + 0.8 * torch.randn(n, 2, generator=gen, dtype=torch.float64), y


def mlp(outputs: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, outputs)).double()


@pytest.mark.parametrize("name", ["mlp", "mlp_binary"])
@pytest.mark.parametrize("method", ["mc", "linearized", "probit", "map"])
def test_classification_mixture_is_the_mean_of_the_members_probs(name, method):
    models, x = members(name, 3)
    ensemble = Ensemble(models)
    mixed = ensemble.predict(x, n_samples=4, method=method, generator=seeded())
    gen = seeded()
    parts = [
        map_predictive(m, x) if method == "map" else m.predict(x, n_samples=4, method=method, generator=gen)
        for m in models
    ]
    torch.testing.assert_close(mixed.probs, sum(p.probs for p in parts) / 3, rtol=1e-12, atol=1e-15)
    assert mixed.mean is None and mixed.probs.shape == parts[0].probs.shape
    assert not torch.allclose(parts[0].probs, parts[1].probs)  # the members differ


@pytest.mark.parametrize("method", ["mc", "linearized", "map"])
def test_regression_mixture_follows_the_law_of_total_variance(method):
    models, x = members("mlp_regression", 3, sigmas=[0.5, 0.7, 1.1])
    mixed = Ensemble(models).predict(x, n_samples=5, method=method, generator=seeded())
    gen = seeded()
    parts = [
        map_predictive(m, x) if method == "map" else m.predict(x, n_samples=5, method=method, generator=gen)
        for m in models
    ]
    means = torch.stack([p.mean for p in parts])
    mean = means.mean(0)
    torch.testing.assert_close(mixed.mean, mean)
    torch.testing.assert_close(mixed.aleatoric, torch.full_like(mean, (0.25 + 0.49 + 1.21) / 3))
    epistemic = torch.stack([p.epistemic for p in parts]).mean(0) + ((means - mean) ** 2).mean(0)
    torch.testing.assert_close(mixed.epistemic, epistemic)
    second_moment = torch.stack([p.variance + p.mean**2 for p in parts]).mean(0)  # E[y²] of the mixture
    torch.testing.assert_close(mixed.variance, second_moment - mean**2)


@pytest.mark.parametrize("name, method", [("mlp", "mc"), ("mlp", "probit"), ("mlp_regression", "linearized")])
def test_an_ensemble_of_one_equals_its_member(name, method):
    (model,), x = members(name, 1)
    alone = model.predict(x, n_samples=4, method=method, generator=seeded(), keep_samples=method == "mc")
    ensemble = Ensemble([model]).predict(x, n_samples=4, method=method, generator=seeded(), keep_samples=True)
    for field in ("probs", "mean", "aleatoric", "epistemic"):
        ours, theirs = getattr(ensemble, field), getattr(alone, field)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs), field
    if method == "mc":
        assert torch.equal(ensemble.samples, alone.samples)


def test_map_is_the_softmax_of_the_modules_logits_in_eval_mode():
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)) for _ in range(2)]
    ensemble = Ensemble([BayesianModel(module, "classification") for module in modules])
    x = torch.randn(5, 4)
    mixed = ensemble.predict(x, method="map", keep_samples=True)
    assert all(module.training for module in modules)  # eval mode (no dropout) only while predicting
    logits = [module.eval()(x) for module in modules]
    torch.testing.assert_close(mixed.probs, (logits[0].softmax(-1) + logits[1].softmax(-1)) / 2)
    assert torch.equal(mixed.samples, torch.stack([z.softmax(-1) for z in logits]))  # the members' probs
    binary = BayesianModel(nn.Linear(4, 1), "binary")
    assert torch.equal(Ensemble([binary]).predict(x, method="map").probs, torch.sigmoid(binary.module(x)).squeeze(1))
    regression = BayesianModel(nn.Linear(4, 2), "regression", sigma=0.3)
    predictive = Ensemble([regression]).predict(x, method="map")
    assert torch.equal(predictive.mean, regression.module(x).detach())
    assert torch.equal(predictive.epistemic, torch.zeros(5, 2))
    torch.testing.assert_close(predictive.aleatoric, torch.full((5, 2), 0.09))


def test_bad_inputs_raise_value_errors_naming_the_value():
    models, x = members("mlp", 2)
    with pytest.raises(ValueError, match="at least one BayesianModel, got 0"):
        Ensemble([])
    with pytest.raises(ValueError, match=r"members\[1\] must be a BayesianModel, got Linear"):
        Ensemble([models[0], nn.Linear(2, 2)])
    regression = BayesianModel(nn.Linear(5, 3), "regression")
    with pytest.raises(ValueError, match=r"members\[0\] has Classification\(\), members\[1\] has Regression"):
        Ensemble([models[0], regression])
    with pytest.raises(ValueError, match=r"members\[0\] and members\[1\] share the module Sequential"):
        Ensemble([models[0], models[0]])
    with pytest.raises(ValueError, match=r"members\[0\] and members\[1\] share the tensor '0.weight'"):
        Ensemble([models[0], BayesianModel(nn.Sequential(models[0].module[0], nn.Linear(4, 3)), "classification")])
    shared = nn.Tanh()  # a stateless submodule may be shared
    assert len(Ensemble([BayesianModel(nn.Sequential(nn.Linear(2, 2), shared), "binary") for _ in range(2)])) == 2
    ensemble = Ensemble(models)
    with pytest.raises(ValueError, match="'mc', 'linearized', 'probit', 'map'; got 'mean'"):
        ensemble.predict(x, method="mean")
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        ensemble.predict(x, n_samples=0, method="map")
    with pytest.raises(ValueError, match=r"x of shape \(6, 7\) does not fit the module"):
        ensemble.predict(torch.randn(6, 7, dtype=torch.float64), method="map")
    loader = make_loader(*blobs(8), batch_size=4)
    with pytest.raises(ValueError, match=r"one per member \(2\), got 3 loaders"):
        ensemble.fit_laplace([loader, loader, loader], progress=False)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        deep_ensemble(mlp, loader, "classification", k=0)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        train_map(mlp(), loader, "classification", epochs=0)


def test_train_map_checks_batches_and_leaves_the_module_unchanged_when_it_fails():
    x, y = blobs(8)
    module = mlp()
    before = [p.detach().clone() for p in module.parameters()]
    batches = [(x[:4], y[:4]), (x[4:], y[4:] + 3)]  # labels out of range in the second batch
    with pytest.raises(ValueError, match=r"train_map, epoch 1, batch 2: .*\[0, C\) with C=3, got target \d"):
        train_map(module, batches, "classification", progress=False)
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_deep_ensemble_members_differ_and_the_mixture_nll_is_at_most_their_mean():
    x, y = blobs(200)
    loader = make_loader(x, y, batch_size=32)
    ensemble = deep_ensemble(mlp, loader, "classification", k=3, epochs=4, lr=1e-2, progress=False)
    firsts = [m.module[0].weight for m in ensemble.members]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    metrics = evaluate(ensemble, loader, method="map")
    alone = [evaluate(Ensemble([m]), loader, method="map")["nll"] for m in ensemble.members]
    # -log of a mean of probabilities is at most the mean of the -logs (Jensen), per point and so on average
    assert metrics["nll"] <= sum(alone) / 3 and metrics["accuracy"] > 0.9
    probs = ensemble.predict(x, method="map").probs
    assert math.isclose(metrics["nll"], -probs.gather(1, y.unsqueeze(1)).log().mean().item(), rel_tol=1e-12)


def test_regression_members_get_the_rms_residual_as_sigma():
    gen = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 64, dtype=torch.float64).unsqueeze(1).repeat(1, 2)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(64, 1, generator=gen, dtype=torch.float64)
    given = Regression(sigma=1.0)
    loader = make_loader(x, y, 16)
    ensemble = deep_ensemble(lambda: mlp(1), loader, given, k=2, epochs=2, lr=1e-2, progress=False)
    sigmas = []
    for member in ensemble.members:
        assert member.likelihood is not given and member.module.training  # the mode it was built in
        sigmas.append(member.likelihood.sigma)
        assert math.isclose(sigmas[-1], (y - member.module.eval()(x)).square().mean().sqrt().item(), rel_tol=1e-12)
    assert given.sigma == 1.0 and sigmas[0] != sigmas[1]
    predictive = ensemble.predict(x, method="map")
    torch.testing.assert_close(predictive.aleatoric, torch.full_like(y, (sigmas[0] ** 2 + sigmas[1] ** 2) / 2))
    rmse = (y - predictive.mean).square().mean().sqrt().item()
    assert math.isclose(evaluate(ensemble, loader, method="map")["rmse"], rmse, rel_tol=1e-12)


def test_per_member_fits_laplace_and_vi_with_their_own_seeds_and_checkpoints(tmp_path):
    x, y = blobs(48)
    loader = make_loader(x, y, batch_size=16)
    ensemble = deep_ensemble(mlp, loader, "classification", k=2, epochs=2, lr=1e-2, progress=False)
    posteriors = ensemble.fit_laplace(loader, progress=False)
    assert [m.posterior for m in ensemble.members] == posteriors and all(m.laplace_fit for m in ensemble.members)
    tuned = ensemble.optimize_prior_precision()
    assert len(tuned) == 2 and all(t["log_marginal_likelihood"] is not None for t in tuned)
    laplace = ensemble.predict(x, n_samples=8, method="linearized", generator=seeded()).probs
    assert not torch.allclose(laplace, ensemble.predict(x, method="map").probs)
    batches = list(loader)  # a loader that is a list of batches is one loader, shared
    histories = ensemble.fit(batches, "vogn", epochs=1, progress=False, seed=5, checkpoint=tmp_path / "run.pt")
    assert [len(h) for h in histories] == [1, 1]
    assert [m.optimizer.generator.initial_seed() for m in ensemble.members] == [5, 6]
    assert (tmp_path / "run.member0.pt").is_file() and (tmp_path / "run.member1.pt").is_file()
    histories = ensemble.fit([batches, batches[:1]], "vogn", epochs=1, progress=False)  # one loader per member
    assert [h[0]["epoch"] for h in histories] == [1, 1]
