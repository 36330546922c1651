"""Per-step time and peak memory of the VI presets relative to torch.optim.Adam.

For the MLP 64-512-512-10 and the two CNNs of benchmarks/models.py on 8x8 digits
(batch 128, one MC sample per step, noisy K-FAC with its default inverse refresh
every 10 steps, the small-data recipe: prior precision 50, temperature 0.01), each
(model, optimizer) runs in a fresh subprocess. After a 2-example forward + backward
(library initialisation), the growth of the maximum resident set over 5 steps is
the peak memory; then the preset and Adam steps are timed alternately on copies of
the same model, and the ratio is of their medians. Run: python benchmarks/step_time.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from isolated import peak_rss_mib, run_isolated
from models import MODELS

from bayesso import BayesianModel
from bayesso.data import load_digits
from bayesso.optim import PRESETS

OPTIMIZERS = ["adam", "vogn", "noisy_adam", "noisy_kfac", "ivon"]


def make_step(name: str, module: torch.nn.Module, x, y):
    if name == "adam":
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()

        return step
    structure = "kron" if name == "noisy_kfac" else "diag"
    model = BayesianModel(
        module, "classification", posterior=structure, dataset_size=1437, prior_precision=50.0, temperature=0.01
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = PRESETS[name](model)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return loss

    return lambda: optimizer.step(closure)


def worker(model_name: str, name: str, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    module = MODELS[model_name]()
    data = load_digits()
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]
    torch.nn.functional.cross_entropy(module(x[:2]), y[:2]).backward()
    module.zero_grad(set_to_none=True)
    reference = copy.deepcopy(module)
    step = make_step(name, module, x, y)
    before = peak_rss_mib()
    for _ in range(5):
        step()
    peak = peak_rss_mib() - before
    adam = make_step("adam", reference, x, y)
    adam()
    times, baseline = [], []
    for _ in range(repeats):
        for timings, fn in ((times, step), (baseline, adam)):
            start = time.perf_counter()
            fn()
            timings.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"ms": 1e3 * seconds, "ratio": seconds / statistics.median(baseline), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_size, args.repeats)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, 1 MC sample\n")
    for model_name in args.models.split(","):
        n_params = sum(p.numel() for p in MODELS[model_name]().parameters())
        print(f"## {model_name} ({n_params:,} parameters)\n")
        print("| optimizer | step (ms) | time / Adam | peak memory (MiB) | memory / Adam |")
        print("|---|---:|---:|---:|---:|")
        adam_peak = None
        for name in OPTIMIZERS:
            options = ("--batch-size", str(args.batch_size), "--repeats", str(args.repeats))
            result = run_isolated(__file__, model_name, name, *options)
            adam_peak = adam_peak or max(result["peak_mib"], 1e-9)
            memory = result["peak_mib"] / adam_peak
            print(f"| {name} | {result['ms']:.2f} | {result['ratio']:.2f} | {result['peak_mib']:.1f} | {memory:.2f} |")
        print()


if __name__ == "__main__":
    main()
