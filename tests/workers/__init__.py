"""Multi-process jobs of the test suite, and ``run_two_ranks`` to run one of them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

TIMEOUT_S = 240


def run_two_ranks(worker: Callable, folder: Path) -> list[dict]:
    """Spawn ``worker(rank, 2, rendezvous file, folder)`` on 2 processes; each saves ``folder/rank{r}.pt``.

    Returns both ranks' saved results; fails the test if the job does not end within ``TIMEOUT_S``.
    """
    context = mp.start_processes(
        worker, args=(2, str(folder / "rendezvous"), str(folder)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process job did not finish within {TIMEOUT_S} s")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
