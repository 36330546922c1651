"""Decompositions divided across ranks: the assignment, the cost model, and two gloo processes against one.

The 2-process job (tests/workers/sharded_eighs.py) runs each scenario on both ranks and, in the same
processes, without a grid; here the ranks' eigenbases are compared bit for bit with each other and
with that one-process reference, and each rank's eigendecompositions are counted.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from bayesso.distributed import ProcessGrid
from bayesso.sharding import assign_owners, eigh_cost
from tests.test_distributed import _same
from tests.workers import run_two_ranks
from tests.workers.sharded_eighs import laplace, second_order, vi_full, worker

# tests/cases.py "mlp": Linear(5, 4), Linear(4, 3) in float64. K-FAC factors (with the bias input) 6 x 6, 4 x 4
# (cost 6³ + 4³ = 280) and 5 x 5, 3 x 3 (152); full blocks of 24 and 15 parameters (24³ > 15³). The costlier
# block goes to rank 0, the other to rank 1.
OWN_EIGHS = {
    "kron": [[(1, 6, 6), (1, 4, 4)], [(1, 5, 5), (1, 3, 3)]],
    "full": [[(24, 24)], [(15, 15)]],
}
# Broadcast payload (float64): eigenvalues and eigenvectors of each factor, 6 + 36 + 4 + 16 and 5 + 25 + 3 + 9
# (kron), 24 + 576 and 15 + 225 (full), plus the lockstep's status vector of 2 + 4 + 2 entries.
BYTES = {"kron": 8 * (62 + 42 + 8), "full": 8 * (600 + 240 + 8)}


def _makespans(costs: list[float], owners: list[int], world_size: int) -> float:
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return max(loads)


def test_eigh_cost_is_batch_times_n_cubed():
    assert eigh_cost([(6, 6), (4, 4)]) == 280
    assert eigh_cost([(3, 5, 5), (2, 2, 4, 4)]) == 3 * 125 + 4 * 64
    assert eigh_cost([]) == 0
    with pytest.raises(ValueError, match=r"square matrices \(\.\.\., n, n\), got \(3, 4\)"):
        eigh_cost([(3, 4)])


def test_assignment_is_graham_tight_on_the_classic_instance():
    # LPT on two ranks: 3 | 3 | 2 -> rank 0 | 2 -> rank 1 | 2 -> rank 0 (tie: lower rank); makespan 7 against
    # the optimum 6 = 3 + 3 | 2 + 2 + 2, exactly Graham's bound 4/3 - 1/6 = 7/6.
    owners = assign_owners([3, 3, 2, 2, 2], 2)
    assert owners == [0, 1, 0, 1, 0]
    assert _makespans([3, 3, 2, 2, 2], owners, 2) == 7


def test_assignment_is_within_grahams_bound_of_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(30):
        world = rng.choice([2, 3])
        costs = [rng.randint(1, 50) ** 3 for _ in range(rng.randint(1, 7))]
        owners = assign_owners(costs, world)
        assert sorted(set(owners)) <= list(range(world)) and len(owners) == len(costs)  # every job owned once
        optimum = min(
            _makespans(costs, list(choice), world) for choice in itertools.product(range(world), repeat=len(costs))
        )
        assert _makespans(costs, owners, world) <= (4 / 3 - 1 / (3 * world)) * optimum + 1e-9


def test_assignment_is_deterministic_and_gives_spare_ranks_nothing():
    assert assign_owners([1, 1, 1, 1], 2) == [0, 1, 0, 1]  # ties: lower index first, to the lower rank
    costs = [8.0, 0.0, 27.0, 1.0]
    assert assign_owners(costs, 3) == assign_owners(list(costs), 3)
    assert assign_owners([5, 1, 3], 8) == [0, 2, 1]  # more ranks than blocks: one block each, ranks 3-7 idle
    assert assign_owners([], 4) == []
    assert assign_owners([4, 2, 9], 1) == [0, 0, 0]


@pytest.mark.parametrize(
    ("costs", "world_size", "message"),
    [
        ([1.0], 0, "world_size must be a positive integer, got 0"),
        ([1.0], True, "world_size must be a positive integer, got True"),
        ([1.0], 2.0, "world_size must be a positive integer, got 2.0"),
        ([1.0, -2.0], 2, r"costs must be finite and non-negative, got costs\[1\] = -2.0"),
        ([math.nan], 2, r"costs\[0\] = nan"),
        ([math.inf], 2, r"costs\[0\] = inf"),
        (["7"], 2, r"costs\[0\] = '7'"),
    ],
)
def test_assignment_refuses_bad_input(costs, world_size, message):
    with pytest.raises(ValueError, match=message):
        assign_owners(costs, world_size)


def test_broadcast_in_one_process_returns_the_tensors_and_checks_src():
    grid = ProcessGrid()
    tensors = [torch.ones(3), torch.zeros(2, dtype=torch.float64)]
    assert all(a is b for a, b in zip(grid.broadcast(tensors, src=0), tensors))
    with pytest.raises(ValueError, match=r"src must be a rank in \[0, 1\), got 1"):
        grid.broadcast(tensors, src=1)
    assert grid.bytes_communicated == 0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two_ranks(worker, tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_sharded_decompositions_are_bit_identical_to_one_process(ranks, structure):
    reference = ranks[0][f"{structure}_reference"]
    for rank in ranks:
        for key in ("update", "refresh"):
            assert rank[structure][key].keys() == reference[key].keys() == {"0", "2"}
            assert _same(rank[structure][key], reference[key]), key


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_each_rank_decomposes_only_its_share_and_broadcasts_it(ranks, structure):
    every = [shape for own in OWN_EIGHS[structure] for shape in own]
    assert sorted(ranks[0][f"{structure}_reference"]["update_eighs"]) == sorted(every)  # one process: all
    for r, rank in enumerate(ranks):
        assert rank[structure]["update_eighs"] == OWN_EIGHS[structure][r]
        assert rank[structure]["refresh_eighs"] == OWN_EIGHS[structure][r]
        assert rank[structure]["bytes"] == BYTES[structure]


def test_diagonal_blocks_are_built_locally_without_a_collective(ranks):
    for rank in ranks:
        assert rank["diag"] == {"bytes": 0, "eighs": []}


def test_a_failed_decomposition_raises_on_every_rank_and_changes_nothing(ranks):
    assert ranks[1]["failure"]["outcome"].endswith("LinAlgError: injected: did not converge")  # torch's _LinAlgError
    assert ranks[0]["failure"]["outcome"].startswith("PeerError: rank(s) [1] failed at eigendecompositions")
    for rank in ranks:
        assert rank["failure"]["unchanged"]
    assert _same(ranks[0]["failure"]["after"], ranks[1]["failure"]["after"])


def test_vi_with_full_blocks_on_two_ranks_matches_one_process_and_halves_the_decompositions(ranks):
    reference = vi_full(None, 2)  # one process drawing both MC groups' samples
    assert _same(
        {k: ranks[0]["vi_full"][k] for k in ("mean", "precision")},
        {k: ranks[1]["vi_full"][k] for k in ("mean", "precision")},
    )
    torch.testing.assert_close(ranks[0]["vi_full"]["mean"], reference["mean"])
    torch.testing.assert_close(ranks[0]["vi_full"]["precision"], reference["precision"])
    # VOGN's initial precision is isotropic and decomposed by the optimizer's constructor on every rank; the
    # three steps decompose 24 and 15 in one process, only the owner's block on each rank
    assert sorted(reference["eighs"]) == [(15, 15)] * 3 + [(24, 24)] * 3
    assert ranks[0]["vi_full"]["eighs"] == [(24, 24)] * 3
    assert ranks[1]["vi_full"]["eighs"] == [(15, 15)] * 3


def test_second_order_and_laplace_decompose_only_each_ranks_share(ranks):
    own = OWN_EIGHS["kron"]
    single = second_order(None)
    assert sorted(single["eighs"]) == sorted(2 * (own[0] + own[1]))  # step 0 and step 4's refresh, every block
    for r, rank in enumerate(ranks):
        assert rank["second_order"]["eighs"] == 2 * own[r]
        torch.testing.assert_close(rank["second_order"]["weights"], single["weights"])
    assert torch.equal(ranks[0]["second_order"]["weights"], ranks[1]["second_order"]["weights"])
    single = laplace(None)
    for r, rank in enumerate(ranks):
        assert rank["laplace"]["eighs"] == own[r]
        torch.testing.assert_close(rank["laplace"]["precision"], single["precision"])
    kept = ("precision", "bases")
    assert _same({k: ranks[0]["laplace"][k] for k in kept}, {k: ranks[1]["laplace"][k] for k in kept})
