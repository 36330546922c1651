"""Scale-out of K-FAC VI: compute and bytes per rank per step against world size, and a 1 vs 2 process measurement.

The table is computed, not measured, from the library's own formulas: ``bayesso.sharding.eigh_cost``
(the cost of a block's eigendecompositions, Σ batch · n³) and ``bayesso.sharding.assign_owners``
(greedy longest-processing-time assignment of blocks to ranks), for the K-FAC factors of a ResNet-50
(He et al. 2016, torchvision's v1.5 layout: stride on the 3 × 3 convolution; 224 × 224 inputs),
written out below from the architecture's formula. Today's scheme: every rank decomposes every block.
Sharded (implemented): each rank decomposes the blocks it owns and receives the others' eigenbases.

Assumptions:
- eigh of an n × n symmetric matrix with eigenvectors ≈ 9 n³ flops (Golub & Van Loan, §8.3);
- K-FAC statistic of a layer with a inputs (c_in k² for a convolution), g outputs, T output positions
  and b examples per rank: 2 b T (a² + g²) flops (two Gram matrices); b = 32 per rank (weak scaling);
- float32 statistics and eigenbases; a K-FAC block's statistic is a² + g² + 1 numbers (the flat buffer
  of ``Curvature.flatten``), its eigenbasis a² + a + g² + g; batch norms have diagonal statistics
  (2 numbers per channel) and need no decomposition; the gradient (P numbers) is all-reduced too;
- ring all-reduce of S bytes: each rank sends and receives 2 (n - 1)/n · S;
- broadcast of S bytes: every other rank receives S (pipelined or tree), so a rank receives the
  eigenbases of every block it does not own; the table gives the largest such rank;
- "owner-only statistics" (not implemented): reduce the K-FAC statistics to their owners only (each rank
  sends the blocks it does not own, S - S_own) and keep them there; it saves bytes only because the other
  ranks then no longer hold the statistic, i.e. the ranks' posteriors (state_dict, checkpoints) differ.
  A ring all-reduce is a reduce-scatter followed by an all-gather, so reduce-scatter to owners while
  keeping every rank's state identical costs exactly the all-reduce it replaces.

With ``--measure``: noisy K-FAC (decompositions every step, and every 10 steps, the preset's default) on
the digits MLP 64-512-512-10 of benchmarks/models.py, batch 128, in one process and in two gloo processes
(64 examples each; 1 thread per process): wall time per step and each rank's CPU time per step (medians
over the timed steps; CPU time counts the process's own work, gloo's threads included, and is robust to
other load on the machine) and how many matrices each rank decomposed. Run: python benchmarks/scale_out.py [--measure]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bayesso import BayesianModel
from bayesso.data import load_digits
from bayesso.distributed import ProcessGrid, finish
from bayesso.optim import NoisyKFAC
from bayesso.sharding import assign_owners, eigh_cost

EIGH_FLOPS = 9  # per n³
BYTES = 4  # float32
BATCH_PER_RANK = 32
WORLD_SIZES = [2**k for k in range(9)]


def resnet50_layers() -> tuple[list[tuple[str, int, int, int]], list[int]]:
    """K-FAC layers (name, a, g, T output positions) and batch-norm channel counts of a ResNet-50 at 224 × 224."""
    layers, norms = [("conv1", 3 * 7 * 7, 64, 112 * 112)], [64]
    channels, size = 64, 56
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            out, name = 4 * width, f"layer{stage}.{block}"
            size_out = size // stride
            layers += [
                (f"{name}.conv1", channels, width, size * size),
                (f"{name}.conv2", 9 * width, width, size_out * size_out),
                (f"{name}.conv3", width, out, size_out * size_out),
            ]
            norms += [width, width, out]
            if block == 0:
                layers.append((f"{name}.downsample", channels, out, size_out * size_out))
                norms.append(out)
            channels, size = out, size_out
    layers.append(("fc", 2048 + 1, 1000, 1))  # the bias is the appended input
    return layers, norms


def cost_table() -> str:
    layers, norms = resnet50_layers()
    parameters = sum((a - (name == "fc")) * g for name, a, g, _ in layers) + 1000 + 2 * sum(norms)
    costs = [eigh_cost([(a, a), (g, g)]) for _, a, g, _ in layers]
    basis = [(a * a + a + g * g + g) * BYTES for _, a, g, _ in layers]
    statistic = sum(a * a + g * g + 1 for _, a, g, _ in layers) * BYTES + 2 * sum(norms) * BYTES
    gradient = parameters * BYTES
    statistic_flops = sum(2 * BATCH_PER_RANK * t * (a * a + g * g) for _, a, g, t in layers)
    lines = [
        f"ResNet-50: {parameters:,} parameters, {len(layers)} K-FAC blocks (largest factor "
        f"{max(max(a, g) for _, a, g, _ in layers)}), {len(norms)} batch norms; statistic {statistic / 2**20:.1f} MiB, "
        f"eigenbases {sum(basis) / 2**20:.1f} MiB, gradient {gradient / 2**20:.1f} MiB (float32); K-FAC statistic "
        f"{statistic_flops / 1e9:.1f} GFLOP per rank per step at batch {BATCH_PER_RANK} per rank, in both schemes.",
        "",
        "| ranks | eigh GFLOP/rank, today | eigh GFLOP/rank, sharded (largest) | balance (largest / mean) "
        "| MiB/rank, today | MiB/rank, sharded | MiB/rank, owner-only statistics (not implemented) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kron_statistic = [(a * a + g * g + 1) * BYTES for _, a, g, _ in layers]
    for n in WORLD_SIZES:
        owners = assign_owners(costs, n)
        loads = [0] * n
        own_basis, own_statistic = [0] * n, [0] * n
        for cost, size, stat, owner in zip(costs, basis, kron_statistic, owners):
            loads[owner] += cost
            own_basis[owner] += size
            own_statistic[owner] += stat
        ring = 2 * (n - 1) / n
        today = ring * (gradient + statistic)
        broadcast = max(sum(basis) - own for own in own_basis)
        kron_total, basis_total = sum(kron_statistic), sum(basis)
        shared = ring * (gradient + statistic - kron_total)  # still all-reduced: gradient, batch-norm statistics
        owner_only = max(shared + kron_total - own_statistic[r] + basis_total - own_basis[r] for r in range(n))
        lines.append(
            f"| {n} | {EIGH_FLOPS * sum(costs) / 1e9:,.0f} | {EIGH_FLOPS * max(loads) / 1e9:,.0f} "
            f"| {max(loads) / (sum(costs) / n):.2f} | {today / 2**20:,.0f} | {(today + broadcast) / 2**20:,.0f} "
            f"| {owner_only / 2**20:,.0f} |"
        )
    return "\n".join(lines)


# ---- measurement: 1 vs 2 gloo processes -----------------------------------------------------------------------
def run(grid: ProcessGrid | None, inv_interval: int, steps: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from models import MODELS

    torch.manual_seed(0)
    data = load_digits(test_fraction=0.3, flatten=True, seed=0)
    module = MODELS["mlp"]()
    model = BayesianModel(module, "classification", "kron", prior_precision=50.0, dataset_size=len(data.y_train))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = NoisyKFAC(model, inv_interval=inv_interval, grid=grid)
    x, y = data.x_train[:128], data.y_train[:128]
    if grid is not None:
        x, y = x[grid.shard(128)], y[grid.shard(128)]

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    counted = []
    original = torch.linalg.eigh

    def counting(matrix, *args, **kwargs):
        counted.append(math.prod(matrix.shape[:-2]))
        return original(matrix, *args, **kwargs)

    times, cpu = [], []
    with mock.patch.object(torch.linalg, "eigh", counting):
        for _ in range(steps):
            if grid is not None:
                dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            optimizer.step(closure)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"seconds": statistics.median(times), "cpu": statistics.median(cpu), "decompositions": sum(counted)}


def _worker(rank: int, rendezvous: str, inv_interval: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.save(run(ProcessGrid(rank, 2), inv_interval, steps), os.path.join(out, f"rank{rank}.pt"))
    finish()


def measure(steps: int) -> str:
    lines = [
        "| inv_interval | processes | ms per step (rank 0) | CPU ms per step, per rank "
        "| matrices decomposed per rank over the timed steps |",
        "|---:|---:|---:|---|---|",
    ]
    for inv_interval in (1, 10):
        torch.set_num_threads(1)
        single = run(None, inv_interval, steps)
        lines.append(
            f"| {inv_interval} | 1 | {1e3 * single['seconds']:.1f} | {1e3 * single['cpu']:.1f} "
            f"| {single['decompositions']} |"
        )
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_worker, args=(os.path.join(folder, "rendezvous"), inv_interval, steps, folder), nprocs=2)
            ranks = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]
        counts = " / ".join(str(r["decompositions"]) for r in ranks)
        cpu = " / ".join(f"{1e3 * r['cpu']:.1f}" for r in ranks)
        lines.append(f"| {inv_interval} | 2 | {1e3 * ranks[0]['seconds']:.1f} | {cpu} | {counts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", action="store_true", help="also time 1 vs 2 gloo processes on this machine")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(cost_table())
    if args.measure:
        print()
        print(measure(args.steps))


if __name__ == "__main__":
    main()
