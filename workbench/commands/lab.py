"""``workbench lab record|import|replay|sweep``: the cache lab on recorded traffic.

``record`` serves a workload with the engine and writes a trace; ``import`` turns a
``ds4-server --trace`` file (or a ds4 cache directory) into one; ``replay`` re-runs the
cache decisions of a trace under any policy and budget without the model; ``sweep``
does that for policies × budgets and writes CSV and HTML. Results go to stdout
(``--json`` for machines), progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.kv.eviction import PRESETS
from workbench.kv.policy import KVPolicy, KVPolicyError
from workbench.lab.trace import Trace, read_trace

HELP = "cache lab: record, import, replay and sweep cache traces (policies, budgets, the optimum, miss reasons)"
POLICIES = tuple(PRESETS) + ("optimal",)
WORKLOAD_NAMES = ("agent", "multi-user", "long-doc", "coding-agent")
POLICY_OPTIONS = (  # (flag, KVPolicy field, type, help)
    ("--min-tokens", "min_tokens", int, "smallest checkpoint looked up or saved (ds4: 512)"),
    ("--cold-max-tokens", "cold_max_tokens", int, "longest prompt given a cold save, 0 disables (ds4: 30000)"),
    ("--continued-interval", "continued_interval", int, "tokens between continued saves, 0 disables (ds4: 10000)"),
    ("--boundary-trim", "boundary_trim", int, "tokens trimmed off a cold boundary (ds4: 32)"),
    ("--boundary-align", "boundary_align", int, "cold boundary alignment in tokens (ds4: 2048)"),
    ("--consume-on-load-above", "consume_on_load_above", int, "delete restored checkpoints deeper than this"),
)


class LabError(WorkbenchError):
    """Bad lab arguments."""


def _policy_args(p: argparse.ArgumentParser, budget_required: bool = False) -> None:
    for flag, _, typ, text in POLICY_OPTIONS:
        p.add_argument(flag, type=typ, help=text + " (default: the trace's)")
    p.add_argument("--protect-hit", action="store_true", help="the evict save spares the checkpoint about to be "
                                                              "loaded (the workbench's fix of ds4 #447/#448)")
    p.add_argument("--cold-long-prompts", action="store_true", help="save prompts above cold-max at a boundary below it")
    p.add_argument("--rates", default="trace", choices=("trace", "m3-max", "m3-ultra", "gb10"),
                   help="prefill/save/restore rates: measured when recorded (trace) or ds4's published ones")
    p.add_argument("--prefill-tps", type=float, help="prefill tokens/s (overrides --rates)")
    p.add_argument("--write-mbps", type=float, help="checkpoint write MiB/s (overrides --rates)")
    p.add_argument("--read-mbps", type=float, help="checkpoint restore MiB/s (overrides --rates)")
    p.add_argument("--kv-layout", choices=("flat", "chain"),
                   help="account bytes as flat .kv files or chain entries (default: the trace's)")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", required=True)
    p = sub.add_parser("record", help="serve a workload with the engine and write its trace")
    p.add_argument("--model", type=Path, required=True, help="GGUF model file")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, required=True, help="request stream to serve")
    p.add_argument("--requests", type=int, help="stop after this many requests (default: the whole workload)")
    p.add_argument("--kv-dir", type=Path, required=True, help="checkpoint directory the engine uses")
    p.add_argument("--kv-budget-mb", type=float, default=4096.0, help="disk budget in MiB (default 4096)")
    p.add_argument("--policy", choices=tuple(PRESETS), default="ds4", help="eviction rules (default ds4, today's)")
    for flag, _, typ, text in POLICY_OPTIONS:
        p.add_argument(flag, type=typ, help=text)
    p.add_argument("--protect-hit", action="store_true", help="the evict save spares the checkpoint about to load")
    p.add_argument("--ctx", type=int, default=16384, help="context size in tokens (default 16384)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--hash-text", action="store_true", help="keep prefix hashes and lengths only (private traffic)")
    p.add_argument("--out", type=Path, required=True, help="trace file to write (JSONL)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = sub.add_parser("import", help="turn a ds4-server --trace file or a ds4 cache directory into a trace")
    p.add_argument("source", type=Path, help="ds4-server --trace output, or a cache directory of .kv files")
    p.add_argument("--out", type=Path, required=True, help="trace file to write (JSONL)")
    p.add_argument("--model", type=Path, help="GGUF whose tokenizer gives exact token ends (default: estimated)")
    p.add_argument("--ctx", type=int, default=32768, help="ds4-server's --ctx (default 32768)")
    p.add_argument("--hash-text", action="store_true", help="keep prefix hashes and lengths only (private traffic)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = sub.add_parser("replay", help="re-run a trace's cache decisions under a policy and budget, without the model")
    p.add_argument("trace", type=Path, help="trace file (JSONL)")
    p.add_argument("--policy", choices=POLICIES, default="ds4", help="eviction policy (default ds4, today's)")
    p.add_argument("--budget-mb", type=float, help="disk budget in MiB (default: the trace's; 0: unlimited)")
    _policy_args(p)
    p.add_argument("--json", action="store_true", help='print {"requests": [...], "summary": {...}}')
    p = sub.add_parser("sweep", help="replay policies x budgets; write sweep.csv, misses.csv, sweep.html")
    p.add_argument("trace", type=Path, help="trace file (JSONL)")
    p.add_argument("--policies", default="ds4,ds4-2026-05,lru,lfu,size",
                   help=f"comma-separated, of {', '.join(PRESETS)} (the optimum is always added)")
    p.add_argument("--budgets", required=True, help="comma-separated budgets in MiB, e.g. 256,512,1024")
    p.add_argument("--out", type=Path, required=True, help="directory for the CSV and HTML files")
    _policy_args(p)
    p.add_argument("--json", action="store_true", help="print the sweep table as JSON")


def run(args: argparse.Namespace) -> int:
    return {"record": _record, "import": _import, "replay": _replay, "sweep": _sweep}[args.lab_command](args)


# ---- policy and rates ---------------------------------------------------------------------
def _with_layout(trace: Trace, kv_layout: str | None) -> Trace:
    """The trace replayed as if its store wrote ``kv_layout`` (None: as it did)."""
    return trace if kv_layout is None else replace(trace, header=replace(trace.header, kv_layout=kv_layout))


def trace_policy(trace: Trace, args: argparse.Namespace) -> KVPolicy:
    """The trace's recorded policy with the command line's options applied."""
    from workbench.lab.replay import recorded_policy
    try:
        policy = recorded_policy(trace)
        over: dict[str, Any] = {field: getattr(args, field) for _, field, _, _ in POLICY_OPTIONS
                                if getattr(args, field, None) is not None}
        if getattr(args, "protect_hit", False):
            over["protect_hit"] = True
        if getattr(args, "cold_long_prompts", False):
            over["cold_long_prompts"] = True
        return replace(policy, **over)
    except (KVPolicyError, TypeError) as err:
        raise LabError(f"{args.trace}: policy: {err}") from None


def rates_of(trace: Trace, args: argparse.Namespace):
    from workbench.lab.replay import RATE_PRESETS, Rates, trace_rates
    base = trace_rates(trace) if args.rates == "trace" else RATE_PRESETS[args.rates]
    for name in ("prefill_tps", "write_mbps", "read_mbps"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise LabError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    return Rates(args.prefill_tps or base.prefill_tps,
                 args.write_mbps * 2**20 if args.write_mbps else base.write_bps,
                 args.read_mbps * 2**20 if args.read_mbps else base.read_bps)


def _budget(value: float | None, default: float | None, name: str = "--budget-mb") -> float | None:
    if value is None:
        return default
    if not math.isfinite(value) or value < 0:
        raise LabError(f"{name} must be a finite number >= 0 (0: unlimited), got {value}")
    return None if value == 0 else value


# ---- commands -----------------------------------------------------------------------------
def _record(args: argparse.Namespace) -> int:
    from workbench.engine import Engine, restrict
    from workbench.gguf.layout import routed_quant_bits
    from workbench.kv.store import KVStore
    from workbench.lab.record import record
    from workbench.session import load
    from workbench.workloads import WORKLOADS

    if args.requests is not None and args.requests < 1:
        raise LabError(f"--requests must be >= 1, got {args.requests}")
    over = {field: getattr(args, field) for _, field, _, _ in POLICY_OPTIONS if getattr(args, field) is not None}
    try:
        policy = KVPolicy.preset(args.policy, budget_mb=_budget(args.kv_budget_mb, 4096.0, "--kv-budget-mb"),
                                 protect_hit=args.protect_hit, **over)
    except KVPolicyError as err:
        raise LabError(str(err)) from None
    workload = WORKLOADS["long-document" if args.workload == "long-doc" else args.workload](seed=args.seed)
    if args.requests is not None:
        workload.schedule = workload.schedule[: args.requests]
    session = load(args.model, ctx=args.ctx)
    try:
        store = KVStore.from_policy(args.kv_dir, policy, quant_bits=routed_quant_bits(session.file))
        engine = Engine(session, store, policy)
        sampler = restrict(engine.tokenizer.text_token_mask())

        def progress(line) -> None:
            rec = line.recorded
            print(f"request {line.request} {line.conversation}: {rec['source']} {rec['cached_tokens']}/"
                  f"{line.prompt_tokens} tokens", file=sys.stderr)

        trace = record(engine, workload, sampler, model=str(args.model), on_request=progress)
    finally:
        session.close()
    trace.write(args.out, hash_text=args.hash_text)
    reqs = trace.requests
    summary = {"out": str(args.out), "requests": len(reqs), "prompt_tokens": sum(r.prompt_tokens for r in reqs),
               "cached_tokens": sum(r.recorded["cached_tokens"] for r in reqs), "policy": policy.eviction,
               "budget_mb": policy.budget_mb}
    print(json.dumps(summary) if args.json else
          f"{summary['requests']} requests, cached {summary['cached_tokens']}/{summary['prompt_tokens']} tokens "
          f"({policy.eviction}, {policy.budget_mb} MiB) -> {args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from workbench.lab.ds4trace import cache_dir_skeleton, parse_ds4_trace
    tok = None
    if args.model is not None:
        from workbench.gguf.reader import GGUFFile
        from workbench.tokenizer import Tokenizer
        tok = Tokenizer.from_gguf(GGUFFile(args.model))
    if args.source.is_dir():
        trace = cache_dir_skeleton(args.source, tok, args.ctx)
    else:
        trace = parse_ds4_trace(args.source, tok, args.ctx)
    trace.write(args.out, hash_text=args.hash_text)
    reqs = trace.requests
    summary = {"out": str(args.out), "source": trace.header.source, "requests": len(reqs),
               "prompt_tokens": sum(r.prompt_tokens for r in reqs),
               "tokens_estimated": any(r.tokens_estimated for r in reqs),
               "ds4_cached_tokens": sum(int(r.recorded.get("cached_tokens", 0) or 0) for r in reqs)}
    print(json.dumps(summary) if args.json else
          f"{summary['requests']} requests, {summary['prompt_tokens']} prompt tokens "
          f"({'estimated' if summary['tokens_estimated'] else 'exact'}), ds4 cached "
          f"{summary['ds4_cached_tokens']} -> {args.out}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from workbench.lab.sweep import run_policy
    from workbench.lab.optimum import infinite, optimal
    trace = _with_layout(read_trace(args.trace), args.kv_layout)
    policy = trace_policy(trace, args)
    policy = replace(policy, budget_mb=_budget(args.budget_mb, trace.header.budget_mb))
    rates = rates_of(trace, args)
    result = run_policy(trace, policy, args.policy, policy.budget_mb, rates)
    summary = result.summary()
    best = result if args.policy == "optimal" else optimal(trace, policy, rates, [result])
    summary["optimal_cached_tokens"] = sum(r.cached_tokens for r in best.requests)
    summary["fraction_of_optimum"] = (summary["cached_tokens"] / summary["optimal_cached_tokens"]
                                      if summary["optimal_cached_tokens"] else 1.0)
    summary["infinite_cached_tokens"] = max(sum(r.cached_tokens for r in infinite(trace, policy, rates).requests),
                                            summary["optimal_cached_tokens"])
    rows = [_request_row(r) for r in result.requests]
    if args.json:
        print(json.dumps({"requests": rows, "summary": summary}))
        return 0
    print(f"{'req':>4} {'conversation':<18} {'source':<6} {'cached':>7} {'prompt':>7} {'recorded':<14} "
          f"{'ttft_s':>8} {'written':>10} {'read':>10}  why")
    for r in rows:
        rec = f"{r['recorded_source'] or '-'}/{r['recorded_cached_tokens'] if r['recorded_cached_tokens'] is not None else '-'}"
        print(f"{r['request']:>4} {r['conversation'][:18]:<18} {r['source']:<6} {r['cached_tokens']:>7} "
              f"{r['prompt_tokens']:>7} {rec:<14} {r['ttft_s']:>8.3f} {r['bytes_written']:>10} {r['bytes_read']:>10}  "
              f"{r['explanation']}")
    print(f"{summary['policy']} ({summary['schedule']}) at {summary['budget_mb']} MiB: cached "
          f"{summary['cached_tokens']}/{summary['prompt_tokens']} tokens ({summary['hit_ratio']:.1%}), "
          f"{summary['saves']} saves, {summary['evictions']} evictions, TTFT {summary['ttft_s']:.2f} s, "
          f"{summary['kv_layout']} layout: {summary['bytes_written'] / 2**20:,.1f} MiB written, disk "
          f"{summary['disk_bytes'] / 2**20:,.1f} MiB (peak {summary['peak_disk_bytes'] / 2**20:,.1f}); "
          f"{summary['fraction_of_optimum']:.1%} of the optimum ({summary['optimal_cached_tokens']}), "
          f"infinite budget {summary['infinite_cached_tokens']}")
    return 0


def _request_row(r) -> dict:
    return {"request": r.request, "conversation": r.conversation, "source": r.source,
            "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "miss_reason": r.miss_reason,
            "losses": r.losses, "explanation": r.explanation, "ttft_s": r.ttft_s, "prefill_s": r.prefill_s,
            "restore_s": r.restore_s, "save_s": r.save_s, "bytes_written": r.bytes_written,
            "bytes_read": r.bytes_read, "saves": r.saves, "evictions": r.evictions,
            "recorded_source": r.recorded.get("source"), "recorded_cached_tokens": r.recorded.get("cached_tokens"),
            "recorded_miss_reason": r.recorded.get("miss_reason")}


def _sweep(args: argparse.Namespace) -> int:
    from workbench.lab.sweep import sweep, write
    trace = _with_layout(read_trace(args.trace), args.kv_layout)
    policy = trace_policy(trace, args)
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise LabError(f"--policies: unknown {bad}; expected some of {', '.join(POLICIES)}")
    try:
        budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        raise LabError(f"--budgets: {args.budgets!r} is not a comma-separated list of numbers") from None
    if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise LabError(f"--budgets must be finite numbers > 0, got {args.budgets!r}")
    rates = rates_of(trace, args)
    print(f"sweeping {len(names)} policies x {len(budgets)} budgets over {len(trace.requests)} requests",
          file=sys.stderr)
    df, runs = sweep(trace, policy, names, budgets, rates)
    first = runs[(names[0] if names and names[0] != "optimal" else "optimal", budgets[0])]
    paths = write(args.out, df, first, [r.generated_tokens for r in trace.requests])
    if args.json:
        print(df.to_json(orient="records"))
    else:
        cols = ["policy", "budget_mb", "cached_tokens", "hit_ratio", "fraction_of_optimum", "ttft_s", "bytes_written",
                "evictions"]
        print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
