"""``workbench bench``: the benchmark suite (every figure a ratio to a same-run baseline).

    workbench bench --quick                 # a few minutes on two cores (real-dims-1 synthesized once)
    workbench bench                         # standard sizes
    workbench bench --full                  # plus real-dims-4 (synthesized once, ~9.5 GB)
    workbench bench --only dequant --json   # one benchmark, figures as JSON

Writes ``build/bench/``: a CSV per measurement table, ``figures.csv``, ``summary.md``
and plotly HTML pages. Exits 1 when a benchmark failed (the others still ran).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from workbench.bench.report import as_json, fmt_value
from workbench.bench.suite import BENCHMARKS, DEFAULT_MODEL, DEFAULT_OUT, DEFAULT_REAL_DIR, BenchProgress, run_suite

HELP = "run the benchmark suite against peers and physical limits (ratios to same-run baselines)"


def configure(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on two cores")
    size.add_argument("--full", action="store_true",
                      help="standard sizes plus the real-width model real-dims-4 (synthesized once into --real-dir)")
    parser.add_argument("--only", action="append", metavar="NAME", choices=list(BENCHMARKS),
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", action="store_true", help="print every figure with its baseline and ratio as JSON")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"tiny ds4 GGUF (default {DEFAULT_MODEL}; synthesized for the run when absent)")
    parser.add_argument("--real-dir", type=Path, default=DEFAULT_REAL_DIR,
                        help=f"where the synthesized real-width models (real-dims-1, and real-dims-4 for --full) are kept (default {DEFAULT_REAL_DIR})")


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, rebuilt from the parsed arguments (defaults left out)."""
    words = ["workbench", "bench"] + ["--quick"] * args.quick + ["--full"] * args.full
    for name in args.only or ():
        words += ["--only", name]
    words += ["--json"] * args.json
    for flag, value, default in (("--out", args.out, DEFAULT_OUT), ("--model", args.model, DEFAULT_MODEL),
                                 ("--real-dir", args.real_dir, DEFAULT_REAL_DIR)):
        if value != default:
            words += [flag, str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full" if args.full else "standard"
    command = command_line(args)
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(total=len(args.only or BENCHMARKS), unit="bench", file=sys.stderr, desc="bench")

    def progress(p: BenchProgress) -> None:
        if bar is not None:
            bar.n = p.index
            bar.set_description(p.bench)
            bar.set_postfix_str(p.step[:70])

    try:
        suite = run_suite(mode, args.only, args.out, args.model, args.real_dir, command, progress)
    finally:
        if bar is not None:
            bar.n = bar.total
            bar.close()
    if args.json:
        print(json.dumps(as_json(suite), indent=1))
    else:
        width = max((len(f.name) for f in suite.figures), default=10)
        for f in suite.figures:
            print(f"{f.name:<{width}}  {fmt_value(f.value, f.unit):>14}  vs {fmt_value(f.baseline, f.unit):>14}  "
                  f"ratio {f.ratio:8.3g} {f.reads_as}")
        for r in suite.results:
            for n in r.notes:
                print(f"note {r.name}: {n}")
        print(f"wrote {len(suite.files)} files to {args.out} (summary: {args.out / 'summary.md'})")
    for name, err in suite.failed.items():
        print(f"workbench bench: {name} failed: {err}", file=sys.stderr)
    return 1 if suite.failed else 0
