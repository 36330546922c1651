"""Two gloo processes on CPU against one process: identical posteriors, MC groups, data parallelism.

One spawned job (2 ranks) runs every scenario and saves its results; the tests compare
them with single-process runs of the same computation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bayesso import BayesianModel
from bayesso.data import make_loader
from bayesso.distributed import ProcessGrid, finish
from bayesso.optim import VOGN, SecondOrderOptimizer
from tests.cases import CASES_BY_NAME
from tests.workers import run_two_ranks

CASE = CASES_BY_NAME["mlp"]
STEPS = 3
MIXED = {"0": "full", "2": "kron"}  # the mlp's two Linear layers


def _data():
    _, x, y = CASE.data(batch_size=16, seed=3)
    return x, y


def _module():
    return CASE.data()[0]


def _closure(optimizer, module, x, y):
    def closure():
        optimizer.zero_grad()
        loss = CASE.likelihood.nll(module(x), y) / len(y)
        loss.backward()
        return loss

    return closure


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def vi_run(grid: ProcessGrid | None, mc_samples: int, x, y, posterior: str | dict = "kron") -> dict:
    module = _module()
    model = BayesianModel(module, CASE.likelihood, posterior, prior_precision=2.0, dataset_size=64)
    optimizer = VOGN(model, mc_samples=mc_samples, lr=0.05, grid=grid, seed=7)
    for _ in range(STEPS):
        optimizer.step(_closure(optimizer, module, x, y))
    return {"mean": _flat(module), "precision": model.posterior.precision_dense()}


def second_order_run(grid: ProcessGrid | None, x, y) -> torch.Tensor:
    module = _module()
    optimizer = SecondOrderOptimizer(module, CASE.likelihood, kind="ggn", lr=0.2, grid=grid)
    for _ in range(STEPS):
        optimizer.step(_closure(optimizer, module, x, y))
    return _flat(module)


def laplace_run(grid: ProcessGrid | None, x, y) -> dict:
    model = BayesianModel(_module(), CASE.likelihood, "kron", prior_precision=0.5)
    model.fit_laplace([(x[:5], y[:5]), (x[5:], y[5:])], progress=False, grid=grid)
    return {"precision": model.posterior.precision_dense(), "evidence": model.log_marginal_likelihood()}


def predict_run(grid: ProcessGrid | None, x) -> torch.Tensor:
    model = BayesianModel(_module(), CASE.likelihood, "diag", prior_precision=3.0, dataset_size=10)
    return model.predict(x, n_samples=7, generator=torch.Generator().manual_seed(5), grid=grid).probs


def regression_fit(grid: ProcessGrid | None, x, y) -> dict:
    """``fit`` with σ learned; under a grid each rank passes its own shard."""
    torch.manual_seed(0)
    model = BayesianModel(torch.nn.Linear(3, 1).double(), "regression", "diag")
    model.fit(make_loader(x, y, len(y), shuffle=False), "vogn", epochs=3, progress=False, grid=grid, seed=7)
    return {"mean": _flat(model.module), "sigma": torch.tensor(model.likelihood.sigma_value, dtype=torch.float64)}


def _regression_data():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return x, x.sum(1, keepdim=True) + 0.3 * torch.randn(16, 1, generator=gen, dtype=torch.float64)


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = _data()
    half = slice(8 * rank, 8 * rank + 8)
    mc = ProcessGrid(rank, world, mc_groups=2)
    data = ProcessGrid(rank, world, mc_groups=1)
    results = {
        "vi_mc_groups": vi_run(mc, 1, x, y),
        "vi_data_parallel": vi_run(data, 1, x[half], y[half]),
        "vi_full_data_parallel": vi_run(data, 1, x[half], y[half], "full"),
        "vi_mixed_data_parallel": vi_run(data, 1, x[half], y[half], MIXED),
        "second_order": second_order_run(data, x[half], y[half]),
        "laplace": laplace_run(data, x[half], y[half]),
        "predict": predict_run(data, x),
        "regression_fit": regression_fit(data, *(t[half] for t in _regression_data())),
        "bytes": data.bytes_communicated + mc.bytes_communicated,
    }
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finish()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two_ranks(_worker, tmp_path_factory.mktemp("distributed"))


def _same(a, b):
    if isinstance(a, dict):
        return all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_every_rank_holds_bit_identical_state(ranks):
    for key in (
        "vi_mc_groups",
        "vi_data_parallel",
        "vi_full_data_parallel",
        "vi_mixed_data_parallel",
        "second_order",
        "laplace",
        "predict",
        "regression_fit",
    ):
        assert _same(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["bytes"] > 0


def test_two_mc_groups_of_one_sample_equal_one_process_drawing_both_samples(ranks):
    x, y = _data()
    reference = vi_run(None, 2, x, y)
    torch.testing.assert_close(ranks[0]["vi_mc_groups"]["mean"], reference["mean"])
    torch.testing.assert_close(ranks[0]["vi_mc_groups"]["precision"], reference["precision"])
    one_sample = vi_run(None, 1, x, y)
    assert not torch.allclose(one_sample["mean"], reference["mean"])  # the second sample matters


def test_two_data_parallel_ranks_on_half_batches_equal_one_process_on_the_batch(ranks):
    x, y = _data()
    reference = vi_run(None, 1, x, y)
    torch.testing.assert_close(ranks[0]["vi_data_parallel"]["mean"], reference["mean"])
    torch.testing.assert_close(ranks[0]["vi_data_parallel"]["precision"], reference["precision"])
    torch.testing.assert_close(ranks[0]["second_order"], second_order_run(None, x, y))


@pytest.mark.parametrize("key, posterior", [("vi_full_data_parallel", "full"), ("vi_mixed_data_parallel", MIXED)])
def test_two_data_parallel_ranks_equal_one_process_for_full_and_mixed_blocks(ranks, key, posterior):
    # The empirical Fisher of 16 examples leaves 8 of the 24-parameter block's eigenvalues at zero: eigh's
    # eigenvectors there differ between the summed and the one-process statistic, the samples must not.
    x, y = _data()
    reference = vi_run(None, 1, x, y, posterior)
    torch.testing.assert_close(ranks[0][key]["mean"], reference["mean"], rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[0][key]["precision"], reference["precision"], rtol=1e-12, atol=1e-12)


def test_learned_noise_is_one_sigma_from_all_shards(ranks):
    reference = regression_fit(None, *_regression_data())
    torch.testing.assert_close(ranks[0]["regression_fit"]["sigma"], reference["sigma"])
    torch.testing.assert_close(ranks[0]["regression_fit"]["mean"], reference["mean"])


def test_distributed_laplace_equals_single_process_laplace(ranks):
    x, y = _data()
    model = BayesianModel(_module(), CASE.likelihood, "kron", prior_precision=0.5)
    model.fit_laplace([(x[:5], y[:5]), (x[5:8], y[5:8]), (x[8:13], y[8:13]), (x[13:], y[13:])], progress=False)
    torch.testing.assert_close(ranks[0]["laplace"]["precision"], model.posterior.precision_dense())
    torch.testing.assert_close(ranks[0]["laplace"]["evidence"], model.log_marginal_likelihood())


def test_sharded_prediction_equals_unsharded(ranks):
    x, _ = _data()
    torch.testing.assert_close(ranks[0]["predict"], predict_run(None, x))


def test_grid_layout_and_errors():
    grid = ProcessGrid(rank=5, world_size=6, mc_groups=3)
    assert (grid.data_parallel, grid.data_rank, grid.mc_rank) == (2, 1, 2)
    assert grid.shard(11).tolist() == [5, 6, 7, 8, 9, 10] and grid.sample_slice(6) == slice(4, 6)
    assert grid.sample_slice(12, over_world=True) == slice(10, 12)
    with pytest.raises(ValueError, match="mc_groups must divide the world size 6, got 4"):
        ProcessGrid(world_size=6, mc_groups=4)
    single = ProcessGrid()
    tensors = [torch.ones(3), torch.zeros(2, dtype=torch.float64)]
    assert all(torch.equal(a, b) for a, b in zip(single.all_reduce(tensors), tensors))
    assert single.bytes_communicated == 0
    buckets = ProcessGrid(bucket_bytes=16)._buckets([torch.ones(2), torch.ones(2), torch.ones(2, dtype=torch.float64)])
    assert buckets == [[0, 1], [2]]


def _launch(command: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _example(folder: Path, epochs: int) -> list[str]:
    script = str(Path(__file__).parents[1] / "examples" / "distributed_vi.py")
    return [script, "--mc-groups", "2", "--epochs", str(epochs), "--checkpoint", str(folder / "vi.pt")]


@pytest.mark.slow
def test_the_example_runs_under_torchrun_and_resumes_from_its_checkpoints(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = _launch([*launcher, *_example(tmp_path, 1)])
    assert "epoch 1: loss" in out and "2 processes (1 data x 2 MC): accuracy" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["vi.rank0.pt", "vi.rank0.pt.previous", "vi.rank1.pt", "vi.rank1.pt.previous"]
    first = out.splitlines()[0]
    out = _launch([*launcher, *_example(tmp_path, 2)])  # epoch 1 comes from the checkpoints, epoch 2 is trained
    assert out.splitlines()[0] == first and "epoch 2: loss" in out


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs Open MPI's mpirun and mpi4py (.ci/run installs both where apt and pip allow)",
)
def test_the_example_runs_under_mpirun(tmp_path):
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, *_example(tmp_path, 1)]
    out = _launch(command)
    assert "epoch 1: loss" in out and "2 processes (1 data x 2 MC): accuracy" in out


def test_lockstep_in_one_process_passes_values_through_and_errors_unchanged():
    grid = ProcessGrid()
    with grid.lockstep("work") as shared:
        shared.values = [1.5, 2.0]
    assert shared.totals.tolist() == [1.5, 2.0] and shared.totals.dtype == torch.float64
    with pytest.raises(KeyError, match="inside"), grid.lockstep("work"):
        raise KeyError("inside")
    with pytest.raises(ValueError, match="at most 4 values, got 5"), grid.lockstep("work") as shared:
        shared.values = [0.0] * 5
