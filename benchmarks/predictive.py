"""Time and peak memory of the predictives: MC (looped and vectorised), linearized and probit.

For the MLP 64-512-512-10 and the two CNNs of benchmarks/models.py on 512 test digits,
with diagonal and Kronecker posteriors (and full blocks for the small CNN) whose
statistic is the GGN of 128 training images (prior precision 50, temperature 0.01):
``predict`` with 32 samples for "mc" (CPU default: a loop of forwards with the sample
written into the module), "mc" with ``vectorize=True`` (vmapped forwards over chunks of
samples), "linearized" (32 output draws) and "probit". Times are medians of 3 runs after
a warm-up, in ms and as ratios to one plain forward of the batch (MC's floor is 32x).
Each (model, posterior, method) runs in a fresh subprocess; the peak is the growth of
its maximum resident set during the first call. Run: python benchmarks/predictive.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from isolated import peak_rss_mib, run_isolated
from models import MODELS

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.data import load_digits

METHODS = ["forward", "mc", "mc_vmap", "linearized", "probit"]
CASES = [("mlp", "diag"), ("mlp", "kron"), ("cnn", "diag"), ("cnn", "kron"), ("cnn", "full"),
         ("wide_cnn", "diag"), ("wide_cnn", "kron")]  # fmt: skip
SAMPLES = 32


def build(model_name: str, structure: str):
    torch.manual_seed(0)
    data = load_digits(test_fraction=0.3, flatten=model_name == "mlp", seed=0)
    module = MODELS[model_name]()
    model = BayesianModel(module, "classification", structure, prior_precision=50.0, temperature=0.01,
                          dataset_size=len(data.x_train))  # fmt: skip
    engine = CurvatureEngine(module, "classification", "ggn", structure)
    curvature = engine.compute(data.x_train[:128], data.y_train[:128])
    model.posterior.update_statistic(curvature * (1 / 128))
    module.eval()
    return model, data.x_test[:512]


def call(model: BayesianModel, x: torch.Tensor, method: str):
    if method == "forward":
        with torch.no_grad():
            return model.module(x)
    generator = torch.Generator().manual_seed(0)
    if method == "mc_vmap":
        return model.predict(x, n_samples=SAMPLES, generator=generator, vectorize=True)
    return model.predict(x, n_samples=SAMPLES, method=method, generator=generator)


def worker(model_name: str, structure: str, method: str) -> dict:
    torch.set_num_threads(2)
    model, x = build(model_name, structure)
    call(model, x[:2], method)  # library initialisation
    before = peak_rss_mib()
    call(model, x, method)
    peak = peak_rss_mib() - before
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call(model, x, method)
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "STRUCTURE", "METHOD"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    print(f"512 test digits, {SAMPLES} samples, 2 threads; ms (ratio to one forward) and peak MiB\n")
    print("| model | posterior | forward (ms) | MC (loop) | MC (vmap) | linearized | probit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model_name, structure in CASES:
        result = {m: run_isolated(__file__, model_name, structure, m) for m in METHODS}
        base = result["forward"]["ms"]
        cells = [f"{result['forward']['ms']:.2f}"]
        for method in METHODS[1:]:
            r = result[method]
            cells.append(f"{r['ms']:.1f} ({r['ms'] / base:.0f}x), {r['peak_mib']:.0f} MiB")
        print(f"| {model_name} | {structure} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
