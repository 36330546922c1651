"""Progress (``bayesso.progress``): bars only in terminals, counts that advance with every item, one record per epoch.

A terminal is a stderr whose ``isatty()`` is True, which is what tqdm checks; with
``MIN_INTERVAL`` at 0 every ``update()`` redraws, so the frames written show every count.
"""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch

import bayesso.progress
from bayesso import BayesianModel
from bayesso.data import make_loader
from bayesso.demo import DemoConfig, _train_adam, small_cnn
from bayesso.ensemble import Ensemble, train_map
from bayesso.predict.metrics import evaluate
from bayesso.progress import track
from tests.cases import CASES_BY_NAME
from tests.state import assert_unchanged, snapshot

BATCHES = 5


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch) -> Terminal:
    """A terminal as stderr, every update redrawn. Called in the test itself: pytest sets sys.stderr after fixtures."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(bayesso.progress, "MIN_INTERVAL", 0.0)
    return screen


class StderrHandler(logging.StreamHandler):
    """Writes each record to sys.stderr as it is when the record comes."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@pytest.fixture
def info_records():
    """bayesso's INFO records written to stderr, as after ``logging.basicConfig(level=logging.INFO)``."""
    logger = logging.getLogger("bayesso")
    handler, level = StderrHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield
    logger.removeHandler(handler)
    logger.setLevel(level)


def _frames(screen: str, desc: str) -> list[str]:
    """The redraws of the bar named ``desc`` (tqdm starts each redraw with a carriage return)."""
    return [frame for frame in screen.split("\r") if frame.startswith(f"{desc}:")]


def _counts(frames: list[str]) -> list[int]:
    """The count n each frame shows: "n/total" for a known total, "nit" otherwise."""
    matches = [re.search(r"\| *(\d+)/\d+ \[", frame) or re.search(r": (\d+)it \[", frame) for frame in frames]
    return [int(match.group(1)) for match in matches]


def _model() -> tuple[BayesianModel, torch.utils.data.DataLoader]:
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=6 * BATCHES)
    return BayesianModel(module, case.likelihood, "diag"), make_loader(x, y, 6, seed=0)


def test_fit_in_a_terminal_shows_every_batch_counted_with_its_loss(monkeypatch):
    terminal = _terminal(monkeypatch)
    model, loader = _model()
    model.fit(loader, "vogn", epochs=2, progress=True)
    for epoch in (1, 2):
        frames = _frames(terminal.getvalue(), f"vogn {epoch}/2")
        assert _counts(frames) == list(range(BATCHES + 1))  # drawn at 0, then after each batch
        assert all("loss=" in frame and "accuracy=" in frame for frame in frames[1:])


def test_fit_off_a_terminal_writes_nothing(capfd):
    model, loader = _model()
    model.fit(loader, "vogn", epochs=3, progress=True)
    assert capfd.readouterr().err == ""


def test_fit_off_a_terminal_logs_exactly_one_line_per_epoch(capfd, info_records):
    model, loader = _model()
    history = model.fit(loader, "vogn", epochs=3, progress=True)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 3
    for line, record in zip(lines, history):
        epoch, loss, accuracy = re.fullmatch(r"fit vogn, epoch (\d)/3: loss (\S+), accuracy (\S+)", line).groups()
        assert int(epoch) == record["epoch"]
        assert float(loss) == pytest.approx(record["loss"], abs=5e-5)
        assert float(accuracy) == pytest.approx(record["accuracy"], abs=5e-4)


def test_progress_false_writes_nothing_even_in_a_terminal(monkeypatch, info_records):
    terminal = _terminal(monkeypatch)
    model, loader = _model()
    model.fit(loader, "vogn", epochs=2, progress=False)
    model.fit_laplace(loader, progress=False)
    model.optimize_prior_precision("grid", val_loader=loader, grid=[1.0], progress=False)
    model.optimize_prior_precision(progress=False)
    evaluate(model, loader, n_samples=2, progress=False)
    assert terminal.getvalue() == ""


def _laplace_model():
    model, loader = _model()
    model.fit_laplace(loader, progress=False)
    return model, loader


ENTRY_POINTS = {  # name: (call with progress, the bar's description, its total)
    "fit_laplace": (lambda m, data, p: m.fit_laplace(data, progress=p), "Laplace (ggn, diag)", BATCHES),
    "evaluate": (lambda m, data, p: evaluate(m, data, n_samples=2, progress=p), "evaluate test", BATCHES),
    "prior precision grid": (
        lambda m, data, p: m.optimize_prior_precision("grid", val_loader=data, grid=[0.1, 1.0, 10.0], progress=p),
        "prior precision grid",
        3,
    ),
    "train_map": (lambda m, data, p: train_map(m.module, data, "classification", progress=p), "adam 1/1", BATCHES),
    "ensemble fit_laplace": (
        lambda m, data, p: Ensemble([m]).fit_laplace(data, progress=p),
        "Laplace, members",
        1,
    ),
}


EDGE = "ignore:the best prior precision 0.1 is the smallest value of the grid"  # this small MLP's NLL falls with δ


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.filterwarnings(EDGE)) if "grid" in n else n for n in ENTRY_POINTS]
)
def test_long_work_counts_every_item_in_a_terminal(monkeypatch, name):
    terminal = _terminal(monkeypatch)
    call, desc, total = ENTRY_POINTS[name]
    model, loader = _laplace_model()
    call(model, loader, True)
    assert _counts(_frames(terminal.getvalue(), desc)) == list(range(total + 1))


def test_the_evidence_maximisation_counts_its_evaluations(monkeypatch):
    terminal = _terminal(monkeypatch)
    model, _ = _laplace_model()
    model.optimize_prior_precision()
    counts = _counts(_frames(terminal.getvalue(), "prior precision, evidence evaluations"))
    assert len(counts) > 2 and counts == list(range(len(counts)))


def test_the_demo_adam_bar_advances_with_its_loss(monkeypatch):
    terminal = _terminal(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    loader = make_loader(torch.randn(36, 1, 8, 8, generator=gen), torch.randint(0, 3, (36,), generator=gen), 6)
    _train_adam(small_cnn(3, width=2), loader, DemoConfig(epochs=2), progress=True)
    for epoch in (1, 2):
        frames = _frames(terminal.getvalue(), f"adam {epoch}/2")
        assert _counts(frames) == list(range(7))  # 0/6, 1/6, ..., 6/6: no longer 0/6 while the loss changes
        assert all("loss=" in frame for frame in frames[1:])


def test_track_counts_an_item_once_the_loop_is_done_with_it(monkeypatch):
    terminal = _terminal(monkeypatch)
    seen = []
    for item in track(range(3), "items", True):
        seen.append((item, _counts(_frames(terminal.getvalue(), "items"))[-1]))
    assert seen == [(0, 0), (1, 1), (2, 2)]
    assert _counts(_frames(terminal.getvalue(), "items"))[-1] == 3


def test_a_progress_that_is_not_a_bool_is_refused_before_anything_changes():
    model, loader = _model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="progress must be True or False, got 'yes'"):
        model.fit(loader, "vogn", progress="yes")
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="progress must be True or False, got None"):
        track([1], "items", None)
