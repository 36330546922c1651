"""Step time of VOGN with full-block posteriors against ``torch.optim.Adam`` on a 64-32-10 MLP (2,410 parameters).

Blocks of 2,080 and 330 parameters, batch 128 of digits, one thread, steps interleaved with Adam's
on a copy of the network. For ``inv_interval`` 1 (every step decomposes both blocks) and the
default (the posterior's ``default_inv_interval``, 10 for full blocks) it prints the median step,
the mean step (refreshes amortised) and their ratios to Adam's median step::

    python benchmarks/full_blocks.py --repeats 40
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.data import load_digits
from bayesso.optim import VOGN


def measure(inv_interval: int | None, repeats: int, batch: int) -> tuple[float, float, float]:
    """(Adam median ms, VOGN-full median ms, VOGN-full mean ms) over ``repeats`` interleaved steps."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    data = load_digits(flatten=True)
    x, y = data.x_train[:batch], data.y_train[:batch]
    reference = copy.deepcopy(module)
    model = BayesianModel(module, "classification", posterior="full", dataset_size=len(data.x_train))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the full blocks' size warning
        vogn = VOGN(model, **({} if inv_interval is None else {"inv_interval": inv_interval}))
    adam = torch.optim.Adam(reference.parameters(), lr=1e-3)

    def closure() -> torch.Tensor:
        vogn.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return loss

    def adam_step() -> None:
        adam.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        adam.step()

    for _ in range(3):
        vogn.step(closure)
        adam_step()
    vi, plain = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        vogn.step(closure)
        vi.append(time.perf_counter() - start)
        start = time.perf_counter()
        adam_step()
        plain.append(time.perf_counter() - start)
    return 1e3 * statistics.median(plain), 1e3 * statistics.median(vi), 1e3 * statistics.fmean(vi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| inv_interval | Adam (ms) | VOGN full, median (ms) | × Adam | VOGN full, mean (ms) | × Adam |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, interval in (("1", 1), ("default (10)", None)):
        adam, median, mean = measure(interval, args.repeats, args.batch)
        print(f"| {label} | {adam:.2f} | {median:.1f} | {median / adam:.1f} | {mean:.1f} | {mean / adam:.1f} |")


if __name__ == "__main__":
    main()
