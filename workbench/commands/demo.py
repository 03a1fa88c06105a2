"""``workbench demo``: the agent workload with a fresh disk cache, a table and an HTML report."""

from __future__ import annotations

import argparse
import json
import sys

from workbench.commands.common import number

HELP = "run the agent workload with a disk KV cache; print per-request reuse and write build/demo.html"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="data/tiny.gguf", help="ds4 GGUF (default: data/tiny.gguf)")
    p.add_argument("--out", default="build/demo.html", help="HTML report path")
    p.add_argument("--kv-dir", default=None,
                   help="use this cache directory as it is (warm); default: OUT's folder/demo-kv, emptied first")
    p.add_argument("--turns", type=number(int, 1, 64), default=6, help="agent turns, 1..64 (default 6)")
    p.add_argument("--max-tokens", type=number(int, 0, 4096), default=8,
                   help="tokens generated per request, 0..4096 (default 8)")
    p.add_argument("--ctx", type=number(int, 1), default=32768,
                   help="context limit in tokens, at most the model's (default 32768)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                   help="seed of the workload's generated texts and of sampling (default 0)")
    p.add_argument("--json", action="store_true", help="print the request table as JSON")


def run(args: argparse.Namespace) -> int:
    from workbench.demo import run_demo

    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    res = run_demo(args.model, args.out, args.kv_dir, turns=args.turns, max_tokens=args.max_tokens, ctx=args.ctx,
                   seed=args.seed, progress=say)
    if args.json:
        print(json.dumps({"report": str(res.report), "kv_dir": str(res.kv_dir), "seconds": round(res.seconds, 2),
                          "requests": res.table.astype(object).where(res.table.notna(), None).to_dict(orient="records")}, indent=2))
        return 0
    print(res.table.to_string(index=False, na_rep="-"))
    served = res.table[res.table.source != "none"]
    if len(served):
        print(f"\n{len(served)}/{len(res.table)} requests reused a cached prefix "
              f"({(served.source == 'live').sum()} live, {(served.source == 'disk').sum()} disk); "
              f"their time to first token was {served.ttft_ms.sum() / served.full_prefill_ms.sum():.0%} "
              "of a full prefill's.")
    print(f"report: {res.report}   ({res.seconds:.1f} s)")
    print(f"checkpoints kept in {res.kv_dir}: see them with `workbench kv ls {res.kv_dir}`")
    return 0
