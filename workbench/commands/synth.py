"""``workbench synth``: write a synthetic ds4-layout GGUF model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from workbench.commands.common import number
from workbench.synth import EXPERT_FORMATS, PRESET_NAMES, plan_tensors, resolve_preset, synthesize

HELP = "write a synthetic ds4-layout GGUF (random weights, real tokenizer)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESET_NAMES)}")
    parser.add_argument("--out", required=True, type=Path, help="output .gguf path")
    parser.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="random seed, 0..2^32-1 (default 0)")
    parser.add_argument("--experts", choices=list(EXPERT_FORMATS), default=None,
                        help="routed-expert format of ds4's downloads: q2 (IQ2_XXS gate/up, Q2_K down), q4 (Q4_K), "
                             "mxfp4 (MXFP4), q2q4 (q2, Q4_K on layers 37-42 or the last layer); default: the preset's")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    preset = resolve_preset(args.preset, args.experts)  # bad names fail before any work
    n_tensors = len(plan_tensors(preset))
    start = time.perf_counter()
    if args.json:
        path = synthesize(args.preset, args.out, seed=args.seed, experts=args.experts)
    else:
        with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=args.preset) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            path = synthesize(args.preset, args.out, seed=args.seed, progress=progress, experts=args.experts)
    seconds = time.perf_counter() - start
    result = {"path": str(path), "preset": args.preset, "experts": args.experts, "seed": args.seed,
              "bytes": path.stat().st_size, "tensors": n_tensors, "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['path']}: {result['bytes'] / 2**20:.1f} MiB, {n_tensors} tensors, "
              f"preset {args.preset}, seed {args.seed}, {seconds:.1f} s")
    return 0
