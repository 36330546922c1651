"""``BayesianModel.fit``: all or nothing, checkpoints, and resumption bit-identical to an uninterrupted run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesso import BayesianModel
from bayesso.checkpoint import read_checkpoint
from bayesso.data import make_loader
from bayesso.optim import PRESETS, VOGN
from bayesso.training import DivergenceWarning, divergence
from tests.state import assert_unchanged, snapshot

ROOT = Path(__file__).parents[1]


class FailingDataset(TensorDataset):
    """Raises ``error`` when serving its ``fail_at``-th example."""

    def __init__(self, *tensors, fail_at: int | None = None, error: type[BaseException] = RuntimeError) -> None:
        super().__init__(*tensors)
        self.fail_at, self.error, self.served = fail_at, error, 0

    def __getitem__(self, index):
        self.served += 1
        if self.served == self.fail_at:
            raise self.error("the data source failed")
        return super().__getitem__(index)


def _data(n=120):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _model(structure="diag", batchnorm=False):
    torch.manual_seed(1)
    middle = [nn.BatchNorm1d(16)] if batchnorm else [nn.Dropout(0.2)]
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), *middle, nn.Linear(16, 3))
    return BayesianModel(net, "classification", structure, prior_precision=5.0, temperature=0.2)


def _loader(fail_at=None, error=RuntimeError):
    dataset = FailingDataset(*_data(), fail_at=fail_at, error=error)
    return DataLoader(dataset, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(2))


def _same_state(a: BayesianModel, b: BayesianModel) -> bool:
    modules = all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    statistics = torch.equal(a.posterior.statistic.flatten(), b.posterior.statistic.flatten())
    return modules and statistics


@pytest.mark.parametrize("method, structure", [("vogn", "diag"), ("noisy_kfac", "kron")])
def test_fit_in_parts_over_one_checkpoint_equals_one_fit(method, structure, tmp_path):
    whole = _model(structure)  # without the cosine schedule, whose length is the run's: extending it changes it
    history = whole.fit(_loader(), method, epochs=3, progress=False, schedule=None)
    parts = _model(structure)
    loader = _loader()
    for epochs in (1, 3):
        resumed = parts.fit(
            loader, method, epochs=epochs, progress=False, checkpoint=tmp_path / "run.pt", schedule=None
        )
    assert resumed == history and len(history) == 3
    assert _same_state(whole, parts)
    assert parts.optimizer.state_dict()["vi"]["step"] == whole.optimizer.state_dict()["vi"]["step"] == 18


def test_a_failure_mid_run_restores_the_model_and_the_checkpoint_resumes_it_exactly(tmp_path):
    reference = _model("kron")
    reference.fit(_loader(), "noisy_kfac", epochs=2, progress=False)
    model = _model("kron")
    before = snapshot(model)
    loader = _loader(fail_at=20 * 9 + 7)  # in epoch 2, batch 4: after the checkpoint at update 8
    with pytest.raises(RuntimeError, match="the data source failed"):
        model.fit(loader, "noisy_kfac", epochs=2, progress=False, checkpoint=tmp_path / "run.pt", checkpoint_every=4)
    assert_unchanged(before, model)
    saved = read_checkpoint(tmp_path / "run.pt", "fit")["progress"]
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 2, 8)
    assert read_checkpoint(tmp_path / "run.pt.previous", "fit")["progress"]["step"] == 4
    loader.dataset.fail_at = None
    model.fit(loader, "noisy_kfac", epochs=2, progress=False, checkpoint=tmp_path / "run.pt", checkpoint_every=4)
    assert _same_state(model, reference)


def test_an_interrupt_keeps_the_completed_updates():
    model = _model()
    model.laplace_fit = object()  # any Laplace record stops describing the posterior once VI moves it
    start = [p.detach().clone() for p in model.module.parameters()]
    with pytest.raises(KeyboardInterrupt):
        model.fit(_loader(fail_at=70, error=KeyboardInterrupt), "vogn", progress=False)
    assert isinstance(model.optimizer, VOGN) and model.optimizer.state_dict()["vi"]["step"] == 3
    assert model.laplace_fit is None
    assert not all(torch.equal(p, q) for p, q in zip(model.module.parameters(), start))


def test_fit_keeps_its_optimizer_and_drops_the_laplace_record():
    model = _model()
    x, y = _data()
    model.fit_laplace(make_loader(x, y, 40), progress=False)
    model.fit(make_loader(x, y, 40), "vogn", progress=False)
    assert model.laplace_fit is None and isinstance(model.optimizer, VOGN)
    with pytest.raises(ValueError, match="call fit_laplace"):
        model.log_marginal_likelihood()


def test_batch_norm_advice_only_where_the_user_sets_the_mode():
    x, y = _data()
    model = _model(batchnorm=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(make_loader(x, y, 40), "vogn", progress=False)
    assert not [w for w in caught if "training mode" in str(w.message)]
    optimizer = VOGN(model)
    model.module.train()

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.module(x), y)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="are in training mode.*call module.eval"):
        optimizer.step(closure)


def test_checkpoints_rotate_and_the_sampler_gets_its_epoch(tmp_path):
    x, y = _data()
    sampler = EpochRecordingSampler(len(x))
    loader = DataLoader(TensorDataset(x, y), batch_size=40, sampler=sampler)
    _model().fit(loader, "vogn", epochs=2, progress=False, checkpoint=tmp_path / "run.pt", checkpoint_every=2)
    assert sampler.epochs == [0, 1]
    assert read_checkpoint(tmp_path / "run.pt", "fit")["progress"]["step"] == 6
    assert read_checkpoint(tmp_path / "run.pt.previous", "fit")["progress"]["step"] == 6  # step 6 is also epoch 2's end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "run.pt.previous"]  # no temporary files left


class EpochRecordingSampler(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n, self.epochs = n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _run_worker(out: Path, *arguments: str) -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    command = [sys.executable, str(ROOT / "tests" / "workers" / "resumable_fit.py"), "--out", str(out), *arguments]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=False)


@pytest.mark.parametrize("method", ["noisy_kfac", "ivon"])
def test_a_process_killed_mid_epoch_resumes_bit_identical_to_an_uninterrupted_run(method, tmp_path):
    reference = _run_worker(tmp_path / "reference", "--method", method)
    assert reference.returncode == 0, reference.stderr[-2000:]
    checkpoint = ["--method", method, "--checkpoint", str(tmp_path / "run.pt")]
    # killed (SIGKILL) while serving example 365: epoch 2, batch 7, three updates after the checkpoint at update 16
    killed = _run_worker(tmp_path / "resumed", *checkpoint, "--kill-at-fetch", "365")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert read_checkpoint(tmp_path / "run.pt", "fit")["progress"]["step"] == 16
    resumed = _run_worker(tmp_path / "resumed", *checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = torch.load(tmp_path / "reference" / "rank0.pt", weights_only=False)
    actual = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    assert actual["history"] == expected["history"]
    assert all(torch.equal(actual["module"][k], v) for k, v in expected["module"].items())
    for name, tensors in expected["posterior"]["statistic"].items():
        assert all(torch.equal(a, b) for a, b in zip(actual["posterior"]["statistic"][name], tensors))


def _linear_regression(sigma=0.1, n=1000):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 + sigma * torch.randn(n, 1, generator=gen)
    return x, y


@pytest.mark.parametrize(
    "method, structure", [("vogn", "diag"), ("noisy_adam", "diag"), ("noisy_kfac", "kron"), ("ivon", "diag")]
)
def test_fit_learns_the_regression_noise_and_reaches_the_exact_posterior_mean(method, structure):
    x, y = _linear_regression()
    torch.manual_seed(0)
    model = BayesianModel(nn.Linear(3, 1), "regression", posterior=structure, sigma=0.1)  # a σ to start from
    history = model.fit(make_loader(x, y, 64), method, epochs=25, progress=False)
    exact = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution.flatten()
    residual = float((y - torch.cat([x, torch.ones(len(x), 1)], 1) @ exact.unsqueeze(1)).square().mean().sqrt())
    assert abs(model.likelihood.sigma_value - residual) < 0.05 * residual  # σ² -> E_q mean squared residual
    torch.testing.assert_close(model.posterior.mean(), exact, atol=0.02, rtol=0)
    assert history[0]["sigma"] > 1.0 and math.isclose(history[-1]["sigma"], model.likelihood.sigma_value)
    assert len(history[-1]["prior_precision"]) == 1


def test_learn_noise_false_keeps_sigma_and_is_refused_without_a_gaussian_likelihood():
    x, y = _linear_regression(n=128)
    model = BayesianModel(nn.Linear(3, 1), "regression", sigma=0.5)
    model.fit(make_loader(x, y, 64), "vogn", epochs=1, progress=False, learn_noise=False)
    assert model.likelihood.sigma_value == 0.5
    classifier = BayesianModel(nn.Linear(3, 2), "classification")
    with pytest.raises(ValueError, match="learn_noise must be True \\(regression likelihood only\\) or False"):
        classifier.fit(make_loader(x, y.flatten().gt(0).long(), 64), "vogn", learn_noise=True)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or None, got 'step'"):
        classifier.fit(make_loader(x, y.flatten().gt(0).long(), 64), "vogn", schedule="step")


@pytest.mark.parametrize("schedule", ["cosine", None])
def test_cosine_schedule_decays_lr_over_the_run(schedule):
    x, y = _linear_regression(n=128)
    model = BayesianModel(nn.Linear(3, 1), "regression")
    model.fit(make_loader(x, y, 32), "noisy_adam", epochs=2, progress=False, lr=0.05, schedule=schedule)
    group = model.optimizer.param_groups[0]
    expected = 0.05 * 0.5 * (1 + math.cos(math.pi * 7 / 8)) if schedule else 0.05  # the last of 8 updates
    assert math.isclose(group["lr"], expected) and group["initial_lr"] == 0.05


def test_divergence_is_detected_when_half_the_gain_is_lost():
    assert divergence([2.0, 1.0, 0.5, 0.6]) is None
    assert divergence([2.0, 1.0, 0.5, 1.3, 0.6]) is None  # one noisy epoch is not a divergence
    message = divergence([2.0, 1.0, 0.5, 1.3, 1.4])
    assert "epoch 5: the training loss at the mean rose to 1.4 from its best 0.5 (epoch 3; first epoch 2)" in message
    assert divergence([1.0]) is None and divergence([1.0, 1.5, 2.0]) is None  # never improved: not a divergence


def test_fit_warns_when_the_mean_diverges_not_when_the_sampled_loss_rises(monkeypatch):
    x, y = _linear_regression(n=64, sigma=0.0)
    exact = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([0.3])
    states = iter([exact, exact, (exact[0] + 5.0, exact[1]), (exact[0] + 5.0, exact[1]), exact])

    class Scripted(VOGN):  # after each step (one per epoch) the mean is set to the next state of the script
        def step(self, closure=None):
            loss = super().step(closure)
            weight, bias = next(states)
            with torch.no_grad():
                self.model.module.weight.copy_(weight)
                self.model.module.bias.copy_(bias)
            return loss

    monkeypatch.setitem(PRESETS, "vogn", Scripted)
    model = BayesianModel(nn.Linear(3, 1), "regression")
    pattern = "fit \\(vogn\\), epoch 5: the training loss at the mean rose to .* from its best"
    with pytest.warns(DivergenceWarning, match=pattern) as caught:
        history = model.fit(make_loader(x, y, 64), "vogn", epochs=5, progress=False, learn_noise=False)
    assert len([w for w in caught if w.category is DivergenceWarning]) == 1
    at_mean = [record["loss_at_mean"] for record in history]  # before each epoch's step: init, good, good, bad, bad
    assert at_mean[1] == at_mean[2] < at_mean[0] < at_mean[3] == at_mean[4]
