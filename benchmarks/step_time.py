"""Per-step time and peak memory of bayesso's optimizers and K-FAC factors, relative to Adam / SGD, beside peers.

Prints two markdown tables, rows = optimizers (benchmarks/step_cases.py), columns = models: step time / the
baseline's step time, and peak memory / the baseline's. Baselines: ``torch.optim.Adam`` (lr 1e-3), and for
``SecondOrderOptimizer`` also ``torch.optim.SGD`` (momentum 0.9), the row "× SGD". The models are the
MLP 64-128-128-10, MLP 64-512-512-10 and two CNNs of benchmarks/models.py on 8x8 digits (batch 128) and a
ResNet-18 on random 3x32x32 inputs (batch 8, 3 repeats: its Adam step alone takes seconds on 2 cores; its
K-FAC steps run only on request, see SLOW_BY_DEFAULT); one MC sample per step; the VI presets run on a
BayesianModel with the small-data recipe (prior precision 50, temperature 0.01) and noisy K-FAC with its
default refresh intervals; the IVON drop-in and ivon-opt share hyperparameters (bayesso's α = 0.2, h0 = 0.5,
β2 = 0.999, weight decay 1e-4, ess 1,437; ivon-opt's lr = α / (h0 + weight decay)); the factor rows time one
K-FAC factor computation (Linear and Conv2d modules, KFAC-expand) against one Adam step.

Each (model, optimizer) runs in a fresh subprocess (``--quick``: one subprocess per model). There the peak
memory of the case and of each baseline is the peak of live CPU tensor memory that building it on a fresh copy
of the model and 2 steps add (the profiler's allocation events, benchmarks/peak_memory.py: parameters,
gradients, optimizer state, activations and temporaries); those steps are also the warm-up. Then the case's and
the baselines' steps are timed alternately on those copies (same initial weights, same batch), in blocks of one
refresh cycle (10 steps for intervals 10), and each ratio is of the medians of the blocks.
Peers are optional: ivon-opt (``pip install 'bayesso[bench]'``) and curvlinops, which is not in the extra:
its dependency backpack pulls in torchvision, which beside the CPU torch breaks torchmetrics (a dependency of
the test extra). curvlinops' K-FAC needs no torchvision, so install it without dependencies:
``pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einops einconv unfoldNd linear_operator``.
When curvlinops is present, the script first checks on the small CNN that its exact factors equal the engine's
(benchmarks/kfac_factor_check.py states the conventions). Run: python benchmarks/step_time.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from isolated import run_isolated
from models import INPUT_SHAPES, STEP_TIME_MODELS
from peak_memory import peak_growth_mib
from step_cases import BASELINES, CASES, INSTALL, available

from bayesso.data import load_digits

DEFAULTS = {"batch_size": 128, "repeats": 25}  # per model unless overridden: ResNet-18 below
RESNET_DEFAULTS = {"batch_size": 8, "repeats": 3}
QUICK_REPEATS = 3  # ResNet-18: 1
# Left out by default (run them by naming them in --optimizers): every refresh decomposes ResNet-18's K-FAC
# factors (three 4608 x 4608 ones in the last stage), minutes on 2 CPU cores, and a refresh cycle is 10 steps.
SLOW_BY_DEFAULT = {"resnet18": ("noisy_kfac", "kfac10", "kfac1")}
MEMORY_STEPS = 2  # also the warm-up of the timed steps
TITLES = {"mlp26k": "MLP 26k", "mlp": "MLP 301k", "cnn": "CNN 6k", "wide_cnn": "wide CNN 117k", "resnet18": "ResNet-18"}


def batch(model_name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` training digits, or random 3x32x32 inputs and labels for ResNet-18."""
    if INPUT_SHAPES[model_name] == (1, 8, 8):
        data = load_digits()
        return data.x_train[:batch_size], data.y_train[:batch_size]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *INPUT_SHAPES[model_name], generator=generator)
    return x, torch.randint(0, 10, (batch_size,), generator=generator)


def worker(model_name: str, case_name: str, batch_size: int, repeats: int) -> dict:
    """Time and peak memory of one case and of its baselines, and their ratios, in this process."""
    torch.manual_seed(0)
    prototype = STEP_TIME_MODELS[model_name]()
    x, y = batch(model_name, batch_size)
    case = CASES[case_name]
    builders = {case_name: case.build, **{b: BASELINES[b] for b in case.baselines}}
    steps, peaks = {}, {}
    for name, build in builders.items():

        def setup(name=name, build=build):
            steps[name] = build(copy.deepcopy(prototype), x, y)
            for _ in range(MEMORY_STEPS):
                steps[name]()

        peaks[name] = peak_growth_mib(setup)
    blocks = {name: [] for name in builders}
    for _ in range(max(1, math.ceil(repeats / case.period))):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(case.period):
                step()
            blocks[name].append((time.perf_counter() - start) / case.period)
    seconds = {name: statistics.median(times) for name, times in blocks.items()}
    return {
        "ms": {name: 1e3 * s for name, s in seconds.items()},
        "peak_mib": peaks,
        "time": {b: seconds[case_name] / seconds[b] for b in case.baselines},
        "memory": {b: peaks[case_name] / max(peaks[b], 1e-3) for b in case.baselines},
    }


def settings(model_name: str, args: argparse.Namespace) -> tuple[int, int]:
    """(batch size, repeats) for this model: the flags where given, else the model's defaults."""
    defaults = RESNET_DEFAULTS if model_name == "resnet18" else DEFAULTS
    if args.quick:
        defaults = {**defaults, "repeats": QUICK_REPEATS if model_name != "resnet18" else 1}
    return args.batch_size or defaults["batch_size"], args.repeats or defaults["repeats"]


def measure(models: list[str], cases: list[str], args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Run every (model, case) in a fresh subprocess (``--quick``: one subprocess per model)."""
    results = {}
    for model_name in models:
        batch_size, repeats = settings(model_name, args)
        options = ("--batch-size", str(batch_size), "--repeats", str(repeats))
        left_out = () if args.optimizers else SLOW_BY_DEFAULT.get(model_name, ())
        run = [c for c in cases if c not in left_out]
        groups = [run] if args.quick else [[c] for c in run]
        for group in groups:
            print(f"  {model_name}: {', '.join(group)}", file=sys.stderr, flush=True)
            try:
                measured = run_isolated(__file__, model_name, ",".join(group), *options)
                results.update(((model_name, c), r) for c, r in measured.items())
            except subprocess.CalledProcessError as error:
                note = (error.stderr.strip().splitlines() or ["no output"])[-1][:100].replace("|", "/")
                results.update(((model_name, c), {"error": note}) for c in group)
                print(f"  {model_name}: {', '.join(group)} failed: {note}", file=sys.stderr, flush=True)
    return results


def rows(cases: list[str]) -> list[tuple[str, str, str]]:
    """(case, baseline, label) of each table row, "× SGD" rows with SGD's own ratio to Adam beside them."""
    out = []
    for name in cases:
        case = CASES[name]
        if "sgd" in case.baselines:
            out.append((name, "sgd", f"{case.label}, × SGD"))
            if name == "kfac1":
                out.append((name, "adam", f"{case.label}, × Adam"))
        else:
            out.append((name, case.baselines[0], case.label))
    if any("sgd" in CASES[c].baselines for c in cases):
        out.append(("sgd", "adam", "SGD (momentum 0.9), × Adam (converts the × SGD rows)"))
    return out


def ratio(results: dict, model_name: str, case_name: str, baseline: str, key: str) -> float | str | None:
    """The cell's ratio, an error note, or None where not measured; the "sgd" row is SGD over Adam, taken from
    a SecondOrderOptimizer subprocess, which times and measures both."""
    if case_name == "sgd":
        both = [r for (m, _), r in results.items() if m == model_name and {"sgd", "adam"} <= set(r.get("ms", ()))]
        if not both:
            return None
        values = both[0]["ms" if key == "time" else "peak_mib"]
        return values["sgd"] / max(values["adam"], 1e-3)
    result = results.get((model_name, case_name))
    if result is None or "error" in result:
        return result and f"failed: {result['error']}"
    return result[key][baseline]


def cell(results: dict, model_name: str, case_name: str, baseline: str, key: str) -> str:
    value = ratio(results, model_name, case_name, baseline, key)
    return "—" if value is None else value if isinstance(value, str) else f"{value:.2f}"


def table(results: dict, models: list[str], cases: list[str], key: str, title: str) -> str:
    header = [f"{TITLES.get(m, m)} ({sum(p.numel() for p in STEP_TIME_MODELS[m]().parameters()):,})" for m in models]
    lines = [f"| {title} | " + " | ".join(header) + " |", "|---|" + "---:|" * len(models)]
    for case_name, baseline, label in rows(cases):
        lines.append(f"| {label} | " + " | ".join(cell(results, m, case_name, baseline, key) for m in models) + " |")
    return "\n".join(lines)


def factor_check() -> str:
    from kfac_factor_check import report

    torch.manual_seed(0)
    x, y = batch("cnn", 32)
    return report(STEP_TIME_MODELS["cnn"](), x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(STEP_TIME_MODELS), help=", ".join(STEP_TIME_MODELS))
    parser.add_argument("--optimizers", help="default: all of " + ", ".join(CASES))
    parser.add_argument("--batch-size", type=int, help="all models (default 128; ResNet-18: 8)")
    parser.add_argument("--repeats", type=int, help="timed steps of each (default 25; ResNet-18: 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats (ResNet-18: 1), one process a model")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CASES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        model_name, names = args.worker
        print(json.dumps({c: worker(model_name, c, args.batch_size, args.repeats) for c in names.split(",")}))
        return
    models, cases = args.models.split(","), (args.optimizers or ",".join(CASES)).split(",")
    for value, known, flag in ((models, STEP_TIME_MODELS, "--models"), (cases, CASES, "--optimizers")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    skipped = [c for c in cases if not available(c)]
    cases = [c for c in cases if c not in skipped]
    sizes = ", ".join(f"{m} batch {settings(m, args)[0]} × {settings(m, args)[1]} repeats" for m in models)
    print(f"torch {torch.__version__}, {args.threads} threads, one MC sample; {sizes}\n")
    for model_name in models if args.optimizers is None else ():
        slow = [c for c in SLOW_BY_DEFAULT.get(model_name, ()) if c in cases]
        if slow:
            print(
                f"Not run on {model_name} by default (—): {', '.join(slow)}; each refresh of the K-FAC "
                f"eigendecompositions takes minutes on 2 cores (--models {model_name} --optimizers {','.join(slow)}).\n"
            )
    for needs in dict.fromkeys(CASES[c].needs for c in skipped):
        names = ", ".join(c for c in skipped if CASES[c].needs == needs)
        print(f"Skipped {names}: `{needs}` is not installed ({INSTALL[needs]}).\n")
    if available("curvlinops_exact"):
        print("Exact K-FAC factors, bayesso engine vs curvlinops (small CNN, float64, batch 32):\n")
        print(factor_check() + "\n")
    results = measure(models, cases, args)
    print(table(results, models, cases, "time", "per step, × baseline"))
    print()
    print(table(results, models, cases, "memory", "peak memory, × baseline"))
    timed = [(m, r["ms"]["adam"]) for (m, _), r in results.items() if "adam" in r.get("ms", {})]
    adam = {m: [ms for n, ms in timed if n == m] for m in models}
    medians = [f"{TITLES.get(m, m)} {statistics.median(ms):.1f}" for m, ms in adam.items() if ms]
    print("\nAdam step (ms, median over the subprocesses): " + ", ".join(medians))


if __name__ == "__main__":
    main()
