"""The ``bayesso`` command: ``demo`` (the calibration study) and ``curvature`` (the engine's kinds x structures)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

QUIET = "no progress bars (bars show only where stderr is a terminal or in notebooks)"
THREADS = "torch threads (default 1: these small models gain nothing from more; 2 slowed them 15-fold on busy cores)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesso", description="Second-order optimization and Bayesian deep learning in PyTorch."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="calibration study on bundled digits: Adam, Adam + TS, VOGN, noisy K-FAC, IVON, BBB, Laplace",
        description="Train a small CNN on digits 0-4 seven ways (Adam, Adam + temperature scaling, VOGN, noisy K-FAC, "
        "IVON, Bayes by Backprop with Pyro installed, last-layer Laplace); print accuracy, NLL, ECE, Brier, "
        "OOD AUROC (digits 5-9) and time per method; write report.md, metrics.json and reliability diagrams to --out.",
    )
    demo.add_argument("--out", type=Path, default=Path("bayesso-demo"), help="output folder (default bayesso-demo/)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="training epochs per method (default 30)")
    demo.add_argument("--samples", type=_positive_int, default=32, help="MC weight samples (default 32)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1, mean ± std (default 3)")
    demo.add_argument(
        "--quick", action="store_true", help="about 20 s on 2 CPU cores: 1 seed, 3 epochs, 8 samples (for tests)"
    )
    demo.add_argument("--quiet", action="store_true", help=QUIET)
    demo.add_argument("--threads", type=_positive_int, default=1, help=THREADS)
    curvature = commands.add_parser(
        "curvature", help="train a small CNN on bundled digits and compare every curvature kind x structure"
    )
    curvature.add_argument(
        "--quick",
        action="store_true",
        help="about 20 s on 2 CPU cores: 1 epoch, 128 curvature examples, no exact-Hessian rows",
    )
    curvature.add_argument("--epochs", type=_positive_int, default=8, help="Adam epochs (default 8)")
    curvature.add_argument("--examples", type=_positive_int, default=256, help="training images for the curvature")
    curvature.add_argument("--seed", type=int, default=0)
    curvature.add_argument("--quiet", action="store_true", help=QUIET)
    curvature.add_argument("--threads", type=_positive_int, default=1, help=THREADS)
    return parser


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
    from bayesso.demo import DemoConfig, compare_with_adam, format_table, run_demo
    from bayesso.demo_report import write_report

    config = DemoConfig(epochs=args.epochs, samples=args.samples, seeds=args.seeds)
    if args.quick:
        config.epochs, config.samples, config.seeds = 3, 8, 1
    study = run_demo(config, progress=not args.quiet)
    written = write_report(study, args.out)
    comparison = "".join(f"{line}\n" for line in compare_with_adam(study.methods))
    sys.stdout.write(
        format_table(study.methods) + "\n\n" + comparison + f"\nwrote {', '.join(str(p) for p in written)}\n"
    )
    return 0


def _curvature(args: argparse.Namespace) -> int:
    from bayesso.curvature_comparison import CurvatureComparisonConfig, format_table, run_comparison

    config = CurvatureComparisonConfig(epochs=args.epochs, curvature_examples=args.examples, seed=args.seed)
    if args.quick:
        config.epochs, config.curvature_examples, config.hessian = 1, 128, False
    sys.stdout.write(format_table(run_comparison(config, progress=not args.quiet), config) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args, parser) if args.command == "demo" else _curvature(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
