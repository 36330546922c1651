"""Bayes by Backprop (Pyro, ``fit(method="bbb")``) against VOGN on scikit-learn's digits: accuracy and ELBO
against epochs and against wall time, all measured in one run.

The same small CNN (``bayesso.demo.small_cnn``, 10 classes), the same 70/30 split, loader and seed per run, the
model's prior N(0, I) and τ = 1. BBB and VOGN run at their defaults except a constant lr (``schedule=None``:
the run is extended one epoch at a time from its checkpoint, resumed exactly, which a cosine over a growing
run would not be); a third run is VOGN with β2 = 0.99, whose statistic forgets its initial precision
h0 = 0.5 within a few hundred steps (β2 = 0.999 keeps 0.999^t of it: 55% after 600 steps). After every
epoch each posterior is scored the same way: test accuracy of ``predict(method="mc")`` with --samples
samples, and the negative ELBO per training example, −ELBO/N = E_q[ℓ̄] + KL(q ‖ p)/N, with E_q[ℓ̄] the mean
training NLL over --samples weight samples and the KL in closed form (``kl_to_prior``). Wall time is the
training time only (the ``fit`` calls, resumption included), summed over epochs, after an untimed one-epoch
run of each method (one-time imports).

Run: python benchmarks/bbb_vs_vogn.py [--seeds 3 --epochs 30 --samples 16] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.demo import small_cnn

METHODS = {  # key: (label, fit's method, its options)
    "bbb": ("BBB", "bbb", {}),
    "vogn": ("VOGN", "vogn", {}),
    "vogn_099": ("VOGN β2=0.99", "vogn", {"betas": (0.9, 0.99)}),
}
REPORTED_EPOCHS = (1, 2, 3, 5, 10, 15, 20, 30, 50)


def negative_elbo(model: BayesianModel, x: torch.Tensor, y: torch.Tensor, samples: int, seed: int) -> float:
    """−ELBO / N = E_q[mean NLL] + τ KL(q ‖ p) / N, the expectation over ``samples`` weight samples (eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    model.module.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(samples):
            with model.sample_parameters(generator):
                total += float(nn.functional.cross_entropy(model.module(x), y))
        kl = float(model.posterior.kl_to_prior())
    model.module.train()
    return total / samples + model.posterior.temperature * kl / len(y)


def one_run(key: str, seed: int, epochs: int, samples: int, folder: Path) -> list[dict]:
    """Per-epoch records (epoch, seconds, accuracy, neg_elbo) of one entry of ``METHODS`` and seed."""
    _, method, options = METHODS[key]
    data = load_digits(test_fraction=0.3, seed=seed)
    loader = make_loader(data.x_train, data.y_train, 64, seed=seed)
    torch.manual_seed(seed)
    model = BayesianModel(small_cnn(10), "classification")
    records, seconds = [], 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.fit(loader, method, epochs=epoch, progress=False, schedule=None, seed=seed,
                  checkpoint=folder / f"{key}-{seed}.pt", **options)  # fmt: skip
        seconds += time.perf_counter() - start
        probs = model.predict(data.x_test, n_samples=samples, method="mc", generator=torch.Generator().manual_seed(0))
        accuracy = float((probs.probs.argmax(-1) == data.y_test).float().mean())
        elbo = negative_elbo(model, data.x_train, data.y_train, samples, seed)
        records.append({"epoch": epoch, "seconds": seconds, "accuracy": accuracy, "neg_elbo": elbo})
    return records


def _mean(runs: list[list[dict]], index: int, key: str) -> float:
    return statistics.fmean(run[index][key] for run in runs)


def by_epoch(results: dict[str, list[list[dict]]], epochs: int) -> str:
    """Markdown: test accuracy, −ELBO/N and training seconds per method at some epochs (means over seeds)."""
    header = " | ".join(f"{METHODS[m][0]} acc (%) | −ELBO/N | s" for m in results)
    lines = [f"| epoch | {header} |", "|---:|" + "---:|---:|---:|" * len(results)]
    for epoch in [e for e in REPORTED_EPOCHS if e <= epochs]:
        cells = []
        for runs in results.values():
            cells += [f"{100 * _mean(runs, epoch - 1, 'accuracy'):.1f}", f"{_mean(runs, epoch - 1, 'neg_elbo'):.3f}",
                      f"{_mean(runs, epoch - 1, 'seconds'):.1f}"]  # fmt: skip
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_time(results: dict[str, list[list[dict]]]) -> str:
    """Markdown: per method, the last epoch finished within each wall-time budget and its scores (seed means)."""
    longest = max(_mean(runs, -1, "seconds") for runs in results.values())
    budgets = [b for b in (1, 2, 5, 10, 20, 40, 80, 160) if b < longest] + [math.ceil(10 * longest) / 10]
    header = " | ".join(f"{METHODS[m][0]} epochs | acc (%) | −ELBO/N" for m in results)
    lines = [f"| budget (s) | {header} |", "|---:|" + "---:|---:|---:|" * len(results)]
    for budget in budgets:
        cells = []
        for runs in results.values():
            done = [i for i in range(len(runs[0])) if _mean(runs, i, "seconds") <= budget]
            if not done:
                cells += ["0", "–", "–"]
                continue
            i = done[-1]
            cells += [str(i + 1), f"{100 * _mean(runs, i, 'accuracy'):.1f}", f"{_mean(runs, i, 'neg_elbo'):.3f}"]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 4 samples")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.samples = 1, 3, 4
    torch.set_num_threads(args.threads)
    results: dict[str, list[list[dict]]] = {key: [] for key in METHODS}
    with tempfile.TemporaryDirectory() as folder:  # untimed: torch's first optimizer imports its compiler stack
        for key in METHODS:
            one_run(key, 0, 1, 1, Path(folder))
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            for key in METHODS:  # alternating, so that load on the machine hits all alike
                results[key].append(one_run(key, seed, args.epochs, args.samples, Path(folder)))
    print(f"digits, small CNN (10 classes), {args.seeds} seed(s), {args.samples} samples, "
          f"{torch.get_num_threads()} thread(s); means over seeds\n")  # fmt: skip
    print("Against epochs\n\n" + by_epoch(results, args.epochs) + "\n")
    print("Against wall time (the last epoch finished within the budget)\n\n" + by_time(results))


if __name__ == "__main__":
    main()
