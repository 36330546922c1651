"""Post-hoc Laplace: fit time and peak memory per structure, and predictive quality on digits.

Part 1: the GGN Laplace fit (one pass over the 1,257 training digits of a 70/30 split,
batch 128) for the MLP 64-512-512-10 and the two CNNs of benchmarks/models.py, diag /
kron / full over all weights and over the last layer, each in a fresh subprocess: total
time, time per data point, and peak memory (growth of the maximum resident set).
Part 2: a CNN trained to its MAP under the prior N(0, I) with Adam (lr 3e-3, L2 weight decay
1/N on the mean loss, 50 epochs) on digits 0-4, then
Laplace (kron and diag over all weights, kron over the last layer) with the prior
precision tuned by the marginal likelihood, predicting with MC (32 samples), the
linearized GLM (32 output draws) and probit: accuracy, NLL, ECE (15 bins) and OOD
AUROC (max probability, digits 5-9), mean over --seeds seeds.
Run: python benchmarks/laplace.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from isolated import peak_rss_mib, run_isolated
from models import MODELS

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.predict.metrics import classification_metrics
from bayesso.progress import track

FIT_CASES = [(m, s, scope) for m in MODELS for scope in ("all", "last_layer") for s in ("diag", "kron", "full")]


def fit_worker(model_name: str, structure: str, scope: str) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_digits(test_fraction=0.3, flatten=model_name == "mlp", seed=0)
    module = MODELS[model_name]()
    model = BayesianModel(module, "classification", "diag", prior_precision=1.0)
    loader = make_loader(data.x_train, data.y_train, 128, shuffle=False)
    modules = "last_layer" if scope == "last_layer" else None
    try:  # the first call initialises the library; a refused dense block is refused here, before allocating
        model.fit_laplace([(data.x_train[:2], data.y_train[:2])], structure=structure, modules=modules, progress=False)
    except ValueError as error:
        return {"refused": "needs " + str(error).split("needs ")[-1].split(", above")[0]}
    before = peak_rss_mib()
    start = time.perf_counter()
    posterior = model.fit_laplace(loader, structure=structure, modules=modules, progress=False)
    model.log_marginal_likelihood()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ms_per_example": 1000 * seconds / len(data.y_train),
            "peak_mib": peak_rss_mib() - before, "parameters": posterior.numel}  # fmt: skip


def train_map(seed: int, data, epochs: int, progress: bool) -> nn.Module:
    torch.manual_seed(seed)
    module = MODELS["cnn"]()
    module[-1] = nn.Linear(module[-1].in_features, 5)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3, weight_decay=1 / len(data.y_train))
    for _ in track(range(epochs), "adam epochs", progress):
        for x, y in make_loader(data.x_train, data.y_train, 64, seed=seed):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
    return module.eval()


def quality(seed: int, epochs: int, progress: bool) -> dict[str, dict]:
    data = load_digits(test_fraction=0.3, in_classes=range(5), seed=seed)
    module = train_map(seed, data, epochs, progress)
    with torch.no_grad():
        rows = {"MAP": classification_metrics(torch.softmax(module(data.x_test), -1), data.y_test,
                                              torch.softmax(module(data.x_ood), -1))}  # fmt: skip
    loader = make_loader(data.x_train, data.y_train, 128, shuffle=False)
    for label, structure, modules in [("kron", "kron", None), ("diag", "diag", None),
                                      ("kron, last layer", "kron", "last_layer")]:  # fmt: skip
        model = BayesianModel(module, "classification", structure, prior_precision=1.0)
        model.fit_laplace(loader, structure=structure, modules=modules, progress=progress)
        delta = model.optimize_prior_precision(progress=progress)["prior_precision"][0].item()
        for method in ("mc", "linearized", "probit"):
            generator = torch.Generator().manual_seed(seed)
            test = model.predict(data.x_test, 32, method=method, generator=generator).probs
            ood = model.predict(data.x_ood, 32, method=method, generator=generator).probs
            rows[f"Laplace {label}, {method}"] = {**classification_metrics(test, data.y_test, ood), "delta": delta}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs, part 2 only")
    parser.add_argument("--no-fit", action="store_true", help="part 2 only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(fit_worker(*args.worker)))
        return
    torch.set_num_threads(2)
    if args.quick:
        args.seeds, args.epochs = 1, 10
    if not (args.quick or args.no_fit):
        print("## GGN Laplace fit over 1,257 training digits (batch 128, 2 threads)\n")
        print("| model | scope | structure | parameters | fit (s) | per data point (ms) | peak (MiB) |")
        print("|---|---|---|---:|---:|---:|---:|")
        for model_name, structure, scope in FIT_CASES:
            r = run_isolated(__file__, model_name, structure, scope)
            if "refused" in r:
                print(f"| {model_name} | {scope} | {structure} | | refused: {r['refused']} | | |")
                continue
            print(f"| {model_name} | {scope} | {structure} | {r['parameters']:,} | {r['seconds']:.2f} | "
                  f"{r['ms_per_example']:.3f} | {r['peak_mib']:.0f} |")  # fmt: skip
    runs = [quality(seed, args.epochs, not args.quiet) for seed in track(range(args.seeds), "seeds", not args.quiet)]
    print(f"\n## CNN on digits 0-4, MAP by Adam ({args.epochs} epochs), prior precision by marglik; "
          f"mean over {args.seeds} seeds\n")  # fmt: skip
    print("| method | accuracy (%) | NLL | ECE (%) | OOD AUROC (%) | δ |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs[0]:
        mean = {k: statistics.fmean(run[name].get(k, float("nan")) for run in runs) for k in runs[0][name]}
        delta = f"{mean['delta']:.3g}" if "delta" in mean else ""
        print(f"| {name} | {100 * mean['accuracy']:.1f} | {mean['nll']:.4f} | {100 * mean['ece']:.2f} | "
              f"{100 * mean['auroc']:.1f} | {delta} |")  # fmt: skip


if __name__ == "__main__":
    main()
