"""``bayesso.lightning``: Lightning's ``Trainer`` drives bayesso's optimizers through ``step(closure)``.

On the same batches, a Trainer takes exactly the steps that ``BayesianModel.fit`` takes (VI) or
that a plain closure loop takes (``SecondOrderOptimizer``): Lightning's closure runs
``training_step``, zeroes the gradients and calls ``backward``, once per weight sample. The
parameters after two epochs are equal bit for bit, so the accuracies are equal too.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

L = pytest.importorskip("lightning")

from bayesso import BayesianModel  # noqa: E402
from bayesso.data import load_digits  # noqa: E402
from bayesso.demo import small_cnn  # noqa: E402
from bayesso.lightning import CalibrationCallback  # noqa: E402
from bayesso.likelihoods import Classification  # noqa: E402
from bayesso.optim import VOGN, NoisyKFAC, SecondOrderOptimizer  # noqa: E402
from bayesso.predict.metrics import ece, nll  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # Digits are tensors in memory: worker processes would only add start-up time.
    "ignore:The '(train|val)_dataloader' does not have many workers:UserWarning",
    # Lightning 2.6 with torch >= 2.10 (lightning/pytorch/utilities/_pytree.py), not bayesso's.
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning",
)

DIGITS = load_digits(seed=0)
BATCH, SUBSET = 64, 384  # 6 steps per epoch; the slow test trains on all 1,257 training images
VALIDATION = 100


class EpochPermutation(Sampler):
    """A shuffle drawn when each epoch starts. torch's RandomSampler draws once more when it is exhausted,
    which ``fit`` does and Lightning (stopping after len(loader) batches) does not: their epochs 2 would differ."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def _loader(n: int = SUBSET) -> DataLoader:
    dataset = TensorDataset(DIGITS.x_train[:n], DIGITS.y_train[:n])
    return DataLoader(dataset, batch_size=BATCH, sampler=EpochPermutation(len(dataset), seed=0))


def _validation_loader() -> DataLoader:
    return DataLoader(TensorDataset(DIGITS.x_test[:VALIDATION], DIGITS.y_test[:VALIDATION]), batch_size=50)


class Digits(L.LightningModule):
    """A LightningModule around ``net`` whose ``configure_optimizers`` is ``make(net)``."""

    def __init__(self, net: torch.nn.Module, make) -> None:
        super().__init__()
        self.net, self.make, self.likelihood = net, make, Classification()

    def training_step(self, batch, index):
        x, y = batch
        return self.likelihood.nll(self.net(x), y) / len(y)  # the batch mean, as fit's closure

    def configure_optimizers(self):
        return self.make(self.net)


class ValidatedDigits(Digits):
    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", self.likelihood.nll(self.net(x), y) / len(y))


def _trainer(**options) -> L.Trainer:
    settings = {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
    return L.Trainer(**{**settings, **options})


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return small_cnn(10)


VI_CASES = {  # name: (fit's method, posterior, optimizer options)
    "vogn": ("vogn", "diag", {}),
    "vogn, 2 weight samples per step": ("vogn", "diag", {"mc_samples": 2}),
    "noisy_kfac": ("noisy_kfac", "kron", {}),
}


def _accuracy(model: BayesianModel) -> float:
    probs = model.predict(DIGITS.x_test, n_samples=8, generator=torch.Generator().manual_seed(0)).probs
    return float((probs.argmax(1) == DIGITS.y_test).double().mean())


def _trained_by_both(name: str, n: int) -> tuple[BayesianModel, BayesianModel]:
    """The model trained by a Trainer and by ``fit`` with the same settings, batches and seeds."""
    method, structure, options = VI_CASES[name]
    preset = {"vogn": VOGN, "noisy_kfac": NoisyKFAC}[method]
    trained = {}

    def make(net):
        trained["model"] = BayesianModel(net, "classification", structure, dataset_size=n)
        trained["optimizer"] = preset(trained["model"], seed=3, **options)
        return trained["optimizer"]

    _trainer().fit(Digits(_net(), make), _loader(n))
    reference = BayesianModel(_net(), "classification", structure)
    reference.fit(_loader(n), method, epochs=2, progress=False, schedule=None, seed=3, **options)
    assert trained["optimizer"]._step == reference.optimizer._step == 2 * math.ceil(n / BATCH)
    return trained["model"], reference


def _equal_modules(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", VI_CASES)
def test_a_trainer_takes_the_steps_of_fit(name):
    ours, theirs = _trained_by_both(name, SUBSET)
    assert _equal_modules(ours.module, theirs.module)
    assert not _equal_modules(ours.module, _net())


@pytest.mark.slow
def test_on_all_digits_a_trainer_reaches_the_accuracy_of_fit():
    ours, theirs = _trained_by_both("vogn", len(DIGITS.y_train))
    assert _equal_modules(ours.module, theirs.module)
    assert _accuracy(ours) == _accuracy(theirs) > 0.7  # 0.75 measured: 40 steps from a random start


def test_a_trainer_takes_the_steps_of_a_closure_loop_with_second_order_optimizer():
    trained = _net()
    _trainer().fit(Digits(trained, lambda net: SecondOrderOptimizer(net, "classification", seed=3)), _loader())
    reference, likelihood = _net(), Classification()
    optimizer = SecondOrderOptimizer(reference, "classification", seed=3)

    def closure(x, y):
        optimizer.zero_grad()
        loss = likelihood.nll(reference(x), y) / len(y)
        loss.backward()
        return loss

    loader = _loader()
    for _ in range(2):
        for x, y in loader:
            optimizer.step(lambda x=x, y=y: closure(x, y))
    assert optimizer._step == 2 * math.ceil(SUBSET / BATCH)
    assert _equal_modules(trained, reference) and not _equal_modules(trained, _net())


@pytest.mark.parametrize("method", ["mc", "probit"])
def test_the_calibration_callback_logs_the_predictive_ece_and_nll_of_each_epoch(method):
    callback = CalibrationCallback(method=method, n_samples=4, seed=5)
    trained = {}

    def make(net):
        trained["model"] = BayesianModel(net, "classification", "diag", dataset_size=SUBSET)
        return VOGN(trained["model"], seed=3)

    trainer = _trainer(callbacks=[callback])
    trainer.fit(ValidatedDigits(_net(), make), _loader(), _validation_loader())

    assert [record["epoch"] for record in callback.history] == [0, 1]  # not the sanity check
    generator = torch.Generator().manual_seed(5)
    parts = [(trained["model"].predict(x, 4, method, generator).probs, y) for x, y in _validation_loader()]
    probs, targets = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
    last = callback.history[-1]
    assert last["ece"] == pytest.approx(ece(probs, targets), abs=1e-12)
    assert last["nll"] == pytest.approx(nll(probs, targets), abs=1e-12)
    assert float(trainer.callback_metrics["val_ece"]) == pytest.approx(last["ece"], rel=1e-6)
    assert float(trainer.callback_metrics["val_nll"]) == pytest.approx(last["nll"], rel=1e-6)


def test_the_calibration_callback_scores_a_second_order_network_at_its_weights():
    net = _net()
    model = BayesianModel(net, "classification")
    callback = CalibrationCallback(model, method="map")
    trainer = _trainer(max_epochs=1, callbacks=[callback])
    module = ValidatedDigits(net, lambda n: SecondOrderOptimizer(n, "classification"))
    trainer.fit(module, _loader(), _validation_loader())
    with torch.no_grad():
        net.eval()
        probs = torch.cat([torch.softmax(net(x), -1) for x, _ in _validation_loader()])
    assert callback.history[0]["nll"] == pytest.approx(nll(probs, DIGITS.y_test[:VALIDATION]), rel=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "laplace"}, "method must be one of 'mc', 'linearized', 'probit', 'map'; got 'laplace'"),
        ({"n_samples": 0}, "n_samples must be a positive integer, got 0"),
        ({"n_bins": 1.5}, "n_bins must be a positive integer, got 1.5"),
        ({"model": torch.nn.Linear(2, 2)}, "model must be a BayesianModel, an Ensemble or None, got Linear"),
        ({"seed": "0"}, "seed must be an integer, got '0'"),
    ],
)
def test_the_calibration_callback_refuses_bad_settings(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CalibrationCallback(**options)


def test_the_calibration_callback_needs_a_validation_step():
    module = Digits(_net(), lambda net: SecondOrderOptimizer(net, "classification"))
    with pytest.raises(ValueError, match="Digits has no validation_step"):
        _trainer(callbacks=[CalibrationCallback(method="map")]).fit(module, _loader())


@pytest.mark.slow
def test_the_example_trains_and_prints_the_calibration_of_each_epoch():
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(root / "examples" / "lightning_digits.py"), "--epochs", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.findall(r"^\| (\d) \| 0\.\d{3} \| \d+\.\d{3} \| 0\.\d{3} \|$", result.stdout, re.M) == ["1", "2"]
    assert re.search(r"^test: accuracy 0\.\d{3}, NLL \d+\.\d{3}, ECE 0\.\d{3}$", result.stdout, re.M)


@pytest.mark.slow  # a fresh interpreter imports torch: about 5 s
def test_import_bayesso_needs_no_lightning_and_bayesso_lightning_names_the_extra():
    code = (
        "import sys; sys.modules['lightning'] = None\n"  # as if it were not installed
        "import bayesso, bayesso.optim, bayesso.predict\n"
        "try:\n    import bayesso.lightning\nexcept ImportError as error:\n    print(error)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        "bayesso.lightning needs PyTorch Lightning: pip install 'bayesso[lightning]' (or lightning>=2.2)"
    )
