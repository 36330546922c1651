"""A checkpointed ``fit`` that the tests kill and resume: one process, or one rank of a torchrun job.

``--kill-at-fetch N`` makes the process send itself SIGKILL when its dataset serves its N-th
example (under torchrun: rank 1, in the first attempt only, so the restarted job runs through).
At the end every rank saves its module, posterior and history to ``--out``/rank{r}.pt.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesso import BayesianModel
from bayesso.distributed import finish, init


class KillingDataset(TensorDataset):
    """Serves examples; sends its own process SIGKILL when serving the ``kill_at``-th."""

    def __init__(self, *tensors, kill_at: int | None = None) -> None:
        super().__init__(*tensors)
        self.kill_at, self.served = kill_at, 0

    def __getitem__(self, index):
        self.served += 1
        if self.kill_at is not None and self.served == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--kill-at-fetch", type=int, default=None)
    parser.add_argument("--method", default="noisy_kfac")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = init(timeout=60)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    kill = args.kill_at_fetch if first_attempt and grid.rank == grid.world_size - 1 else None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(240, 6, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    shard = grid.shard(len(x))
    loader = DataLoader(
        KillingDataset(x[shard], y[shard], kill_at=kill),
        batch_size=20,
        shuffle=True,
        generator=torch.Generator().manual_seed(1 + grid.data_rank),
    )
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    structure = "kron" if args.method == "noisy_kfac" else "diag"
    model = BayesianModel(net, "classification", structure, prior_precision=5.0, temperature=0.1)
    history = model.fit(
        loader,
        args.method,
        epochs=args.epochs,
        progress=False,
        checkpoint=args.checkpoint,
        checkpoint_every=4,
        grid=grid,
    )  # dataset_size: the sum of the ranks' shards
    result = {"module": net.state_dict(), "posterior": model.posterior.state_dict(), "history": history}
    torch.save(result, Path(args.out) / f"rank{grid.rank}.pt")
    finish()


if __name__ == "__main__":
    main()
