"""Eigendecompositions divided across the ranks of a ``ProcessGrid``.

Every rank holds the same posterior statistic (``ProcessGrid.sum_curvature`` makes it so),
so every rank could decompose every block, as one process does. Instead, each block that
needs eigendecompositions is owned by one rank (``assign_owners``: greedy longest processing
time on the cost of ``torch.linalg.eigh``, ``eigh_cost``); each rank decomposes only the blocks
it owns, and every owner broadcasts its eigenvalues and eigenvectors to the others, packed
into buckets like ``ProcessGrid.all_reduce``. The ranks end with bit-identical decompositions,
the owner's, which are the ones a single process computes from the same statistic. Blocks
that need no decomposition (diagonal ones) are built by every rank.

Cost model: the eigendecomposition of a stack of b symmetric n × n matrices costs b n³ units
(≈ 9 b n³ flops with eigenvectors, Golub & Van Loan §8.3); a K-FAC block with factors A (a × a)
and G (g × g) per group costs groups (a³ + g³), a full block of P parameters P³.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from bayesso.distributed import ProcessGrid
from bayesso.posteriors.eigenbasis import symmetric_eigh

__all__ = ["assign_owners", "eigh_cost", "shared_eighs"]

Eigh = tuple[Tensor, Tensor]  # (eigenvalues (..., n), eigenvectors (..., n, n)), as torch.linalg.eigh


def eigh_cost(shapes: Iterable[Sequence[int]]) -> int:
    """Cost of decomposing symmetric matrices of these shapes (..., n, n): Σ batch · n³."""
    total = 0
    for shape in shapes:
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"shapes must be those of square matrices (..., n, n), got {tuple(shape)}")
        total += math.prod(shape[:-2]) * shape[-1] ** 3
    return total


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that owns each of ``len(costs)`` jobs: greedy longest processing time.

    Jobs in order of decreasing cost (ties: lower index first) go one by one to the rank with
    the least cost so far (ties: lower rank). Deterministic, so every rank computes the same
    assignment; its largest load is at most (4/3 - 1/(3 · world_size)) times the best possible
    (Graham 1969). With more ranks than jobs, each job gets its own rank and the others none.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    for index, cost in enumerate(costs):
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost < math.inf:
            raise ValueError(f"costs must be finite and non-negative, got costs[{index}] = {cost!r}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


def shared_eighs(factors: Mapping[str, list[Tensor]], grid: ProcessGrid) -> dict[str, list[Eigh]]:
    """``symmetric_eigh`` of every block's factors, each block decomposed by its owner only.

    ``factors``: per block, the symmetric matrices (..., n, n) its eigenbasis is built from (the
    same on every rank, in the same order); blocks with none are left out of the result. The
    local decompositions run in ``grid.lockstep``, so a decomposition that raises on its owner
    raises on every rank (``PeerError`` on the others) before anything is broadcast. Returns, per block
    with factors, one (eigenvalues, eigenvectors) pair per factor.
    """
    names = [name for name, matrices in factors.items() if matrices]
    if not names:  # nothing to decompose (diagonal blocks): no collective either
        return {}
    owners = assign_owners([eigh_cost(m.shape for m in factors[name]) for name in names], grid.world_size)
    owner = dict(zip(names, owners))
    with grid.lockstep("eigendecompositions"):
        mine = {name: [symmetric_eigh(m) for m in factors[name]] for name in names if owner[name] == grid.rank}
    result: dict[str, list[Eigh]] = {}
    for rank in sorted(set(owners)):
        owned = [name for name in names if owner[name] == rank]
        if rank == grid.rank:
            tensors = [t for name in owned for pair in mine[name] for t in pair]
        else:
            tensors = [t for name in owned for m in factors[name] for t in (m[..., 0], m)]  # shapes, dtypes only
        # each in its own allocation, as on the owner: views into a bucket at unaligned offsets would take other
        # vectorised code paths in later products and round differently
        received = iter(t if rank == grid.rank else t.clone() for t in grid.broadcast(tensors, src=rank))
        for name in owned:
            result[name] = [(next(received), next(received)) for _ in factors[name]]
    return result
