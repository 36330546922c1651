"""The ``bayesso demo`` report: report.md, metrics.json and PNG figures in an output folder."""

from __future__ import annotations

import json
import platform
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from bayesso.demo import IN_CLASSES, DemoConfig, MethodResult, Study, compare_with_adam, format_table

__all__ = ["write_report"]

EXTRA_METRICS = [("mce", "MCE (%)"), ("classwise_ece", "classwise ECE (%)"),
                 ("auroc_entropy", "OOD AUROC, entropy (%)"), ("fpr_at_95_tpr", "FPR at 95% TPR (%)")]  # fmt: skip


def write_report(study: Study, out: Path) -> list[Path]:
    """Write metrics.json, reliability_<method>.png, ood_scores.png and report.md; returns the paths written.

    The figures show the first seed. Without matplotlib (the ``plot`` extra) they are skipped with a warning.
    """
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.json"
    record = {
        "config": asdict(study.config),
        "in_classes": list(IN_CLASSES),
        "n_test": len(study.targets),
        "n_ood": len(study.methods[0].ood_probs),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "methods": {
            r.key: {
                "name": r.name,
                "mean": {metric: r.mean(metric) for metric in r.runs[0]},
                "std": {metric: r.std(metric) for metric in r.runs[0]},
                "runs": r.runs,
                "notes": r.notes,
            }
            for r in study.methods
        },
    }
    metrics.write_text(json.dumps(record, indent=2) + "\n")
    figures = _figures(study, out)
    report = out / "report.md"
    report.write_text(_markdown(study.methods, study.config, figures, len(study.targets)))
    return [metrics, *figures, report]


def _figures(study: Study, out: Path) -> list[Path]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed, so no figures: pip install 'bayesso[plot]'", stacklevel=3)
        return []
    from bayesso.predict.plots import ood_histogram, reliability_diagram

    paths = []
    for r in study.methods:
        paths.append(out / f"reliability_{r.key}.png")
        reliability_diagram(r.probs, study.targets, title=r.name).savefig(paths[-1], dpi=110)
    figure = Figure(figsize=(4.2 * len(study.methods), 3.6), layout="constrained")
    for r, ax in zip(study.methods, figure.subplots(1, len(study.methods))):
        ood_histogram(r.probs.max(1).values, r.ood_probs.max(1).values, ax=ax, title=r.name)
    paths.append(out / "ood_scores.png")
    figure.savefig(paths[-1], dpi=110)
    return paths


def _markdown(results: list[MethodResult], config: DemoConfig, figures: list[Path], n_test: int) -> str:
    seeds = f"mean ± standard deviation over {config.seeds} seeds" if config.seeds > 1 else "one seed"
    lines = [
        "# bayesso demo: calibration on scikit-learn digits",
        "",
        f"A small CNN (width {config.width}) is trained on digits 0-4: {config.epochs} epochs at batch "
        f"{config.batch_size}, each optimizer at its default learning rate. "
        f"{100 * config.test_fraction:.0f}% of the images are the test set ({n_test} for seed 0) and "
        f"{100 * config.validation_fraction:.0f}% of the rest are held out for temperature scaling. "
        "OOD AUROC separates the test images from digits 5-9 by the maximum predicted probability; "
        "ECE uses 15 equal-width bins. VI and Laplace at their defaults (prior precision 1, temperature 1; "
        f"Laplace's prior tuned on the validation split), {config.samples} weight samples per prediction. "
        f"Time includes training and prediction. {seeds}.",
        "",
        format_table(results),
        "",
        "Compared with Adam (means over seeds):",
        "",
        *[f"- {line}" for line in compare_with_adam(results)],
        "",
        "| method | " + " | ".join(title for _, title in EXTRA_METRICS) + " |",
        "|---|" + "---:|" * len(EXTRA_METRICS),
    ]
    for r in results:
        cells = [f"{100 * r.mean(metric):.2f}" for metric, _ in EXTRA_METRICS]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "Temperature scaling and Laplace per seed:", ""]
    lines += [f"- {r.name}, seed {seed}: {note}" for r in results for seed, note in enumerate(r.notes) if note]
    if figures:
        lines += ["", "## Reliability diagrams (seed 0)", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures if p.stem.startswith("reliability")]
        lines += ["", "## In- vs out-of-distribution confidence (seed 0)", "", "![ood scores](ood_scores.png)"]
    return "\n".join(lines) + "\n"
