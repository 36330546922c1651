"""Calibration and uncertainty benchmark beyond digits: every method at its defaults on 8 tasks.

Tasks (``suite_tasks.py``, bundled or generated data only): digits with a CNN and an MLP (OOD:
the held-out digits 5-9; shifts: Gaussian pixel noise, blur and translation at 3 severities),
generated 1-D signals with 12,000 training examples (OOD: unseen frequencies), breast cancer
(binary) and wine (3 classes) as tabular sets with feature noise as shift, and regression on
diabetes, a generated heteroscedastic set and a 1-D set with a gap between its two input clusters.

Methods: Adam (MAP), Adam + temperature scaling (classification), a 5-member deep ensemble,
VOGN, noisy Adam, noisy K-FAC, IVON and Bayes by Backprop (``fit(method="bbb")``, with Pyro) at
their defaults, for regression also noisy K-FAC with the heteroscedastic likelihood, post-hoc
Laplace by the README's recipe on the Adam MAP (last-layer Kronecker GGN, δ by validation NLL),
and the ensemble of the deep ensemble's Laplace posteriors.
Regression MAPs (Adam, the deep ensemble's members) get σ by maximum likelihood on their training
residuals.

Writes ``suite.md`` (tables) and ``suite.json`` (every number) to ``--out``::

    python benchmarks/suite.py --seeds 1 --out suite-results
    python benchmarks/suite.py --tasks digits_cnn,gap --methods adam,vogn
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_tasks import TASKS, Task

from bayesso import BayesianModel
from bayesso.data import make_loader
from bayesso.ensemble import Ensemble, deep_ensemble, train_map
from bayesso.model import default_predictive
from bayesso.predict.metrics import classification_metrics
from bayesso.predict.predictive import Predictive
from bayesso.predict.temperature import TemperatureScaling
from bayesso.progress import track

VI = {"vogn": "diag", "noisy_adam": "diag", "noisy_kfac": "kron", "ivon": "diag", "bbb": "diag"}
METHODS = ["adam", "adam_ts", "deep_ensemble", *VI, "noisy_kfac_heteroscedastic", "laplace", "laplace_ensemble"]
NAMES = {
    "adam": "Adam (MAP)",
    "adam_ts": "Adam + temperature scaling",
    "deep_ensemble": "deep ensemble (5)",
    "vogn": "VOGN",
    "noisy_adam": "noisy Adam",
    "noisy_kfac": "noisy K-FAC",
    "ivon": "IVON",
    "bbb": "Bayes by Backprop (Pyro)",
    "noisy_kfac_heteroscedastic": "noisy K-FAC, heteroscedastic likelihood",
    "laplace": "Laplace (recipe)",
    "laplace_ensemble": "ensemble of 5 Laplace posteriors",
}
SAMPLES = 32


def _inputs(task: Task) -> dict[str, Tensor]:
    """Every input set a method predicts: the test set, OOD inputs, shifted and extra test sets."""
    sets = {"test": task.x_test, **task.shifts, **{name: x for name, (x, _) in task.extra_tests.items()}}
    if task.x_ood is not None:
        sets["ood"] = task.x_ood
    return sets


def _predictor(method: str, task: Task, seed: int, cache: dict):
    """A function x -> Predictive-like result for ``method`` (trained here), or None if it does not apply."""
    loader = make_loader(task.x_train, task.y_train, task.batch_size, seed=seed)

    def adam() -> BayesianModel:
        if "adam" not in cache:
            torch.manual_seed(seed)
            cache["adam"] = train_map(task.build(), loader, task.likelihood, task.epochs, progress=False)
        return cache["adam"]

    def members() -> Ensemble:
        if "ensemble" not in cache:
            cache["ensemble"] = deep_ensemble(task.build, loader, task.likelihood, k=5, epochs=task.epochs,
                                              seed=100 * seed, progress=False)  # fmt: skip
        return cache["ensemble"]

    if method == "adam":
        model = adam()
        return lambda x: Ensemble([model]).predict(x, method="map")
    if method == "adam_ts":
        if not task.classification:
            return None
        model = adam()
        with torch.no_grad():
            scaler = TemperatureScaling().fit(_logits(model, task.x_val), task.y_val.long())
        return lambda x: _scaled(scaler, model, x)
    if method == "deep_ensemble":
        ensemble = members()
        return lambda x: ensemble.predict(x, method="map")
    if method == "noisy_kfac_heteroscedastic":
        if task.build_heteroscedastic is None:
            return None
        torch.manual_seed(seed)
        model = BayesianModel(task.build_heteroscedastic(), "heteroscedastic", posterior="kron")
        model.fit(loader, "noisy_kfac", task.epochs, progress=False, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        return lambda x: model.predict(x, n_samples=SAMPLES, generator=generator)
    if method in VI:
        torch.manual_seed(seed)
        model = BayesianModel(task.build(), task.likelihood, posterior=VI[method])
        model.fit(loader, method, task.epochs, progress=False, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        return lambda x: model.predict(x, n_samples=SAMPLES, generator=generator)
    val_loader = make_loader(task.x_val, task.y_val, 256, shuffle=False)
    generator = torch.Generator().manual_seed(seed)
    if method == "laplace":
        model = _laplace(adam(), loader, val_loader)
        return lambda x: model.predict(x, n_samples=SAMPLES, generator=generator)
    laplace = Ensemble([_laplace(m, loader, val_loader) for m in members()])
    return lambda x: laplace.predict(x, n_samples=SAMPLES, generator=generator)


def _laplace(map_model: BayesianModel, loader, val_loader) -> BayesianModel:
    """The Laplace recipe of the README: last-layer Kronecker GGN, δ by validation NLL of ``predict``'s default."""
    model = BayesianModel(map_model.module, map_model.likelihood, posterior="kron")
    model.fit_laplace(loader, modules="last_layer", progress=False)
    predictive = default_predictive(model.likelihood)
    model.optimize_prior_precision("grid", val_loader=val_loader, predictive=predictive, grid=torch.logspace(-2, 4, 13))
    return model


def _logits(model: BayesianModel, x: Tensor) -> Tensor:
    model.module.eval()
    out = model.module(x)
    return torch.stack([torch.zeros_like(out[:, 0]), out[:, 0]], 1) if out.shape[1] == 1 else out


def _scaled(scaler: TemperatureScaling, model: BayesianModel, x: Tensor) -> Predictive:
    with torch.no_grad():
        probs = scaler.probs(_logits(model, x))
    return Predictive(probs=probs[:, 1] if model.likelihood.name == "binary" else probs)


def _gaussian_scores(predictive, y: Tensor) -> dict[str, float]:
    mean, variance = predictive.mean.double(), predictive.variance.double()
    y = y.double().reshape(mean.shape)
    nll = 0.5 * (torch.log(2 * math.pi * variance) + (y - mean).square() / variance)
    return {"rmse": float((y - mean).square().mean().sqrt()), "nll": float(nll.mean())}


def score(task: Task, predict) -> dict[str, float]:
    """Metrics of one trained method: in distribution, per shift, OOD (classification) or per extra set."""
    with torch.no_grad():
        outputs = {name: predict(x) for name, x in _inputs(task).items()}
    if not task.classification:
        scores = _gaussian_scores(outputs["test"], task.y_test)
        for name, (_, y) in task.extra_tests.items():
            scores.update({f"{key} ({name})": v for key, v in _gaussian_scores(outputs[name], y).items()})
        return scores
    ood = outputs["ood"].probs if "ood" in outputs else None
    metrics = classification_metrics(outputs["test"].probs, task.y_test.long(), ood)
    scores = {key: metrics[key] for key in ("accuracy", "nll", "ece", "brier", "auroc") if key in metrics}
    for name in task.shifts:
        shifted = classification_metrics(outputs[name].probs, task.y_test.long())
        scores[f"nll ({name})"], scores[f"ece ({name})"] = shifted["nll"], shifted["ece"]
    return scores


def run(tasks: list[str], methods: list[str], seeds: int, progress: bool) -> dict:
    """{task: {method: [per-seed scores with "seconds"]}}."""
    results: dict = {}
    jobs = [(t, s) for t in tasks for s in range(seeds)]
    for task_key, seed in track(jobs, "suite", progress):
        task, cache = TASKS[task_key](seed), {}
        for method in methods:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                predict = _predictor(method, task, seed, cache)
                if predict is None:
                    continue
                scores = score(task, predict)
            scores["seconds"] = time.perf_counter() - start
            scores["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
            results.setdefault(task.name, {}).setdefault(method, []).append(scores)
            if progress:  # tqdm.write keeps the bar below the line on a terminal
                tqdm.write(f"{task.name}, seed {seed}, {method}: NLL {scores['nll']:.4f} ({scores['seconds']:.1f} s)",
                           file=sys.stderr)  # fmt: skip
    return results


def _mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def markdown(results: dict) -> str:
    """One table per task (means over seeds), then the summary of NLL per task and method."""
    out = []
    for task, methods in results.items():
        runs = next(iter(methods.values()))
        keys = [k for k in runs[0] if k != "warnings" and " (" not in k]
        shifted = sorted({k.split(" (")[1][:-1] for k in runs[0] if " (" in k})
        keys += [f"{m} ({s})" for s in shifted for m in ("rmse", "nll", "ece") if f"{m} ({s})" in runs[0]]
        keys = [k for k in keys if k != "seconds"] + ["seconds"]
        out += [f"### {task}", "", "| method | " + " | ".join(keys) + " |", "|---" + "|---:" * len(keys) + "|"]
        for method, method_runs in methods.items():
            cells = [f"{_mean(method_runs, k):.3f}" if k in method_runs[0] else "" for k in keys]
            out.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
        out.append("")
    all_methods = [m for m in METHODS if any(m in methods for methods in results.values())]
    out += ["### NLL on the test set (lower is better)", "", "| task | " + " | ".join(NAMES[m] for m in all_methods)
            + " |", "|---" + "|---:" * len(all_methods) + "|"]  # fmt: skip
    for task, methods in results.items():
        cells = [f"{_mean(methods[m], 'nll'):.3f}" if m in methods else "" for m in all_methods]
        out.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default="suite-results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = sorted(set(tasks) - set(TASKS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown tasks or methods: {unknown}")
    torch.set_num_threads(args.threads)
    results = run(tasks, methods, args.seeds, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "suite.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
