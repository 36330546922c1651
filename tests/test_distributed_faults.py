"""Faults under two gloo processes: an error on one rank is an error on every rank, never a hang or a silent
desynchronisation; a stopped rank is bounded by ``init(timeout=...)``; torchrun restarts resume from checkpoints.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bayesso import BayesianModel
from bayesso.distributed import finish, init
from bayesso.optim import VOGN
from tests.cases import CASES_BY_NAME

CASE = CASES_BY_NAME["mlp"]
ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _model():
    module, _, _ = CASE.data()
    return BayesianModel(module, CASE.likelihood, "diag", prior_precision=2.0, dataset_size=64)


def _batches(rank: int, steps: int = 5):
    _, x, y = CASE.data(batch_size=16 * steps, seed=3)
    halves = [slice(16 * s + 8 * rank, 16 * s + 8 * rank + 8) for s in range(steps)]
    return [(x[half], y[half]) for half in halves]


def _closure(optimizer, model, x, y, fail: bool = False):
    def closure():
        optimizer.zero_grad()
        loss = CASE.likelihood.nll(model.module(x), y) / len(y)
        if fail:
            raise RuntimeError("boom in the closure")
        loss.backward()
        return loss

    return closure


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])


def _attempt(outcome: dict, key: str, call) -> None:
    try:
        call()
        outcome[key] = "ok"
    except Exception as error:
        outcome[key] = f"{type(error).__name__}: {error}"


def survivable(grid, rank: int, outcome: dict) -> None:
    """Faults after which both ranks raised at the same point, so the job can go on."""
    model = _model()
    optimizer = VOGN(model, lr=0.05, grid=grid, seed=7)
    batches = _batches(rank)
    optimizer.step(_closure(optimizer, model, *batches[0]))
    outcome["after_first"] = _flat(model)
    # 1. rank 1's closure raises: rank 1 raises its error, rank 0 a PeerError; nothing changes on either
    _attempt(outcome, "exception", lambda: optimizer.step(_closure(optimizer, model, *batches[1], fail=rank == 1)))
    outcome["after_exception"] = _flat(model)
    # 2. both catch their errors and go on: still in step, the same state on both ranks
    for x, y in batches[2:4]:
        optimizer.step(_closure(optimizer, model, x, y))
    outcome["after_going_on"] = _flat(model)
    # 3. rank 1 takes one step more (an uneven shard) while rank 0 goes on to predict: both raise
    if rank == 1:
        _attempt(outcome, "out_of_step", lambda: optimizer.step(_closure(optimizer, model, *batches[4])))
    else:
        _attempt(outcome, "out_of_step", lambda: model.predict(batches[0][0], n_samples=4, grid=grid))


def one_rank_goes_on(grid, rank: int, outcome: dict) -> None:
    """Rank 1 catches its own error and steps on; rank 0 stops at its PeerError and leaves."""
    model = _model()
    optimizer = VOGN(model, lr=0.05, grid=grid, seed=7)
    batches = _batches(rank)
    optimizer.step(_closure(optimizer, model, *batches[0]))
    _attempt(outcome, "exception", lambda: optimizer.step(_closure(optimizer, model, *batches[1], fail=rank == 1)))
    if rank == 1:
        _attempt(outcome, "next_step", lambda: optimizer.step(_closure(optimizer, model, *batches[2])))


def stopped(grid, rank: int, outcome: dict) -> None:
    """Rank 1 stops itself (SIGSTOP) in the middle of a step: rank 0 fails within the timeout."""
    model = _model()
    optimizer = VOGN(model, lr=0.05, grid=grid, seed=7)
    batches = _batches(rank)
    optimizer.step(_closure(optimizer, model, *batches[0]))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    _attempt(outcome, "step", lambda: optimizer.step(_closure(optimizer, model, *batches[1])))


SCENARIOS = {"survivable": survivable, "one_rank_goes_on": one_rank_goes_on, "stopped": stopped}


def _worker(rank: int, port: int, folder: str, scenario: str, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    grid = init(timeout=timeout)
    outcome: dict = {}
    started = time.monotonic()
    try:
        SCENARIOS[scenario](grid, rank, outcome)
    finally:
        outcome["seconds"] = time.monotonic() - started
        torch.save(outcome, os.path.join(folder, f"rank{rank}.pt"))
        finish()


def _run(scenario: str, folder: Path, timeout: float, wait: float = 120.0) -> list[dict | None]:
    """Both ranks' outcomes (None for a rank that left none); ranks still running after ``wait`` are killed."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_worker, args=(r, port, str(folder), scenario, timeout)) for r in range(2)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not (folder / "rank0.pt").exists():
        time.sleep(0.2)
    deadline = min(deadline, time.monotonic() + timeout + 5)  # rank 0 is done: the others get a grace period
    for process in processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    return [torch.load(folder / f"rank{r}.pt") if (folder / f"rank{r}.pt").exists() else None for r in range(2)]


def test_an_error_on_one_rank_is_an_error_on_every_rank_and_the_ranks_stay_in_step(tmp_path):
    ranks = _run("survivable", tmp_path, timeout=60)
    assert ranks[1]["exception"] == "RuntimeError: boom in the closure"
    assert ranks[0]["exception"].startswith("PeerError: rank(s) [1] failed at optimizer step")
    for outcome in ranks:  # the failed step changed nothing, and the ranks went on together
        assert torch.equal(outcome["after_exception"], outcome["after_first"])
        assert not torch.equal(outcome["after_going_on"], outcome["after_first"])
    assert torch.equal(ranks[0]["after_going_on"], ranks[1]["after_going_on"])
    for outcome in ranks:
        assert outcome["out_of_step"].startswith("PeerError: the ranks are out of step")


def test_a_rank_that_goes_on_alone_gets_an_error_not_a_hang(tmp_path):
    ranks = _run("one_rank_goes_on", tmp_path, timeout=8)
    assert ranks[0]["exception"].startswith("PeerError: rank(s) [1] failed")
    assert ranks[1]["exception"] == "RuntimeError: boom in the closure"
    assert ranks[1]["next_step"].startswith("PeerError: rank 1: no answer from the other ranks at optimizer step")


def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    ranks = _run("stopped", tmp_path, timeout=5, wait=90)
    assert ranks[0]["step"].startswith("PeerError: rank 0: no answer from the other ranks at optimizer step")
    assert ranks[1] is None  # stopped, then killed by the test


def test_init_refuses_a_bad_timeout():
    for timeout in (0, -1.0, float("inf"), "10"):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds or a timedelta"):
            init(timeout=timeout)


def _fit_job(out: Path, launcher: list[str], script: list[str]) -> subprocess.CompletedProcess:
    out.mkdir()
    endpoint = f"--rdzv-endpoint=127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d", endpoint,
               "--monitor-interval=0.2", *launcher, str(ROOT / "tests" / "workers" / "resumable_fit.py"), "--out",
               str(out), *script]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_job_resumes_from_its_checkpoints(tmp_path):
    reference = _fit_job(tmp_path / "reference", [], [])
    assert reference.returncode == 0, reference.stderr[-3000:]
    # rank 1 kills itself (SIGKILL) in epoch 2, after checkpoints at steps 4 and 8 of its shard's 6 batches/epoch
    script = ["--checkpoint", str(tmp_path / "run.pt"), "--kill-at-fetch", "185"]
    restarted = _fit_job(tmp_path / "restarted", ["--max-restarts=1"], script)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "exitcode: -9" in restarted.stderr  # the kill happened, and the agent restarted the job
    for rank in range(2):
        expected = torch.load(tmp_path / "reference" / f"rank{rank}.pt", weights_only=False)
        actual = torch.load(tmp_path / "restarted" / f"rank{rank}.pt", weights_only=False)
        assert actual["history"] == expected["history"] and actual["posterior"]["dataset_size"] == 240
        for key, value in expected["module"].items():
            assert torch.equal(actual["module"][key], value), key
        for name, tensors in expected["posterior"]["statistic"].items():
            assert all(torch.equal(a, b) for a, b in zip(actual["posterior"]["statistic"][name], tensors)), name
