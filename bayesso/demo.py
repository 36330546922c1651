"""``bayesso demo``: a calibration study on scikit-learn's bundled digits.

A small CNN is trained on digits 0-4 seven ways: Adam (the MAP baseline), Adam with
temperature scaling fitted on a held-out validation split, VOGN and IVON (diagonal
posteriors), noisy K-FAC (Kronecker posterior) and Bayes by Backprop (Pyro's AutoNormal, when
Pyro is installed) at their defaults, and post-hoc Laplace on the Adam network (the README's
recipe: last-layer Kronecker GGN, prior precision by validation NLL); the Bayesian ones
predict with Monte Carlo over weight samples. Every method is scored on the same test images
(accuracy, NLL, ECE, Brier) and on digits 5-9 as out-of-distribution inputs (AUROC of the
maximum probability). ``compare_with_adam`` says where each method is better or worse than
Adam. ``write_report`` writes report.md, metrics.json and reliability diagrams.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bayesso.data import Split, load_digits, make_loader
from bayesso.model import BayesianModel
from bayesso.predict.metrics import classification_metrics
from bayesso.predict.temperature import TemperatureScaling
from bayesso.progress import progress_bar, track

__all__ = ["DemoConfig", "MethodResult", "Study", "compare_with_adam", "format_table", "run_demo", "small_cnn"]

IN_CLASSES = range(5)


@dataclass
class DemoConfig:
    """The study's settings; every method runs at its defaults (VI: prior precision 1, temperature 1).

    Every method trains for ``epochs`` epochs at batch ``batch_size`` with its optimizer's default
    learning rate (Adam: PyTorch's 1e-3), on the same images, for ``seeds`` seeds 0, 1, ...
    """

    epochs: int = 30
    samples: int = 32
    seeds: int = 3
    batch_size: int = 64
    test_fraction: float = 0.5
    validation_fraction: float = 0.25
    adam_lr: float = 1e-3
    width: int = 16


@dataclass
class MethodResult:
    """One method across seeds: per-seed metrics (with "seconds"), and the first seed's predictions."""

    name: str
    key: str
    runs: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    probs: Tensor | None = field(default=None, repr=False)
    ood_probs: Tensor | None = field(default=None, repr=False)

    def mean(self, metric: str) -> float:
        return statistics.fmean(run[metric] for run in self.runs)

    def std(self, metric: str) -> float:
        return statistics.stdev(run[metric] for run in self.runs) if len(self.runs) > 1 else 0.0


@dataclass
class Study:
    """Everything the demo measured: its settings, the first seed's test labels, one result per method."""

    config: DemoConfig
    targets: Tensor = field(repr=False)
    methods: list[MethodResult]


def small_cnn(n_classes: int = 10, width: int = 16) -> nn.Module:
    """Conv ``width``, pool, conv 2·``width``, pool, linear, for 1 x 8 x 8 inputs (6,090 parameters at the defaults)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 2 * 2, n_classes),
    )  # fmt: skip


def split_validation(data: Split, fraction: float, seed: int) -> tuple[Split, Tensor, Tensor]:
    """``data`` with the last ``fraction`` of a seeded permutation of its training set held out as validation."""
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(order)))
    train, val = order[n_val:], order[:n_val]
    kept = Split(data.x_train[train], data.y_train[train], data.x_test, data.y_test, data.x_ood, data.y_ood)
    return kept, data.x_train[val], data.y_train[val]


def _train_adam(module: nn.Module, loader, config: DemoConfig, progress: bool) -> None:
    optimizer = torch.optim.Adam(module.parameters(), lr=config.adam_lr)
    module.train()
    for epoch in range(config.epochs):
        with progress_bar(len(loader), f"adam {epoch + 1}/{config.epochs}", progress) as bar:
            for x, y in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(module(x), y)
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                bar.update()
    module.eval()


FITTED = {"vogn": "diag", "noisy_kfac": "kron", "ivon": "diag", "bbb": "diag"}  # BayesianModel.fit's, by posterior
METHODS = [
    ("Adam (MAP)", "adam"),
    ("Adam + temperature scaling", "adam_temperature"),
    ("VOGN", "vogn"),
    ("noisy K-FAC", "noisy_kfac"),
    ("IVON", "ivon"),
    *([("Bayes by Backprop (Pyro)", "bbb")] if importlib.util.find_spec("pyro") else []),
    ("Laplace (last layer)", "laplace"),
]
COMPARED = [("accuracy", "accuracy", 1), ("nll", "NLL", -1), ("ece", "ECE", -1), ("auroc", "OOD AUROC", 1)]


def run_demo(config: DemoConfig, progress: bool = True) -> Study:
    """Train and score every method of ``METHODS`` for each seed."""
    methods = {key: MethodResult(name, key) for name, key in METHODS}
    targets = None
    for seed in track(range(config.seeds), "seeds", progress and config.seeds > 1):
        data = load_digits(test_fraction=config.test_fraction, in_classes=IN_CLASSES, seed=seed)
        data, x_val, y_val = split_validation(data, config.validation_fraction, seed)
        targets = data.y_test if targets is None else targets
        for key, (probs, ood_probs, seconds, note) in _one_seed(config, seed, data, x_val, y_val, progress).items():
            result = methods[key]
            result.runs.append({**classification_metrics(probs, data.y_test, ood_probs), "seconds": seconds})
            result.notes.append(note)
            if result.probs is None:
                result.probs, result.ood_probs = probs, ood_probs
    return Study(config, targets, list(methods.values()))


def _one_seed(config: DemoConfig, seed: int, data: Split, x_val: Tensor, y_val: Tensor, progress: bool) -> dict:
    """{method key: (test probs, OOD probs, seconds, note)} for one seed; times include prediction."""
    loader = make_loader(data.x_train, data.y_train, config.batch_size, seed=seed)
    out = {}
    torch.manual_seed(seed)
    net = small_cnn(len(IN_CLASSES), config.width)
    start = time.perf_counter()
    _train_adam(net, loader, config, progress)
    with torch.no_grad():
        logits, ood_logits = net(data.x_test), net(data.x_ood)
    adam_seconds = time.perf_counter() - start
    out["adam"] = (torch.softmax(logits, -1), torch.softmax(ood_logits, -1), adam_seconds, "")

    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # T at a bound: the report says so instead of the console
        scaler = TemperatureScaling().fit(net(x_val), y_val)
    seconds = adam_seconds + time.perf_counter() - start
    reading = "underconfident" if scaler.temperature < 1 else "overconfident"
    note = f"T = {scaler.temperature:.3g} fitted on {len(y_val)} validation images (the MAP net was {reading})"
    note += "".join(f"; {warning.message}" for warning in caught)
    out["adam_temperature"] = (scaler.probs(logits), scaler.probs(ood_logits), seconds, note)

    start = time.perf_counter()
    laplace = BayesianModel(net, "classification", posterior="kron")
    laplace.fit_laplace(loader, modules="last_layer", progress=progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = laplace.optimize_prior_precision("grid", val_loader=[(x_val, y_val)], predictive="probit",
                                                 grid=torch.logspace(-2, 4, 13), progress=progress)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    probs = laplace.predict(data.x_test, n_samples=config.samples, generator=generator).probs
    ood_probs = laplace.predict(data.x_ood, n_samples=config.samples, generator=generator).probs
    note = f"δ = {float(tuned['prior_precision'][0]):.3g} by validation NLL"
    note += "".join(f"; {warning.message}" for warning in caught)
    out["laplace"] = (probs, ood_probs, adam_seconds + time.perf_counter() - start, note)

    for key in [key for _, key in METHODS if key in FITTED]:
        torch.manual_seed(seed)
        model = BayesianModel(small_cnn(len(IN_CLASSES), config.width), "classification", posterior=FITTED[key])
        start = time.perf_counter()
        model.fit(loader, method=key, epochs=config.epochs, progress=progress, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        probs = model.predict(data.x_test, n_samples=config.samples, generator=generator).probs
        ood_probs = model.predict(data.x_ood, n_samples=config.samples, generator=generator).probs
        seconds = time.perf_counter() - start
        out[key] = (probs, ood_probs, seconds, "")
    return {key: out[key] for _, key in METHODS}


def compare_with_adam(results: list[MethodResult]) -> list[str]:
    """One sentence per method: the metrics (means over seeds) where it beats Adam and where it does not."""
    adam = results[0]
    lines = []
    for r in results[1:]:
        better, worse = [], []
        for metric, title, sign in COMPARED:
            ours, theirs = f"{r.mean(metric):.3g}", f"{adam.mean(metric):.3g}"  # equal as printed: not better
            wins = ours != theirs and sign * (r.mean(metric) - adam.mean(metric)) > 0
            (better if wins else worse).append(f"{title} {ours} vs {theirs}")
        verdict = f"better than Adam in {', '.join(better)}" if better else "better than Adam in nothing measured"
        lines.append(f"{r.name}: {verdict}" + (f"; not better in {', '.join(worse)}" if worse else "") + ".")
    return lines


def format_table(results: list[MethodResult]) -> str:
    """The study's results as a Markdown table: mean ± standard deviation over seeds."""
    columns = [("accuracy", 100, 1), ("nll", 1, 3), ("ece", 100, 2), ("brier", 1, 3), ("auroc", 100, 1),
               ("seconds", 1, 1)]  # fmt: skip
    lines = [
        "| method | accuracy (%) | NLL | ECE (%) | Brier | OOD AUROC (%) | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = []
        for metric, scale, digits in columns:
            cell = f"{scale * r.mean(metric):.{digits}f}"
            cells.append(cell + (f" ± {scale * r.std(metric):.{digits}f}" if len(r.runs) > 1 else ""))
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
