"""Resident memory over long runs: does anything grow per step?

For a model whose modules all have curvature rules (MLP 64-128-10) and one with modules
that go through the generic torch.func fallback (PReLU and multi-head attention over the
8 rows of an 8x8 digit), each workload runs in a fresh subprocess on digits (batch 64):
2,000 steps of each VI preset and of ``SecondOrderOptimizer``, 1,000 MC predictions
(8 samples, 128 images) and 200 Laplace fits (diagonal GGN over 256 images). Resident
memory (/proc/self/statm) is read after a warm-up of a tenth of the iterations and at the
end; the table gives the growth in between, per 1,000 iterations. Flat means within a
few MiB of allocator noise. Run: python benchmarks/soak.py [--scale 0.1 for a quick look]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from isolated import run_isolated

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.optim import PRESETS, SecondOrderOptimizer

WORKLOADS = {"vogn": 2000, "noisy_adam": 2000, "noisy_kfac": 2000, "ivon": 2000, "second_order": 2000,
             "predict": 1000, "laplace": 200}  # fmt: skip


class RowAttention(nn.Module):
    """An 8x8 image as 8 tokens of 8 pixels: attention, PReLU, mean over tokens, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act = nn.PReLU()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        tokens = x.reshape(-1, 8, 8)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(self.act(tokens + attended).mean(dim=1))


MODELS = {
    "rules (MLP)": lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
    "fallback (attention, PReLU)": RowAttention,
}


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(model_name: str, workload: str, iterations: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    data = load_digits(flatten=True)
    module = MODELS[model_name]()
    batches = list(make_loader(data.x_train, data.y_train, 64, seed=0))
    structure = "kron" if workload in ("noisy_kfac", "second_order") else "diag"
    model = BayesianModel(module, "classification", structure, prior_precision=50.0, temperature=0.01,
                          dataset_size=len(data.x_train))  # fmt: skip
    step = _workload(workload, model, batches, data)
    readings = []
    for i in range(iterations):
        step(i)
        if i + 1 in (max(1, iterations // 10), iterations):
            readings.append(resident_mib())
    return {"warm": readings[0], "end": readings[-1]}


def _workload(workload: str, model: BayesianModel, batches, data):
    module = model.module
    if workload == "predict":
        x = data.x_test[:128]
        return lambda i: model.predict(x, n_samples=8, generator=torch.Generator().manual_seed(i))
    if workload == "laplace":
        loader = make_loader(data.x_train[:256], data.y_train[:256], 64, shuffle=False)
        return lambda i: model.fit_laplace(loader, progress=False)
    if workload == "second_order":
        optimizer = SecondOrderOptimizer(module, "classification", lr=0.05)
    else:
        optimizer = PRESETS[workload](model)

    def step(i):
        x, y = batches[i % len(batches)]

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the iterations to run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_name, workload, iterations = args.rest
        print(json.dumps(worker(model_name, workload, int(iterations))))
        return
    print("| model | workload | iterations | MiB after warm-up | MiB at end | growth (MiB) | per 1,000 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model_name in MODELS:
        for workload, iterations in WORKLOADS.items():
            iterations = max(10, round(iterations * args.scale))
            result = run_isolated(__file__, model_name, workload, str(iterations))
            growth = result["end"] - result["warm"]
            per_thousand = growth / (0.9 * iterations) * 1000
            print(f"| {model_name} | {workload} | {iterations:,} | {result['warm']:.0f} | {result['end']:.0f} | "
                  f"{growth:+.1f} | {per_thousand:+.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
