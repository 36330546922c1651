"""BayesianModel: sampling context, MC prediction, fit, save/load."""

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.model import PREDICTIVES
from bayesso.posteriors import DiagonalGaussian
from tests.cases import CASES_BY_NAME, fitted_bayesian_model


def test_sample_parameters_puts_a_sample_in_and_restores_the_mean_after_an_exception():
    model, _, _ = fitted_bayesian_model()
    before = [p.detach().clone() for p in model.module.parameters()]
    with pytest.raises(RuntimeError, match="inside"), model.sample_parameters(torch.Generator().manual_seed(0)):
        assert not torch.equal(next(model.module.parameters()), before[0])
        raise RuntimeError("inside")
    assert all(torch.equal(p, b) for p, b in zip(model.module.parameters(), before))


def test_predict_uses_eval_mode_and_restores_it():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.9), nn.Linear(8, 2))
    model = BayesianModel(module, "classification", dataset_size=10)
    x = torch.randn(5, 4)
    first = model.predict(x, n_samples=2, generator=torch.Generator().manual_seed(0)).probs
    second = model.predict(x, n_samples=2, generator=torch.Generator().manual_seed(0)).probs
    assert torch.equal(first, second) and module.training


@pytest.mark.parametrize("structure", ["kron", "mixed"])
def test_save_and_load_round_trip(tmp_path, structure):
    model, x, _ = fitted_bayesian_model(structure, "conv2d")
    model.posterior.deterministic = {"2"}
    model.save(tmp_path / "model.pt")
    case = CASES_BY_NAME["conv2d"]
    torch.manual_seed(123)
    loaded = BayesianModel.load(tmp_path / "model.pt", case.build().double())
    assert isinstance(loaded.posterior, type(model.posterior)) and loaded.posterior.deterministic == {"2"}
    assert loaded.posterior.statistic.structures == model.posterior.statistic.structures
    torch.testing.assert_close(loaded.posterior.precision_dense(), model.posterior.precision_dense(), rtol=0, atol=0)
    a = model.predict(x, n_samples=4, generator=torch.Generator().manual_seed(1)).probs
    b = loaded.predict(x, n_samples=4, generator=torch.Generator().manual_seed(1)).probs
    assert torch.equal(a, b)


@pytest.mark.parametrize("method, structure", [("vogn", "diag"), ("noisy_kfac", "kron")])
def test_fit_on_digits(method, structure):
    torch.manual_seed(0)
    data = load_digits(flatten=True)
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = BayesianModel(module, "classification", posterior=structure)  # the defaults: τ = 1, δ = 1
    history = model.fit(make_loader(data.x_train, data.y_train, 64), method=method, epochs=10, progress=False)
    assert model.posterior.dataset_size == len(data.x_train)
    assert [h["epoch"] for h in history] == list(range(1, 11)) and history[-1]["loss"] < history[0]["loss"]
    accuracy = (model.predict(data.x_test, n_samples=8).probs.argmax(1) == data.y_test).float().mean()
    assert accuracy > 0.93


def test_bad_construction_and_fit_arguments():
    module = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="posterior must be one of 'diag', 'kron', 'full' or a mapping; got 'dense'"):
        BayesianModel(module, "classification", posterior="dense")
    with pytest.raises(ValueError, match="built on a different module"):
        BayesianModel(module, "classification", posterior=DiagonalGaussian(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="module must be an nn.Module"):
        BayesianModel("net", "classification")
    model = BayesianModel(module, "classification")
    with pytest.raises(ValueError, match="method must be one of .* got 'sgd'"):
        model.fit([], method="sgd")
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        model.fit([], epochs=0)
    with pytest.raises(ValueError, match="dataset_size is unknown and the loader has no sized dataset"):
        model.fit([(torch.randn(2, 3), torch.tensor([0, 1]))])


@pytest.mark.parametrize(
    "name, method",
    [(name, method) for name in ("mlp", "mlp_binary") for method in PREDICTIVES]
    + [("mlp_regression", "mc"), ("mlp_regression", "linearized")],  # probit refuses regression (tested)
)
def test_predict_shapes_and_dtypes_for_every_likelihood(name, method):
    model, x, _ = fitted_bayesian_model("kron", name)
    predictive = model.predict(x, n_samples=3, method=method, generator=torch.Generator().manual_seed(0))
    if name == "mlp_regression":
        assert predictive.mean.shape == predictive.epistemic.shape == predictive.aleatoric.shape == (8, 2)
        assert predictive.mean.dtype == torch.float64 and (predictive.epistemic > 0).all()
    else:
        expected = (8, 3) if name == "mlp" else (8,)
        assert predictive.probs.shape == expected and predictive.probs.dtype == torch.float64
        assert ((predictive.probs > 0) & (predictive.probs < 1)).all()
    if method != "mc":
        outputs = 1 if name == "mlp_binary" else 3 if name == "mlp" else 2
        assert predictive.output_covariance.shape == (8, outputs, outputs)


@pytest.mark.parametrize("name, expected", [("mlp", "probit"), ("mlp_binary", "probit"), ("mlp_regression", "mc")])
def test_predict_without_a_method_uses_probit_for_classes_and_mc_otherwise(name, expected):
    model, x, _ = fitted_bayesian_model("kron", name)
    default = model.predict(x, n_samples=3, generator=torch.Generator().manual_seed(0))
    chosen = model.predict(x, n_samples=3, method=expected, generator=torch.Generator().manual_seed(0))
    kept = model.predict(x, n_samples=3, generator=torch.Generator().manual_seed(0), keep_samples=True)
    mc = model.predict(x, n_samples=3, method="mc", generator=torch.Generator().manual_seed(0), keep_samples=True)
    field = "mean" if name == "mlp_regression" else "probs"
    assert torch.equal(getattr(default, field), getattr(chosen, field))
    assert torch.equal(getattr(kept, field), getattr(mc, field))  # samples need "mc"
    assert torch.equal(kept.samples, mc.samples)


def test_predict_rejects_bad_arguments_and_leaves_the_model_alone():
    model, x, _ = fitted_bayesian_model("kron", "mlp")
    before = [p.detach().clone() for p in model.module.parameters()]
    model.module.train()
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        model.predict(x, n_samples=0)
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 2.5"):
        model.predict(x, n_samples=2.5, method="linearized")
    with pytest.raises(ValueError, match="method must be one of 'mc', 'linearized', 'probit'; got 'laplace'"):
        model.predict(x, method="laplace")
    with pytest.raises(ValueError, match=r"x of shape \(8, 4\) does not fit the module"):
        model.predict(x[:, :4])
    with pytest.raises(ValueError, match="x must be a non-empty batch tensor"):
        model.predict(x[:0])
    with pytest.raises(ValueError, match="x must be a non-empty batch tensor .* got a list"):
        model.predict([1.0, 2.0])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        model.predict(x, chunk_size=0)
    assert model.module.training
    assert all(torch.equal(p, b) for p, b in zip(model.module.parameters(), before))


def test_save_and_load_keep_the_laplace_record(tmp_path):
    case = CASES_BY_NAME["mlp_regression"]
    module, x, y = case.data(batch_size=12)
    model = BayesianModel(module, case.likelihood, "kron", prior_precision=2.0, sigma=0.7)
    model.fit_laplace([(x, y)], progress=False)
    model.save(tmp_path / "model.pt")
    loaded = BayesianModel.load(tmp_path / "model.pt", case.build().double())
    assert loaded.laplace_fit == model.laplace_fit
    torch.testing.assert_close(loaded.log_marginal_likelihood(), model.log_marginal_likelihood(), rtol=0, atol=0)
    expected = model.optimize_prior_precision(optimize_sigma=True)
    result = loaded.optimize_prior_precision(optimize_sigma=True)
    assert result["log_marginal_likelihood"] == expected["log_marginal_likelihood"]


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    model, _, _ = fitted_bayesian_model("diag", "mlp")
    model.save(tmp_path / "model.pt")
    saved = (tmp_path / "model.pt").read_bytes()
    monkeypatch.setattr(torch, "save", lambda payload, handle: (handle.write(b"partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        model.save(tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == saved and len(list(tmp_path.iterdir())) == 1
