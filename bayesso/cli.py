"""The ``bayesso`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesso", description="Second-order optimization and Bayesian deep learning in PyTorch."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="train a small CNN on bundled digits and compare every curvature kind x structure"
    )
    demo.add_argument("--quick", action="store_true", help="a few seconds: 1 epoch, 128 curvature examples")
    demo.add_argument("--epochs", type=_positive_int, default=8, help="Adam epochs (default 8)")
    demo.add_argument("--examples", type=_positive_int, default=256, help="training images for the curvature")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from bayesso.demo import DemoConfig, format_table, run_demo

    config = DemoConfig(epochs=args.epochs, curvature_examples=args.examples, seed=args.seed)
    if args.quick:
        config.epochs, config.curvature_examples = 1, 128
    rows = run_demo(config)
    sys.stdout.write(format_table(rows, config) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
