"""``bayesso curvature``: the curvature engine on the bundled digits data.

Trains a small CNN with Adam, then computes every curvature kind x structure over
a fixed set of training images (summing batch curvatures with ``+``) and compares
each with the exact GGN, block-diagonal over modules, in one table. The exact Hessian
takes one Hessian-vector product per parameter (6,090 backward passes per row) and most
of the time; ``hessian=False`` (``bayesso curvature --quick``) leaves its rows out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from bayesso.curvature import KINDS, STRUCTURES, Curvature, CurvatureEngine
from bayesso.data import load_digits, make_loader
from bayesso.demo import small_cnn
from bayesso.progress import check_progress, progress_bar, track

__all__ = ["CurvatureComparisonConfig", "format_table", "run_comparison"]


@dataclass
class CurvatureComparisonConfig:
    """Adam ``epochs`` at ``batch_size``, curvature over the first ``curvature_examples`` training images;
    ``hessian``: include the exact-Hessian rows (diag and full)."""

    epochs: int = 8
    curvature_examples: int = 256
    batch_size: int = 64
    seed: int = 0
    hessian: bool = True


def _train(model: nn.Module, loader, epochs: int, progress: bool) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        correct = seen = 0
        with progress_bar(len(loader), f"Adam epoch {epoch + 1}/{epochs}", progress) as bar:
            for x, y in loader:
                optimizer.zero_grad()
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
                loss.backward()
                optimizer.step()
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}", refresh=False)
                bar.update()


def _curvature(engine: CurvatureEngine, loader) -> Curvature:
    total = None
    generator = torch.Generator().manual_seed(0)
    for x, y in loader:
        part = engine.compute(x, y, generator=generator)
        total = part if total is None else total + part
    return total


def run_comparison(config: CurvatureComparisonConfig, progress: bool = True) -> list[dict]:
    """Train, then one row per kind x structure: time, trace and error against the exact GGN.

    ``progress``: bars over the training batches and the kinds x structures (``bayesso.progress``).
    """
    check_progress(progress)
    torch.manual_seed(config.seed)
    data = load_digits(seed=config.seed)
    model = small_cnn(data.n_classes)
    _train(model, make_loader(data.x_train, data.y_train, config.batch_size, seed=config.seed), config.epochs, progress)
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    n = config.curvature_examples
    loader = make_loader(data.x_train[:n], data.y_train[:n], batch_size=128, shuffle=False)
    start = time.perf_counter()
    exact = _curvature(CurvatureEngine(model, "classification", "ggn", "full"), loader)
    exact_seconds = time.perf_counter() - start
    reference = exact.to_dense()
    rows = []
    cases = [(k, s) for k in KINDS for s in STRUCTURES if k != "hessian" or (config.hessian and s != "kron")]
    for kind, structure in track(cases, "curvature kinds x structures", progress):
        if (kind, structure) == ("ggn", "full"):  # the reference itself, not computed twice
            curvature, seconds = exact, exact_seconds
        else:
            start = time.perf_counter()
            curvature = _curvature(CurvatureEngine(model, "classification", kind, structure), loader)
            seconds = time.perf_counter() - start
        dense = curvature.to_dense()
        rows.append(
            {
                "kind": kind,
                "structure": structure,
                "seconds": seconds,
                "trace": float(dense.trace()),
                "error_vs_ggn": float((dense - reference).norm() / reference.norm()),
                "diag_error_vs_ggn": float(
                    (dense.diagonal() - reference.diagonal()).norm() / reference.diagonal().norm()
                ),
                "test_accuracy": accuracy,
            }
        )
    return rows


def format_table(rows: list[dict], config: CurvatureComparisonConfig) -> str:
    lines = [
        f"Small CNN (6,090 parameters) trained with Adam on scikit-learn digits: test accuracy "
        f"{rows[0]['test_accuracy']:.3f}.",
        f"Curvature of the summed NLL over {config.curvature_examples} training images, compared with the exact "
        "GGN (block-diagonal over modules):",
        "",
        "| kind | structure | time (s) | trace | rel. error vs GGN (Frobenius) | rel. error of the diagonal |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['structure']} | {r['seconds']:.2f} | {r['trace']:.1f} | {r['error_vs_ggn']:.3f} "
            f"| {r['diag_error_vs_ggn']:.3f} |"
        )
    if not config.hessian:
        lines += ["", "The exact-Hessian rows are left out (--quick); run without --quick to include them."]
    return "\n".join(lines)
