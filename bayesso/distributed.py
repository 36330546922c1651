"""Data parallelism and MC-sample parallelism over ``torch.distributed``.

A ``ProcessGrid`` arranges ``world_size = data_parallel × mc_groups`` processes. Rank r
works on data shard ``r // mc_groups`` and draws MC sample slot ``r % mc_groups``; the
ranks of one shard must be fed the same batches (``grid.shard(n)`` gives a shard's
indices). Every reduction runs over all ranks: gradients and losses are averaged
(mean over data shards of batch means, and over MC samples), curvature statistics are
summed as the additive flat buffers of ``Curvature.flatten`` (the curvature of the union
of all ranks' examples and samples), so the result, and with it the posterior or the
optimizer state, is the same on every rank.

Tensors are packed into flat buckets of at most ``bucket_bytes`` and each bucket is one
collective. Initialisation (``init``): an existing process group, the torchrun
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or an MPI launch through
mpi4py (the ``mpi`` extra), which only supplies ranks and the rendezvous address.
Backend: NCCL with CUDA, gloo otherwise. Without any of these, a one-process grid whose
collectives do nothing.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from bayesso.curvature import Curvature

__all__ = ["ProcessGrid", "finish", "init", "reduce_step"]

BUCKET_BYTES = 2**25  # 32 MiB per collective


@dataclass
class ProcessGrid:
    """World = ``data_parallel`` shards × ``mc_groups`` MC-sample slots (one process per cell).

    ``bytes_communicated`` counts the payload of every collective this grid issued.
    """

    rank: int = 0
    world_size: int = 1
    mc_groups: int = 1
    group: object | None = None
    bucket_bytes: int = BUCKET_BYTES
    bytes_communicated: int = field(default=0, init=False)
    # The last buffers handed to collectives. A gloo worker thread drops its reference to a finished
    # collective's tensors slightly after the caller resumes; if that were the last reference while
    # the interpreter shuts down, releasing the Python tensor would abort the process (seen in about
    # 1 of 10 mpirun runs). Keeping the newest few alive here makes the thread's release harmless.
    _recent: deque = field(default_factory=lambda: deque(maxlen=4), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mc_groups < 1 or self.world_size % self.mc_groups:
            raise ValueError(f"mc_groups must divide the world size {self.world_size}, got {self.mc_groups}")

    @property
    def data_parallel(self) -> int:
        """Number of data shards."""
        return self.world_size // self.mc_groups

    @property
    def data_rank(self) -> int:
        """This rank's data shard."""
        return self.rank // self.mc_groups

    @property
    def mc_rank(self) -> int:
        """This rank's MC-sample slot."""
        return self.rank % self.mc_groups

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> Tensor:
        """Indices of this rank's data shard of n examples (contiguous, sizes differing by at most 1)."""
        bounds = [n * k // self.data_parallel for k in range(self.data_parallel + 1)]
        return torch.arange(bounds[self.data_rank], bounds[self.data_rank + 1])

    def sample_slice(self, n_samples: int, over_world: bool = False) -> slice:
        """Which of ``n_samples`` draws this rank evaluates: its MC slot's share, or its share of the world."""
        parts, index = (self.world_size, self.rank) if over_world else (self.mc_groups, self.mc_rank)
        bounds = [n_samples * k // parts for k in range(parts + 1)]
        return slice(bounds[index], bounds[index + 1])

    # ---- collectives -------------------------------------------------------------------------
    def all_reduce(self, tensors: list[Tensor], average: bool = False) -> list[Tensor]:
        """Sum (or average) over all ranks, in flat buckets of one dtype and device each; returns new tensors."""
        if not self.active:
            return [t.clone() for t in tensors]
        out: list[Tensor | None] = [None] * len(tensors)
        for bucket in self._buckets(tensors):
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            self._recent.append(flat)
            dist.all_reduce(flat, group=self.group)
            self.bytes_communicated += flat.numel() * flat.element_size()
            if average:
                flat /= self.world_size
            for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket])):
                out[i] = part.view_as(tensors[i])
        return out

    def _buckets(self, tensors: list[Tensor]) -> list[list[int]]:
        buckets, current, size, key = [], [], 0, None
        for i, t in enumerate(tensors):
            nbytes = t.numel() * t.element_size()
            if current and ((t.dtype, t.device) != key or size + nbytes > self.bucket_bytes):
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size, key = size + nbytes, (t.dtype, t.device)
        if current:
            buckets.append(current)
        return buckets

    def average(self, *tensors: Tensor) -> list[Tensor]:
        """Mean over ranks of each tensor (one collective per bucket)."""
        return self.all_reduce(list(tensors), average=True)

    def sum_curvature(self, curvature: Curvature) -> Curvature:
        """The curvature of all ranks' examples together (additive buffers summed, n_examples summed)."""
        if not self.active:
            return curvature
        buffer = curvature.flatten()
        count = torch.tensor([float(curvature.n_examples)], dtype=buffer.dtype, device=buffer.device)
        buffer, count = self.all_reduce([buffer, count])
        total = curvature.clone().load_flat_(buffer)
        total.n_examples = round(float(count))
        return total


def finish() -> None:
    """Leave ``torch.distributed`` cleanly: a barrier, then destroy the default group.

    Without the barrier, a rank that tears its gloo connections down while another is
    still working can make the other abort ("terminate called without an active exception");
    see also ``ProcessGrid._recent``.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reduce_step(
    grid: ProcessGrid, loss: Tensor, grad: Tensor, curvature: Curvature | None, estimate: Tensor | None = None
) -> tuple[Tensor, Tensor, Curvature | None, Tensor | None]:
    """One optimizer step's quantities over all ranks: loss, gradient and estimate averaged, curvature summed.

    The loss goes first and alone: if it is non-finite on any rank, every rank gets the
    non-finite mean and stops there (no rank waits in a collective another rank skipped).
    """
    if not grid.active:
        return loss, grad, curvature, estimate
    (loss,) = grid.average(torch.as_tensor(loss, dtype=torch.float64).reshape(1))
    loss = loss.reshape(())
    if not torch.isfinite(loss):
        return loss, grad, None, estimate
    averaged = grid.average(grad, *([] if estimate is None else [estimate]))
    grad, estimate = averaged[0], (averaged[1] if estimate is not None else None)
    return loss, grad, None if curvature is None else grid.sum_curvature(curvature), estimate


def init(mc_groups: int = 1, backend: str | None = None, bucket_bytes: int = BUCKET_BYTES) -> ProcessGrid:
    """The process grid of this job, initialising ``torch.distributed`` if needed.

    Sources, in order: an initialised default group; torchrun's environment; an MPI
    launch (OMPI_COMM_WORLD_RANK / PMI_RANK; mpi4py broadcasts rank 0's address and a
    free port); otherwise one process. ``backend``: "nccl" with CUDA, else "gloo".
    With CUDA, each process uses the device ``LOCAL_RANK`` (or rank modulo device count).
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        elif "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
            _init_from_mpi(backend)
    if not dist.is_initialized():
        return ProcessGrid(mc_groups=mc_groups, bucket_bytes=bucket_bytes)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
    return ProcessGrid(rank, world, mc_groups, bucket_bytes=bucket_bytes)


def _init_from_mpi(backend: str) -> None:
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError("launching under mpirun needs mpi4py: pip install 'bayesso[mpi]'") from error
    comm = MPI.COMM_WORLD
    address = port = None
    if comm.rank == 0:
        address = os.environ.get("MASTER_ADDR", socket.gethostbyname(socket.gethostname()))
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = int(os.environ.get("MASTER_PORT", probe.getsockname()[1]))
    address, port = comm.bcast((address, port), root=0)
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID"))
    if local is not None:
        os.environ.setdefault("LOCAL_RANK", local)
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=comm.rank, world_size=comm.size)
