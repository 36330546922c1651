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
collective. Posterior eigendecompositions are divided across the ranks (``bayesso.sharding``):
each block's owner decomposes it and broadcasts the result.

Initialisation (``init``): an existing process group, the torchrun
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or an MPI launch through
mpi4py (the ``mpi`` extra), which only supplies ranks and the rendezvous address.
Backend: NCCL with CUDA, gloo otherwise. Without any of these, a one-process grid whose
collectives do nothing.

Faults are bounded. ``init`` gives the process group a ``timeout`` (10 minutes by default),
so a rank that stopped or died makes every collective of the others fail within it, never
hang. Each unit of work that ranks do side by side (an optimizer step, a Laplace pass, a
sharded prediction) runs in ``ProcessGrid.lockstep``: one small collective at its end
carries every rank's success flag and position, so an exception on one rank becomes an
error on every rank (``PeerError`` on the others) at once, and ranks that drifted apart
(one caught an exception and went on) are detected instead of silently mixing different
steps' numbers.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from bayesso.curvature import Curvature

__all__ = ["Lockstep", "PeerError", "ProcessGrid", "finish", "init", "reduce_step"]

BUCKET_BYTES = 2**25  # 32 MiB per collective
DEFAULT_TIMEOUT = timedelta(minutes=10)
VALUE_SLOTS = 4  # numbers a lockstep point can sum over ranks besides its status
TAG_PERIOD = 2**20  # lockstep positions are compared modulo this (exact in float64 with their squares)


class PeerError(RuntimeError):
    """Another rank failed, stopped answering, or is at a different step; raised on every other rank."""


@dataclass
class Lockstep:
    """What a ``ProcessGrid.lockstep`` block shares: ``values`` (at most 4 numbers) set inside it,
    ``totals`` (their sums over all ranks, float64) after it."""

    values: Sequence[float] | Tensor = ()
    totals: Tensor | None = None


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
    _position: int = field(default=0, init=False, repr=False)
    _what: str = field(default="", init=False, repr=False)

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

    # ---- faults ------------------------------------------------------------------------------
    @contextmanager
    def lockstep(self, what: str) -> Iterator[Lockstep]:
        """Local work ``what`` ("optimizer step", ...) that every rank does at the same point, closed by one
        small collective.

        If the block raises on any rank, every rank raises: the failing rank its own error,
        the others ``PeerError`` naming it, so no rank is left waiting in a later collective.
        Every rank counts the lockstep points it enters; ranks at different counts or doing
        different work there (one skipped or repeated a step) all raise ``PeerError``. ``values``
        set inside are summed over the ranks into ``totals``. A rank that does not answer within
        the process group's timeout makes the others raise ``PeerError`` too. One process: no
        collective, totals = values. Callers enter it before any check of their own, so that a
        call refused on one rank still counts there.
        """
        self._position += 1
        self._what = what
        shared = Lockstep()
        try:
            yield shared
        except PeerError:
            raise
        except BaseException as error:
            if self.active:
                try:
                    self._exchange(failed=True, values=())
                except PeerError as peer:
                    if hasattr(error, "add_note"):
                        error.add_note(f"(while telling the other ranks about it: {peer})")
            raise
        shared.totals = self._exchange(failed=False, values=shared.values)

    def _exchange(self, failed: bool, values) -> Tensor:
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
        if values.numel() > VALUE_SLOTS:
            raise ValueError(f"a lockstep point shares at most {VALUE_SLOTS} values, got {values.numel()}")
        if not self.active:
            return values
        tag = (self._position * 64 + zlib.crc32(self._what.encode()) % 64) % TAG_PERIOD
        status = torch.zeros(2 + VALUE_SLOTS + self.world_size, dtype=torch.float64)
        status[0], status[1] = tag, tag * tag
        status[2 : 2 + values.numel()] = values
        status[2 + VALUE_SLOTS + self.rank] = float(failed)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else None
        buffer = status if device is None else status.to(device)
        self._recent.append(buffer)
        try:
            dist.all_reduce(buffer, group=self.group)
        except Exception as error:
            raise PeerError(
                f"rank {self.rank}: no answer from the other ranks at {self._what} (lockstep point {self._position}) "
                f"within the process group's timeout, or a peer's connection closed ({error}); a rank has stopped or "
                "died"
            ) from error
        self.bytes_communicated += buffer.numel() * buffer.element_size()
        total = buffer.cpu()
        flags = total[2 + VALUE_SLOTS :]
        failures = [r for r in range(self.world_size) if flags[r] > 0 and r != self.rank]
        if failures and not failed:
            raise PeerError(
                f"rank(s) {failures} failed at {self._what} (lockstep point {self._position}; their own error says "
                f"why); rank {self.rank} raises too, so that no rank waits for the others"
            )
        if total[0] != self.world_size * tag or total[1] != self.world_size * tag * tag:
            raise PeerError(
                f"the ranks are out of step: rank {self.rank} is at {self._what} (lockstep point {self._position}), "
                "another rank at a different point or doing different work (it skipped or repeated a step, e.g. "
                "after catching an exception and going on); every rank raises rather than combine different steps"
            )
        return total[2 : 2 + values.numel()]

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

    def broadcast(self, tensors: list[Tensor], src: int) -> list[Tensor]:
        """Rank ``src``'s ``tensors`` on every rank, in flat buckets as ``all_reduce``; every rank passes tensors of
        the same shapes, dtypes and order (the values of the others are ignored). Rank ``src`` gets its own back."""
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < self.world_size:
            raise ValueError(f"src must be a rank in [0, {self.world_size}), got {src!r}")
        if not self.active:
            return list(tensors)
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        out: list[Tensor | None] = [None] * len(tensors)
        for bucket in self._buckets(tensors):
            if src == self.rank:
                flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            else:
                like = tensors[bucket[0]]
                flat = like.new_empty(sum(tensors[i].numel() for i in bucket))
            self._recent.append(flat)
            dist.broadcast(flat, src=root, group=self.group)
            self.bytes_communicated += flat.numel() * flat.element_size()
            for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket])):
                out[i] = tensors[i] if src == self.rank else part.view_as(tensors[i])
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
    see also ``ProcessGrid._recent``. If the barrier fails (a peer died or timed out), the
    group is destroyed anyway and a warning says why.
    """
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except Exception as error:
        warnings.warn(f"bayesso.distributed.finish: the final barrier failed ({error}); leaving anyway", stacklevel=2)
    finally:
        dist.destroy_process_group()


def reduce_step(
    grid: ProcessGrid, loss: Tensor, grad: Tensor, curvature: Curvature | None, estimate: Tensor | None = None
) -> tuple[Tensor, Curvature | None, Tensor | None]:
    """Gradient and estimate averaged, curvature summed over all ranks, after ``loss`` (the mean over ranks,
    from the step's ``lockstep``) was found finite; nothing is reduced for a non-finite loss, on any rank."""
    if not grid.active or not torch.isfinite(loss):
        return grad, curvature, estimate
    averaged = grid.average(grad, *([] if estimate is None else [estimate]))
    grad, estimate = averaged[0], (averaged[1] if estimate is not None else None)
    return grad, None if curvature is None else grid.sum_curvature(curvature), estimate


def init(
    mc_groups: int = 1,
    backend: str | None = None,
    bucket_bytes: int = BUCKET_BYTES,
    timeout: float | timedelta = DEFAULT_TIMEOUT,
) -> ProcessGrid:
    """The process grid of this job, initialising ``torch.distributed`` if needed.

    Sources, in order: an initialised default group (it keeps its own timeout); torchrun's
    environment; an MPI launch (OMPI_COMM_WORLD_RANK / PMI_RANK; mpi4py broadcasts rank 0's
    address and a free port); otherwise one process. ``backend``: "nccl" with CUDA, else "gloo".
    ``timeout`` (seconds or a ``timedelta``, default 10 minutes): the longest any collective
    waits for the other ranks before it fails. With CUDA, each process uses the device
    ``LOCAL_RANK`` (or rank modulo device count).
    """
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    timeout = timedelta(seconds=seconds)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            _init_from_environment(backend, timeout)
        elif "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
            _init_from_mpi(backend, timeout)
    if not dist.is_initialized():
        return ProcessGrid(mc_groups=mc_groups, bucket_bytes=bucket_bytes)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
    return ProcessGrid(rank, world, mc_groups, bucket_bytes=bucket_bytes)


def _init_from_environment(backend: str, timeout: timedelta) -> None:
    """torchrun's environment. Under its agent's store, the keys are those of this attempt: the agent keeps one
    store for all restarts, so a restarted worker could otherwise read the previous attempt's addresses and fail
    to connect (seen with torch 2.13 after ``--max-restarts`` restarts)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout=timeout)
    prefixed = dist.PrefixStore(f"bayesso/attempt_{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)


def _init_from_mpi(backend: str, timeout: timedelta) -> None:
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
    dist.init_process_group(
        backend, init_method=f"tcp://{address}:{port}", rank=comm.rank, world_size=comm.size, timeout=timeout
    )
