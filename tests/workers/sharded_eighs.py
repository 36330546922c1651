"""One rank of the 2-gloo-process job of tests/test_sharding.py: decompositions divided across ranks.

Each scenario records, per rank, the eigendecompositions it ran (``counted_eighs``), the bytes its
grid communicated and the resulting eigenbases; a one-process reference of the same computation
runs in the same process (same threads, same LAPACK), so bit-identity can be asserted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch
import torch.distributed as dist

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.distributed import ProcessGrid, finish
from bayesso.optim import VOGN, SecondOrderOptimizer
from bayesso.posteriors import DiagonalGaussian, FullGaussian, KroneckerGaussian
from tests.cases import CASES_BY_NAME

CASE = CASES_BY_NAME["mlp"]  # Linear(5, 4) and Linear(4, 3): K-FAC factors 6, 4 and 5, 3; full blocks 24 and 15
POSTERIORS = {"kron": KroneckerGaussian, "full": FullGaussian}
BASIS_TENSORS = ("a", "QA", "g", "QG", "values", "Q")


@contextmanager
def counted_eighs() -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the matrices passed to ``torch.linalg.eigh`` inside the block."""
    shapes: list[tuple[int, ...]] = []
    original = torch.linalg.eigh

    def counting(matrix, *args, **kwargs):
        shapes.append(tuple(matrix.shape))
        return original(matrix, *args, **kwargs)

    with mock.patch.object(torch.linalg, "eigh", counting):
        yield shapes


def bases(posterior) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {key: getattr(basis, key).clone() for key in BASIS_TENSORS if hasattr(basis, key)}
        for name, basis in posterior._bases.items()
    }


def statistic(structure: str):
    """The summed curvature of the case's batch, per example (the same on every rank)."""
    module, x, y = CASE.data(batch_size=16, seed=3)
    engine = CurvatureEngine(module, CASE.likelihood, "ggn", structure)
    return module, engine.compute(x, y) * (1.0 / len(y))


def update(structure: str, grid: ProcessGrid | None) -> dict:
    module, curvature = statistic(structure)
    posterior = POSTERIORS[structure](module, prior_precision=1.0, dataset_size=16)
    before = 0 if grid is None else grid.bytes_communicated
    with counted_eighs() as updated:
        posterior.update_statistic(curvature, grid=grid)
    sent = 0 if grid is None else grid.bytes_communicated - before
    result = {"update": bases(posterior), "update_eighs": updated, "bytes": sent}
    posterior.update_statistic(curvature * 3.0, beta=0.5, refresh=False, grid=grid)
    with counted_eighs() as refreshed:
        posterior.refresh(grid)
    result.update(refresh=bases(posterior), refresh_eighs=refreshed)
    return result


def diagonal_update(grid: ProcessGrid) -> dict:
    """Diagonal blocks need no decomposition: nothing is decomposed or communicated."""
    module, curvature = statistic("diag")
    posterior = DiagonalGaussian(module, prior_precision=1.0, dataset_size=16)
    before = grid.bytes_communicated
    with counted_eighs() as shapes:
        posterior.update_statistic(curvature, grid=grid)
    return {"bytes": grid.bytes_communicated - before, "eighs": shapes}


def failing_update(grid: ProcessGrid, fail: bool) -> dict:
    """Rank 1's decomposition raises: both ranks raise, both posteriors stay as they were, and both go on."""
    module, curvature = statistic("kron")
    posterior = KroneckerGaussian(module, prior_precision=1.0, dataset_size=16)
    posterior.update_statistic(curvature, grid=grid)
    kept_statistic, kept_bases, revision = posterior.statistic, dict(posterior._bases), posterior._revision
    error = torch.linalg.LinAlgError("injected: did not converge")
    with mock.patch("bayesso.sharding.symmetric_eigh", side_effect=error) if fail else nullcontext():
        try:
            posterior.update_statistic(curvature * 2.0, beta=0.5, grid=grid)
            outcome = "ok"
        except Exception as raised:
            outcome = f"{type(raised).__name__}: {raised}"
    unchanged = (
        posterior.statistic is kept_statistic and posterior._bases == kept_bases and posterior._revision == revision
    )
    posterior.update_statistic(curvature * 2.0, beta=0.5, grid=grid)  # the ranks are still in step
    return {"outcome": outcome, "unchanged": unchanged, "after": bases(posterior)}


def vi_full(grid: ProcessGrid | None, mc_samples: int) -> dict:
    """Three VOGN steps with full blocks decomposed every step: ``mc_samples`` weight samples per MC group."""
    _, x, y = CASE.data(batch_size=16, seed=3)
    module = CASE.data()[0]
    model = BayesianModel(module, CASE.likelihood, "full", prior_precision=2.0, dataset_size=64)
    optimizer = VOGN(model, mc_samples=mc_samples, lr=0.05, inv_interval=1, grid=grid, seed=7)

    def closure():
        optimizer.zero_grad()
        loss = CASE.likelihood.nll(module(x), y) / len(y)
        loss.backward()
        return loss

    with counted_eighs() as shapes:
        for _ in range(3):
            optimizer.step(closure)
    mean = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return {"mean": mean, "precision": model.posterior.precision_dense(), "eighs": shapes}


def second_order(grid: ProcessGrid | None, rank: int = 0, world: int = 1) -> dict:
    """Five steps with the curvature every 3rd and the decompositions every 2nd: step 0 updates and decomposes,
    step 3 updates without, step 4 refreshes the stale decompositions (``Posterior.refresh``)."""
    _, x, y = CASE.data(batch_size=16, seed=3)
    part = slice(16 * rank // world, 16 * (rank + 1) // world)
    module = CASE.data()[0]
    optimizer = SecondOrderOptimizer(module, CASE.likelihood, "ggn", curv_interval=3, inv_interval=2, grid=grid)

    def closure():
        optimizer.zero_grad()
        loss = CASE.likelihood.nll(module(x[part]), y[part]) / len(y[part])
        loss.backward()
        return loss

    with counted_eighs() as shapes:
        for _ in range(5):
            optimizer.step(closure)
    return {"weights": torch.cat([p.detach().reshape(-1) for p in module.parameters()]), "eighs": shapes}


def laplace(grid: ProcessGrid | None, rank: int = 0, world: int = 1) -> dict:
    """A K-FAC Laplace fit on this rank's share of the batch."""
    _, x, y = CASE.data(batch_size=16, seed=3)
    part = slice(16 * rank // world, 16 * (rank + 1) // world)
    model = BayesianModel(CASE.data()[0], CASE.likelihood, "kron", prior_precision=0.5)
    with counted_eighs() as shapes:
        model.fit_laplace([(x[part], y[part])], progress=False, grid=grid)
    return {"precision": model.posterior.precision_dense(), "bases": bases(model.posterior), "eighs": shapes}


def worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grid = ProcessGrid(rank, world)
    results = {
        "kron": update("kron", grid),
        "full": update("full", grid),
        "kron_reference": update("kron", None),
        "full_reference": update("full", None),
        "diag": diagonal_update(grid),
        "failure": failing_update(grid, fail=rank == 1),
        "vi_full": vi_full(ProcessGrid(rank, world, mc_groups=2), 1),
        "second_order": second_order(grid, rank, world),
        "laplace": laplace(grid, rank, world),
    }
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finish()
