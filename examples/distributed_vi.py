"""Natural-gradient VI on digits over several processes: data parallelism x MC-sample parallelism.

Run with torchrun (gloo on CPU, NCCL on GPUs), e.g. 2 processes as 2 MC groups:

    torchrun --nproc_per_node=2 examples/distributed_vi.py --mc-groups 2

or as 2 data-parallel shards (``--mc-groups 1``), or under MPI (needs the ``mpi`` extra):

    mpirun -n 2 python examples/distributed_vi.py --mc-groups 2

Every rank holds the same posterior; rank 0 prints the test metrics.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.data import load_digits, make_loader
from bayesso.distributed import finish, init
from bayesso.optim import VOGN
from bayesso.predict.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mc-groups", type=int, default=2, help="processes per data shard, each its own sample")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    grid = init(mc_groups=args.mc_groups)
    torch.manual_seed(0)  # the same initial weights on every rank
    data = load_digits(flatten=True)
    shard = grid.shard(len(data.y_train))  # ranks of one MC group share a shard
    loader = make_loader(data.x_train[shard], data.y_train[shard], batch_size=64, seed=grid.data_rank)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    model = BayesianModel(net, "classification", "diag", prior_precision=50.0, temperature=0.01)
    optimizer = VOGN(model, dataset_size=len(data.y_train), grid=grid)
    for epoch in range(args.epochs):
        for x, y in loader:

            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
        if grid.rank == 0:
            print(f"epoch {epoch + 1}: loss {float(loss):.4f}")
    probs = model.predict(data.x_test, n_samples=32, generator=torch.Generator().manual_seed(0), grid=grid).probs
    if grid.rank == 0:
        metrics = classification_metrics(probs, data.y_test)
        print(f"{grid.world_size} processes ({grid.data_parallel} data x {grid.mc_groups} MC): "
              f"accuracy {metrics['accuracy']:.3f}, ECE {metrics['ece']:.3f}, "
              f"{grid.bytes_communicated / 2**20:.1f} MiB communicated")  # fmt: skip
    finish()


if __name__ == "__main__":
    main()
