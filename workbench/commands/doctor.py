"""``workbench doctor``: which Python, MLX, device and BLAS this environment runs, and how fast."""

from __future__ import annotations

import argparse
import json

from workbench.commands.common import number
from workbench.doctor import DEFAULT_REPEATS, DEFAULT_SIZES, diagnose, format_report

HELP = "check the environment: Python, MLX device, the BLAS in use, matmul GFLOP/s"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-measure", action="store_true", help="skip the matmul timing")
    parser.add_argument(
        "--sizes", type=number(int, 1, 16384), nargs="+", default=list(DEFAULT_SIZES), metavar="N",
        help=f"square matmul sizes to time (default {' '.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument("--repeats", type=number(int, 1, 1000), default=DEFAULT_REPEATS, help="timed runs per size; the best counts")


def run(args: argparse.Namespace) -> int:
    report = diagnose(not args.no_measure, sizes=tuple(args.sizes), repeats=args.repeats)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["verdict"].startswith("broken") else 0
