"""The ``bayesso`` command: ``demo`` (the calibration study) and ``curvature`` (the engine's kinds x structures)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


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
        help="calibration study on bundled digits: Adam, Adam + temperature scaling, VOGN, noisy K-FAC",
        description="Train a small CNN on digits 0-4 four ways; print accuracy, NLL, ECE, Brier, OOD AUROC "
        "(digits 5-9) and time per method; write report.md, metrics.json and reliability diagrams to --out.",
    )
    demo.add_argument("--out", type=Path, default=Path("bayesso-demo"), help="output folder (default bayesso-demo/)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="training epochs per method (default 30)")
    demo.add_argument("--samples", type=_positive_int, default=32, help="MC weight samples (default 32)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1, mean ± std (default 3)")
    demo.add_argument("--quick", action="store_true", help="a few seconds: 1 seed, 3 epochs, 8 samples (for tests)")
    curvature = commands.add_parser(
        "curvature", help="train a small CNN on bundled digits and compare every curvature kind x structure"
    )
    curvature.add_argument("--quick", action="store_true", help="a few seconds: 1 epoch, 128 curvature examples")
    curvature.add_argument("--epochs", type=_positive_int, default=8, help="Adam epochs (default 8)")
    curvature.add_argument("--examples", type=_positive_int, default=256, help="training images for the curvature")
    curvature.add_argument("--seed", type=int, default=0)
    return parser


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
    from bayesso.demo import DemoConfig, compare_with_adam, format_table, run_demo
    from bayesso.demo_report import write_report

    config = DemoConfig(epochs=args.epochs, samples=args.samples, seeds=args.seeds)
    if args.quick:
        config.epochs, config.samples, config.seeds = 3, 8, 1
    study = run_demo(config)
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
        config.epochs, config.curvature_examples = 1, 128
    sys.stdout.write(format_table(run_comparison(config), config) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        return _demo(args, parser)
    return _curvature(args)


if __name__ == "__main__":
    sys.exit(main())
