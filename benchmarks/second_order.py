"""K-FAC (SecondOrderOptimizer) vs SGD with momentum vs Adam on digits, and K-FAC's per-step cost.

Part 1, for the MLP 64-512-512-10 and the small CNN of benchmarks/models.py on the 1,257
training digits: minibatch 128 for up to --epochs epochs, and full batch (all 1,257 images
per step) for up to --full-steps steps. Each optimizer runs with each learning rate of its
grid (the same seed); the table shows the best (fewest steps to the target mean training
NLL --target, evaluated after every step but not timed), its training wall time to the
target, and the test accuracy at the end. K-FAC at SecondOrderOptimizer's defaults (factored
damping 1e-3, β 0.95, momentum 0.9, KL-clip 1e-3): 1-sample MC Fisher with curvature and
inverses every step or every 10 steps (minibatch), the exact GGN every step (full batch).
Part 2: median step time (batch 128, steps timed alternately with SGD on copies of one
model) relative to SGD with momentum, for inverses every step and for curvature and
inverses every 10 steps. Run: python benchmarks/second_order.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from models import MODELS

from bayesso.data import load_digits, make_loader
from bayesso.optim import SecondOrderOptimizer
from bayesso.progress import track

GRIDS = {
    "minibatch": {"sgd": [0.03, 0.1, 0.3], "adam": [3e-4, 1e-3, 3e-3], "kfac": [0.03, 0.1, 0.3],
                  "kfac10": [0.03, 0.1, 0.3]},
    "full batch": {"sgd": [0.1, 0.3, 1.0], "adam": [1e-3, 3e-3, 1e-2], "kfac_ggn": [0.1, 0.3, 1.0]},
}  # fmt: skip
LABELS = {"sgd": "SGD (momentum 0.9)", "adam": "Adam", "kfac": "K-FAC (MC Fisher, intervals 1)",
          "kfac10": "K-FAC (MC Fisher, intervals 10)", "kfac_ggn": "K-FAC (GGN, intervals 1)"}  # fmt: skip
KFAC = {"kfac": {}, "kfac10": {"curv_interval": 10, "inv_interval": 10}, "kfac_ggn": {"kind": "ggn"}}


def make_optimizer(name: str, module: nn.Module, lr: float, **kfac):
    """SGD with momentum 0.9, Adam, or SecondOrderOptimizer at its defaults (damping 1e-3, KL-clip 1e-3)."""
    if name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SecondOrderOptimizer(module, "classification", lr=lr, **{**KFAC[name], **kfac})


def timed_step(optimizer, module: nn.Module, x, y) -> float:
    """Seconds of one ``optimizer.step`` with the batch-mean cross-entropy closure."""

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return loss

    start = time.perf_counter()
    optimizer.step(closure)
    return time.perf_counter() - start


def train(model_name: str, name: str, lr: float, data, batch_size: int, max_steps: int, target: float) -> dict:
    torch.manual_seed(0)
    module = MODELS[model_name]()
    optimizer = make_optimizer(name, module, lr)
    loader = make_loader(data.x_train, data.y_train, batch_size, seed=0)
    steps, seconds, reached = 0, 0.0, None
    while steps < max_steps and reached is None:
        for x, y in loader:
            seconds += timed_step(optimizer, module, x, y)
            steps += 1
            with torch.no_grad():
                loss = nn.functional.cross_entropy(module(data.x_train), data.y_train).item()
            if loss != loss or loss > 1e3:  # diverged
                return {"steps": None, "seconds": None, "accuracy": float("nan")}
            if loss <= target:
                reached = (steps, seconds)
                break
            if steps >= max_steps:
                break
    with torch.no_grad():
        accuracy = (module(data.x_test).argmax(1) == data.y_test).double().mean().item()
    return {"steps": reached and reached[0], "seconds": reached and reached[1], "accuracy": accuracy}


def best_runs(model_name: str, data, regime: str, args) -> dict[str, tuple[float, dict]]:
    batch, limit = (128, args.epochs * 10) if regime == "minibatch" else (len(data.y_train), args.full_steps)
    out = {}
    for name, grid in GRIDS[regime].items():
        lrs = track(grid, f"{model_name}, {regime}, {name}: lr grid", not args.quiet)
        runs = [(lr, train(model_name, name, lr, data, batch, limit, args.target)) for lr in lrs]
        reached = [r for r in runs if r[1]["steps"] is not None]
        out[name] = min(reached, key=lambda r: r[1]["steps"]) if reached else max(runs, key=lambda r: r[1]["accuracy"])
    return out


def step_ratio(model_name: str, data, interval: int, repeats: int = 40) -> float:
    torch.manual_seed(0)
    base = MODELS[model_name]()
    kfac_module, sgd_module = copy.deepcopy(base), copy.deepcopy(base)
    kfac = make_optimizer("kfac", kfac_module, 0.01, curv_interval=interval, inv_interval=interval)
    sgd = torch.optim.SGD(sgd_module.parameters(), lr=0.01, momentum=0.9)
    x, y = data.x_train[:128], data.y_train[:128]

    def timed(optimizer, module) -> float:
        return timed_step(optimizer, module, x, y)

    for _ in range(3):
        timed(kfac, kfac_module), timed(sgd, sgd_module)
    kfac_times, sgd_times = [], []
    for _ in range(repeats):
        kfac_times.append(timed(kfac, kfac_module))
        sgd_times.append(timed(sgd, sgd_module))
    if interval > 1:  # a full cycle of `interval` steps, one of them with curvature and decompositions
        return statistics.fmean(kfac_times) / statistics.fmean(sgd_times)
    return statistics.median(kfac_times) / statistics.median(sgd_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--full-steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.05, help="mean training NLL to reach")
    parser.add_argument("--quick", action="store_true", help="5 epochs, 30 full-batch steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.full_steps = 5, 30
    torch.set_num_threads(2)
    print(f"digits: 1,257 training images; target mean training NLL {args.target}; best learning rate per grid\n")
    print("| model | regime | optimizer | lr | steps to target | time to target (s) | test accuracy (%) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for model_name in ("mlp", "cnn"):
        data = load_digits(test_fraction=0.3, flatten=model_name == "mlp", seed=0)
        for regime in GRIDS:
            for name, (lr, r) in best_runs(model_name, data, regime, args).items():
                steps = "not reached" if r["steps"] is None else f"{r['steps']}"
                seconds = "" if r["seconds"] is None else f"{r['seconds']:.2f}"
                row = f"| {model_name} | {regime} | {LABELS[name]} | {lr:g} | {steps} | {seconds} |"
                print(f"{row} {100 * r['accuracy']:.1f} |")
    print("\n| model | K-FAC step / SGD step, inverses every step | curvature and inverses every 10 steps |")
    print("|---|---:|---:|")
    for model_name in ("mlp", "cnn", "wide_cnn"):
        data = load_digits(test_fraction=0.3, flatten=model_name == "mlp", seed=0)
        print(f"| {model_name} | {step_ratio(model_name, data, 1):.2f}x | {step_ratio(model_name, data, 10):.2f}x |")


if __name__ == "__main__":
    main()
