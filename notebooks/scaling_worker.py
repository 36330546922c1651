"""Timed VOGN steps on digits, alone or under torchrun / mpirun: the measurement of 07_scaling_out.ipynb.

Every rank trains the same MLP 64-256-10 with a diagonal VOGN posterior on its shard of the digits. A step
evaluates ``--samples`` weight samples on a global batch of ``--batch`` examples, divided over the
``world / mc_groups`` data shards and the ``mc_groups`` MC-sample groups, so every layout does the same work
per step. For each value of ``--threads`` (torch threads per process) and of ``--mc-groups`` in turn (a fresh
model each time), ``--warmup`` steps run and ``--steps`` steps are timed; rank 0 writes one record per
measurement to ``--out`` as a JSON list::

    torchrun --standalone --nproc_per_node=2 scaling_worker.py --mc-groups 1 2 --out two.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.distributed import ProcessGrid, finish, init
from bayesso.optim import VOGN


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mc-groups", type=int, nargs="+", default=[1], help="layouts: processes per data shard")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads per process")
    parser.add_argument("--samples", type=int, default=2, help="weight samples per step, over all MC groups")
    parser.add_argument("--batch", type=int, default=128, help="examples per step, over all data shards")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes")
    args = parser.parse_args()
    for name in ("samples", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.mc_groups) < 1 or min(args.threads) < 1:
        parser.error(f"--warmup must be >= 0, --mc-groups and --threads positive; got {args.warmup}, "
                     f"{args.mc_groups} and {args.threads}")  # fmt: skip
    return args


def measure(grid: ProcessGrid, samples: int, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Time ``steps`` VOGN steps (after ``warmup``) of ``samples`` weight samples on ``batch`` examples in ``grid``."""
    if samples % grid.mc_groups or batch % grid.data_parallel:
        raise ValueError(
            f"samples ({samples}) must divide over {grid.mc_groups} MC groups and batch ({batch}) over "
            f"{grid.data_parallel} data shards"
        )
    torch.manual_seed(0)  # the same initial weights on every rank
    data = load_digits(flatten=True)
    shard = grid.shard(len(data.y_train))
    loader = make_loader(data.x_train[shard], data.y_train[shard], batch // grid.data_parallel,
                         seed=grid.data_rank, drop_last=True)  # fmt: skip
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    model = BayesianModel(net, "classification", "diag", dataset_size=len(data.y_train))
    optimizer = VOGN(model, mc_samples=samples // grid.mc_groups, grid=grid)
    batches = iter(())

    def step() -> None:
        nonlocal batches
        pair = next(batches, None)
        if pair is None:
            batches = iter(loader)
            pair = next(batches)
        x, y = pair

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)

    for _ in range(warmup):
        step()
    if grid.active:
        dist.barrier()
    sent = grid.bytes_communicated
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {
        "processes": grid.world_size,
        "threads": torch.get_num_threads(),
        "data_shards": grid.data_parallel,
        "mc_groups": grid.mc_groups,
        "samples_per_step": samples,
        "examples_per_step": batch,
        "seconds_per_step": seconds / steps,
        "samples_per_second": samples * steps / seconds,
        "examples_per_second": batch * steps / seconds,
        "bytes_per_step": (grid.bytes_communicated - sent) / steps,
    }


def main() -> None:
    args = parse_args()
    first = init(mc_groups=args.mc_groups[0], timeout=120.0)
    grids = [first] + [ProcessGrid(first.rank, first.world_size, k) for k in args.mc_groups[1:]]
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        results += [measure(grid, args.samples, args.batch, args.steps, args.warmup) for grid in grids]
    if first.rank == 0:
        args.out.write_text(json.dumps(results, indent=1))
    finish()


if __name__ == "__main__":
    main()
