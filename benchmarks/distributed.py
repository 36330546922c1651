"""MC-sample parallelism on this machine: samples per second with 1 and 2 processes, bytes per step.

VOGN on digits (batch 64, the small-data recipe) for the small CNN and the MLP of
benchmarks/models.py with diagonal and Kronecker posteriors (full blocks would spend the time in eigh).
One process draws 2 weight samples per step (with 1 and with 2 threads); two gloo
processes (torch.multiprocessing, 1 thread each) form 2 MC groups of 1 sample each, so a
step costs one sample's work per process. Reported: weight samples per second (median
of 3 timings of --steps steps after 3 warm-up steps), the 2-process speed-up over the
best single process, and the payload all-reduced per step (gradient, loss, curvature).
Run: python benchmarks/distributed.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from models import MODELS

from bayesso import BayesianModel
from bayesso.data import load_digits
from bayesso.distributed import ProcessGrid, finish
from bayesso.optim import VOGN

CASES = [("cnn", "diag"), ("cnn", "kron"), ("mlp", "diag"), ("mlp", "kron")]


def run(model_name: str, structure: str, mc_samples: int, steps: int, grid: ProcessGrid | None) -> dict:
    torch.manual_seed(0)
    data = load_digits(test_fraction=0.3, flatten=model_name == "mlp", seed=0)
    module = MODELS[model_name]()
    model = BayesianModel(module, "classification", structure, prior_precision=50.0, temperature=0.01,
                          dataset_size=len(data.y_train))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = VOGN(model, mc_samples=mc_samples, grid=grid)
    x, y = data.x_train[:64], data.y_train[:64]

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    before = grid.bytes_communicated if grid else 0
    times = []
    for _ in range(3):
        if grid:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step(closure)
        times.append(time.perf_counter() - start)
    sent = (grid.bytes_communicated - before) / (3 * steps) if grid else 0
    samples = mc_samples * (grid.mc_groups if grid else 1)
    return {"samples_per_second": samples * steps / statistics.median(times), "bytes_per_step": sent}


def _worker(rank: int, rendezvous: str, model_name: str, structure: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    result = run(model_name, structure, 1, steps, ProcessGrid(rank, 2, mc_groups=2))
    if rank == 0:
        torch.save(result, out)
    finish()


def two_processes(model_name: str, structure: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.pt")
        mp.spawn(_worker, args=(os.path.join(folder, "rendezvous"), model_name, structure, steps, out), nprocs=2)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print("| model | posterior | 1 process, 1 thread (samples/s) | 1 process, 2 threads | 2 processes x 1 thread "
          "| speed-up | all-reduced per step |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for model_name, structure in CASES:
        single = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            single[threads] = run(model_name, structure, 2, args.steps, None)["samples_per_second"]
        double = two_processes(model_name, structure, args.steps)
        speedup = double["samples_per_second"] / max(single.values())
        print(f"| {model_name} | {structure} | {single[1]:.0f} | {single[2]:.0f} | {double['samples_per_second']:.0f} "
              f"| {speedup:.2f}x | {double['bytes_per_step'] / 1024:.1f} KiB |")  # fmt: skip


if __name__ == "__main__":
    main()
