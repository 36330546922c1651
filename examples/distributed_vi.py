"""Natural-gradient VI on digits over several processes: data parallelism x MC-sample parallelism, with checkpoints.

Run with torchrun (gloo on CPU, NCCL on GPUs), e.g. 2 processes as 2 MC groups, restarted up to
3 times if a worker dies (the job then resumes from its last checkpoint, losing nothing):

    torchrun --standalone --nproc_per_node=2 --max-restarts=3 examples/distributed_vi.py --mc-groups 2

or as 2 data-parallel shards (``--mc-groups 1``), or under MPI (needs the ``mpi`` extra):

    mpirun -n 2 python examples/distributed_vi.py --mc-groups 2

Every rank holds the same posterior and writes its own checkpoint (``--checkpoint``, one file per
rank, every ``--checkpoint-every`` updates); running the same command again continues a finished
or interrupted run (``--epochs`` is the total). Rank 0 prints the test metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.distributed import finish, init
from bayesso.predict.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mc-groups", type=int, default=2, help="processes per data shard, each its own sample")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint", default="runs/distributed_vi.pt", help="checkpoint path (one file per rank)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="updates between checkpoints")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds any rank waits for the others")
    args = parser.parse_args()
    grid = init(mc_groups=args.mc_groups, timeout=args.timeout)
    Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the same initial weights on every rank
    data = load_digits(flatten=True)
    shard = grid.shard(len(data.y_train))  # ranks of one MC group share a shard
    loader = make_loader(data.x_train[shard], data.y_train[shard], batch_size=64, seed=grid.data_rank)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    model = BayesianModel(net, "classification", "diag")
    history = model.fit(  # dataset_size: the shards' sizes summed over the ranks
        loader, "vogn", epochs=args.epochs, progress=False, grid=grid, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    probs = model.predict(data.x_test, n_samples=32, generator=torch.Generator().manual_seed(0), grid=grid).probs
    if grid.rank == 0:
        for record in history:
            print(f"epoch {record['epoch']}: loss {record['loss']:.4f}")
        metrics = classification_metrics(probs, data.y_test)
        print(f"{grid.world_size} processes ({grid.data_parallel} data x {grid.mc_groups} MC): "
              f"accuracy {metrics['accuracy']:.3f}, ECE {metrics['ece']:.3f}, "
              f"{grid.bytes_communicated / 2**20:.1f} MiB communicated")  # fmt: skip
    finish()


if __name__ == "__main__":
    main()
