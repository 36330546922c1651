"""What a run writes: metrics per epoch as JSON lines, and at the end the calibration report of ``bayesso demo``.

``metrics.jsonl`` holds one JSON object per epoch (``epoch``, ``train_loss``, ``test_accuracy``,
``test_nll``, ``test_ece``, ``lr``, ``wall_time``: seconds since the run started, resumed runs included).
``write_report`` scores the final predictive with ``classification_metrics`` (OOD: Gaussian noise
images) and writes ``metrics.json``, ``report.md`` (the demo's table, ``bayesso.demo.format_table``, and
its extra metrics), ``reliability.png`` and ``ood_scores.png`` (``bayesso.predict.plots``, when
matplotlib is installed). ``bayesso.demo_report.write_report`` itself describes the demo's digits 0-4
study in its text and needs OOD digits, so its parts are used here rather than the whole.
"""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path

import torch
from config import Config
from torch import Tensor

from bayesso.demo import MethodResult, format_table
from bayesso.demo_report import EXTRA_METRICS
from bayesso.predict.metrics import classification_metrics

__all__ = ["METHOD_TITLES", "append_metrics", "write_metrics", "write_report"]

METHOD_TITLES = {"adam": "Adam", "kfac": "K-FAC", "vogn": "VOGN", "noisy_kfac": "noisy K-FAC", "ivon": "IVON"}


def write_metrics(path: Path, history: list[dict]) -> None:
    """Start ``path`` afresh with the records of ``history`` (a resumed run's earlier epochs), one JSON line each."""
    path.write_text("".join(json.dumps(record) + "\n" for record in history))


def append_metrics(path: Path, record: dict) -> None:
    """Add one epoch's record to the JSON lines file ``path``."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def write_report(
    out: Path, name: str, config: Config, history: list[dict], probs: Tensor, targets: Tensor, ood_probs: Tensor
) -> list[Path]:
    """Write metrics.json, report.md and the figures of the final predictive to ``out``; returns the paths."""
    title = f"{METHOD_TITLES[config.method.name]}, {config.model.name} on {config.data.name}"
    metrics = classification_metrics(probs, targets, ood_probs)
    result = MethodResult(title, config.method.name, [{**metrics, "seconds": history[-1]["wall_time"]}])
    result.probs, result.ood_probs = probs, ood_probs
    record = {"name": name, "config": config.raw, "final": result.runs[0], "history": history,
              "n_test": len(targets), "n_ood": len(ood_probs), "torch": torch.__version__,
              "python": platform.python_version()}  # fmt: skip
    paths = [out / "metrics.json"]
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    figures = _figures(out, result, targets)
    paths += [*figures, out / "report.md"]
    paths[-1].write_text(_markdown(name, config, result, len(targets), figures))
    return paths


def _figures(out: Path, result: MethodResult, targets: Tensor) -> list[Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed, so no figures: pip install 'bayesso[plot]'", stacklevel=3)
        return []
    from bayesso.predict.plots import ood_histogram, reliability_diagram

    reliability, scores = out / "reliability.png", out / "ood_scores.png"
    reliability_diagram(result.probs, targets, title=result.name).savefig(reliability, dpi=110)
    figure = ood_histogram(result.probs.max(1).values, result.ood_probs.max(1).values, title=result.name)
    figure.savefig(scores, dpi=110)
    return [reliability, scores]


def _markdown(name: str, config: Config, result: MethodResult, n_test: int, figures: list[Path]) -> str:
    samples = config.mc_samples.test
    predictive = f"{samples} weight samples per prediction" if samples else "predictions at the weights (the mean)"
    lines = [
        f"# {name}: {result.name}",
        "",
        f"{config.schedule.epochs} epochs at batch {config.data.batch_size} ({config.schedule.lr} lr schedule), "
        f"{predictive}, scored on the {n_test} test images. OOD AUROC separates the test images from Gaussian "
        "noise images by the maximum predicted probability; ECE uses 15 equal-width bins. Time is the whole run "
        "(training and the evaluation after every epoch).",
        "",
        format_table([result]),
        "",
        "| " + " | ".join(title for _, title in EXTRA_METRICS) + " |",
        "|" + "---:|" * len(EXTRA_METRICS),
        "| " + " | ".join(f"{100 * result.runs[0][metric]:.2f}" for metric, _ in EXTRA_METRICS) + " |",
    ]
    lines += [""] + [f"![{path.stem}]({path.name})" for path in figures]
    return "\n".join(lines) + "\n"
