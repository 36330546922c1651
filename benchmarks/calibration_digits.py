"""Calibration of natural-gradient VI vs Adam on scikit-learn digits.

For an MLP 64-512-512-10 and a small CNN: Adam (MAP) and the presets VOGN, noisy
K-FAC, noisy Adam and IVON with their default hyperparameters, over --seeds seeds.
Every method runs for --epochs epochs at batch 64; the VI methods use prior precision
--prior and temperature --temperature (default 1 and 1, the model's defaults) and the presets'
defaults. ``benchmarks/suite.py`` covers the same digits tasks and 6 more.
Accuracy, NLL, ECE (15 bins) and Brier on the 10-class 80/20 split; OOD AUROC
(score = max probability) for models trained on digits 0-4 against digits 5-9.
Bayesian methods predict with --samples MC samples. Prints mean ± std per metric.
Run: python benchmarks/calibration_digits.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from models import cnn, mlp

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.predict.metrics import accuracy, auroc, brier, ece, nll
from bayesso.progress import track

METHODS = {  # method: (posterior, options for BayesianModel.fit beyond the preset defaults)
    "adam": (None, {}),
    "vogn": ("diag", {}),
    "noisy_kfac": ("kron", {}),
    "noisy_adam": ("diag", {}),
    "ivon": ("diag", {}),
}
MODELS = {"mlp": (mlp, True), "cnn": (cnn, False)}  # builder, flatten inputs


def build(model_name: str, n_classes: int) -> nn.Module:
    module = MODELS[model_name][0]()
    last = module[-1]
    if last.out_features != n_classes:
        module[-1] = nn.Linear(last.in_features, n_classes)
    return module


def train_and_predict(method: str, model_name: str, data, seed: int, args):
    """Probabilities on the test set (and on the OOD set when present)."""
    torch.manual_seed(seed)
    module = build(model_name, data.n_classes)
    loader = make_loader(data.x_train, data.y_train, batch_size=64, seed=seed)
    if method == "adam":
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        for _ in track(range(args.epochs), "adam epochs", not args.quiet):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(module(x), y).backward()
                optimizer.step()
        module.eval()
        with torch.no_grad():
            predict = lambda x: torch.softmax(module(x), -1)  # noqa: E731
            return predict(data.x_test), None if data.x_ood is None else predict(data.x_ood)
    structure, options = METHODS[method]
    model = BayesianModel(
        module, "classification", posterior=structure, prior_precision=args.prior, temperature=args.temperature
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(loader, method=method, epochs=args.epochs, progress=not args.quiet, seed=seed, **options)
    generator = torch.Generator().manual_seed(seed)
    test = model.predict(data.x_test, n_samples=args.samples, generator=generator).probs
    ood = None if data.x_ood is None else model.predict(data.x_ood, n_samples=args.samples, generator=generator).probs
    return test, ood


def run(model_name: str, method: str, seed: int, args) -> dict:
    flatten = MODELS[model_name][1]
    start = time.perf_counter()
    full = load_digits(test_fraction=0.2, flatten=flatten, seed=seed)
    probs, _ = train_and_predict(method, model_name, full, seed, args)
    half = load_digits(test_fraction=0.2, flatten=flatten, seed=seed, in_classes=range(5))
    probs_in, probs_out = train_and_predict(method, model_name, half, seed, args)
    return {
        "accuracy": 100 * accuracy(probs, full.y_test),
        "nll": nll(probs, full.y_test),
        "ece": 100 * ece(probs, full.y_test),
        "brier": brier(probs, full.y_test),
        "ood_auroc": 100 * auroc(probs_in.max(1).values, probs_out.max(1).values),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=32, help="MC samples for prediction")
    parser.add_argument("--prior", type=float, default=1.0, help="prior precision δ of the VI methods")
    parser.add_argument("--temperature", type=float, default=1.0, help="posterior temperature τ of the VI methods")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 5
    metrics = ["accuracy", "nll", "ece", "brier", "ood_auroc", "seconds"]
    print(
        f"digits, 80/20 split, {args.epochs} epochs, batch 64, {args.seeds} seeds, {args.samples} MC samples; "
        f"VI: prior precision {args.prior}, temperature {args.temperature}, presets' defaults\n"
    )
    results = {}
    for model_name in args.models.split(","):
        print(f"## {model_name}\n")
        print("| method | accuracy (%) | NLL | ECE (%) | Brier | OOD AUROC (%) | time (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for method in args.methods.split(","):
            runs = [run(model_name, method, seed, args) for seed in range(args.seeds)]
            results[f"{model_name}/{method}"] = runs
            cells = []
            for metric in metrics:
                values = [r[metric] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                digits = 3 if metric in ("nll", "brier") else 1 if metric != "seconds" else 0
                cells.append(f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}")
            print(f"| {method} | " + " | ".join(cells) + " |")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
