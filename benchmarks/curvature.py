"""Cost of one CurvatureEngine.compute() per kind x structure, relative to one forward + backward.

For each model (MLP 64-512-512-10, small CNN, wider CNN on 1x8x8 digits, batch
128) every case runs in a fresh subprocess, so its peak memory (growth of the
process's maximum resident set, measured on the first full-batch run after a
2-example warm-up) is its own. In that subprocess the case and a plain forward + backward (mean
cross-entropy, ``loss.backward()``) of the same batch are then timed alternately
--repeats times; the ratio is of their medians. Run: python benchmarks/curvature.py
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

sys.path.insert(0, str(Path(__file__).parent))
from isolated import peak_rss_mib, run_isolated
from models import MODELS

from bayesso.curvature import CurvatureEngine
from bayesso.data import load_digits

STRUCTURES = ("diag", "kron", "kron-reduce", "full")
CASES = [("forward+backward", "")] + [
    (kind, structure)
    for kind in ("ggn", "fisher_mc", "fisher_emp", "hessian")
    for structure in STRUCTURES
    if not (kind == "hessian" and structure.startswith("kron"))
]


def worker(model_name: str, kind: str, structure: str, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = load_digits()
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]

    def forward_backward(x=x, y=y):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    run = forward_backward
    if kind != "forward+backward":
        approx = "reduce" if structure == "kron-reduce" else "expand"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = CurvatureEngine(model, "classification", kind, structure[:4], kfac_approx=approx)
        except ValueError as error:
            return {"refused": str(error).split(":")[1].split(",")[0].strip()}
        generator = torch.Generator().manual_seed(0)

        def run(x=x, y=y):
            engine.compute(x, y, generator=generator)

    run(x[:2], y[:2])  # one-time initialisation (about 40 MiB of libraries) is not the case's memory
    before = peak_rss_mib()
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    peak = peak_rss_mib() - before
    forward_backward()
    times, baseline = [], []
    for _ in range(repeats if first < 2 else 1):
        for timings, fn in ((times, run), (baseline, forward_backward)):
            start = time.perf_counter()
            fn()
            timings.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "ratio": seconds / statistics.median(baseline), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "KIND", "STRUCTURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_size, args.repeats)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}\n")
    for model_name in args.models.split(","):
        n_params = sum(p.numel() for p in MODELS[model_name]().parameters())
        print(f"## {model_name} ({n_params:,} parameters)\n")
        print("| kind | structure | time (ms) | time / (fwd+bwd) | peak memory (MiB) |")
        print("|---|---|---:|---:|---:|")
        for kind, structure in CASES:
            options = ("--batch-size", str(args.batch_size), "--repeats", str(args.repeats))
            result = run_isolated(__file__, model_name, kind, structure or "-", *options)
            if "refused" in result:
                print(f"| {kind} | {structure} | refused: {result['refused']} | | |")
                continue
            seconds, ratio, peak = result["seconds"], result["ratio"], result["peak_mib"]
            print(f"| {kind} | {structure} | {1e3 * seconds:.1f} | {ratio:.2f} | {peak:.1f} |")
        print()


if __name__ == "__main__":
    main()
