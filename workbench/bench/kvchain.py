"""Chained vs flat KV checkpoints: bytes written, disk used, restore time.

Two parts, each against the flat layout (ds4's ``<sha>.kv`` files, the baseline) in the
same run, both layouts with the workbench's footer (checksums and fingerprint), restores
through ``KVStore.load`` with every check:

* **conversation**: one conversation at ds4's real widths (``StateLayout.ds4(n_layer)``,
  few layers) growing by a continued save every ``step`` tokens, as an agent session does
  between tool calls (ds4's continued interval is 10,240 tokens). Every checkpoint is
  saved in a flat and in a chained store from the same states (the compressed and indexer
  rows of each extend the previous one's; the raw window, frontiers and logits are new each
  time, as in a live session). Figures: bytes written, disk used, the restore of the last
  checkpoint (the deepest chain). Quick: 8 layers, 8 x 1,024 tokens; ``--full``: the long
  conversation, 4 layers, 16 x 8,192 = 131,072 tokens.
* **workloads** (``agent``; standard and full add ``coding-agent``): the engine serves the
  workload on the tiny model twice, into a flat and into a chained store (same inputs,
  same greedy replies, a continued save every 512 tokens, no budget). Figures: bytes the
  store wrote, disk used at the end, restoring every entry (same names in both stores);
  and the workload's recorded trace replayed at the real widths (43 layers, the cache
  lab's exact sizes, ``workbench.lab.replay``): bytes written, chain vs flat.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Figure, best_pair, mib
from workbench.bench.kvio import random_state, text_for
from workbench.bench.report import grouped_bars
from workbench.kv.header import SaveReason
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState

NAME = "kv_chain"
WORKLOADS = "kv_chain_workloads"  # the workloads' table
RESTORE_REPEATS = 9  # restores take milliseconds: more rounds than the suite's default, the best counts
CTX = 262144  # room for the long conversation (a state holds T < ctx tokens)
WORKLOAD_CTX = 16384
WORKLOAD_POLICY = KVPolicy(min_tokens=256, boundary_align=256, continued_interval=512, budget_mb=None)
LAYOUTS = ("flat", "chain")


def conversation(layout: StateLayout, step: int, n: int, seed: int = 0) -> list[SessionState]:
    """``n`` checkpoints of one conversation, ``step`` tokens apart: growing rows shared,
    raw window, frontiers and logits fresh per checkpoint."""
    full = random_state(layout, step * n, CTX, seed)
    out = []
    for i in range(1, n + 1):
        s = random_state(layout, step * i, CTX, seed + i)
        for mine, whole in zip(s.layers, full.layers):
            for name in ("comp", "idx"):
                if getattr(whole, name) is not None:
                    setattr(mine, name, np.asarray(getattr(whole, name))[: np.asarray(getattr(mine, name)).shape[0]])
        s.tokens = list(full.tokens[: step * i])
        out.append(s)
    return out


def run(ctx: BenchContext, n_layer: int | None = None, step: int | None = None, n: int | None = None,
        workloads: tuple[str, ...] | None = None) -> BenchResult:
    """Run the benchmark (the arguments shrink it for tests; ``workloads=()`` skips them)."""
    result = BenchResult(NAME)
    run_conversation(ctx, result, n_layer or ctx.pick(8, 8, 4), step or ctx.pick(1024, 2048, 8192),
                     n or ctx.pick(8, 16, 16))
    for name in ctx.pick(("agent",), ("agent", "coding-agent")) if workloads is None else workloads:
        run_workload(ctx, result, name)
    result.charts = charts(result.tables)
    return result


def run_conversation(ctx: BenchContext, result: BenchResult, n_layer: int, step: int, n: int) -> None:
    """The conversation part (see the module docstring)."""
    layout = StateLayout.ds4(n_layer)
    ctx.step(f"kv_chain: {n} checkpoints of {step} tokens at real widths, {n_layer} layers")
    states = conversation(layout, step, n)
    texts = [text_for(s.n_tokens) for s in states]
    row: dict[str, Any] = {"layers": n_layer, "step_tokens": step, "checkpoints": n, "last_tokens": step * n}
    stores = {}
    for kind in LAYOUTS:
        d = ctx.work_dir / NAME / kind
        shutil.rmtree(d, ignore_errors=True)
        st = KVStore(d, budget_mb=None, min_tokens=1, kv_layout=kind)
        row[f"{kind}_written"] = sum(st.save(s, t, SaveReason.CONTINUED).bytes for s, t in zip(states, texts))
        row[f"{kind}_disk"] = st.total_bytes()
        stores[kind] = st
    del states
    last = {kind: st.lookup(texts[-1], CTX, 1) for kind, st in stores.items()}
    row["chain_depth"] = last["chain"].depth
    ctx.step("kv_chain: restoring the last checkpoint, chain vs flat")
    chain_s, flat_s = best_pair(lambda: stores["chain"].load(last["chain"], layout, CTX),
                                lambda: stores["flat"].load(last["flat"], layout, CTX),
                                max(ctx.repeats, RESTORE_REPEATS))
    row.update(chain_restore_s=chain_s, flat_restore_s=flat_s, restore_ratio=chain_s / flat_s)
    result.add_row(row)
    sizes = f"{n} checkpoints x {step:,} tokens, ds4 widths, {n_layer} layers"
    result.figures += [
        Figure(NAME, "chain.disk", sizes, row["chain_disk"], "bytes", "flat .kv files, same states", row["flat_disk"],
               False, f"{mib(row['chain_disk']):,.1f} vs {mib(row['flat_disk']):,.1f} MiB"),
        Figure(NAME, "chain.written", sizes, row["chain_written"], "bytes", "flat .kv files, same states",
               row["flat_written"], False),
        Figure(NAME, "chain.restore", f"{step * n:,} tokens, chain depth {row['chain_depth']}", chain_s, "s",
               "flat restore of the same state", flat_s, False, "KVStore.load, every check and checksum"),
    ]
    for st in stores.values():
        shutil.rmtree(st.dir, ignore_errors=True)


def build_workload(ctx: BenchContext, name: str):
    """The workload ``name`` at this mode's size (quick: a few short turns)."""
    from workbench import workloads as wl

    if name == "agent":
        return wl.agent_session(seed=0, turns=ctx.pick(3, 6), file_chars=ctx.pick(1200, 3000))
    if name == "coding-agent":
        return wl.coding_agent(seed=0, turns=ctx.pick(2, 4), file_chars=ctx.pick(1000, 1500))
    raise ValueError(f"kv_chain: no workload {name!r} (agent, coding-agent)")


def run_workload(ctx: BenchContext, result: BenchResult, name: str) -> None:
    """One workload's part (see the module docstring)."""
    from workbench.engine import Engine, restrict
    from workbench.lab.record import record
    from workbench.lab.replay import replay, trace_rates
    from workbench.session import load

    session = load(ctx.tiny_model(), ctx=WORKLOAD_CTX)
    row: dict[str, Any] = {"workload": name}
    stores, traces = {}, {}
    for kind in LAYOUTS:
        ctx.step(f"kv_chain: {name} workload on the tiny model, {kind} layout")
        d = ctx.work_dir / NAME / f"{name}-{kind}"
        shutil.rmtree(d, ignore_errors=True)
        session.reset()
        store = KVStore.from_policy(d, WORKLOAD_POLICY, kv_layout=kind)
        engine = Engine(session, store, WORKLOAD_POLICY)
        traces[kind] = record(engine, build_workload(ctx, name), restrict(engine.tokenizer.text_token_mask()))
        row[f"{kind}_written"] = sum(e.bytes for e in store.events if e.kind == "saved")
        row[f"{kind}_disk"] = store.total_bytes()
        stores[kind] = store
    row["requests"] = len(traces["flat"].requests)
    flat = {e.sha: e for e in stores["flat"].entries()}
    chain = [e for e in stores["chain"].entries() if e.sha in flat]
    row.update(entries=len(chain), max_depth=max((e.depth for e in chain), default=0))
    ctx.step(f"kv_chain: {name}: restoring its {len(chain)} checkpoints, chain vs flat")
    layout = session.layout
    chain_s, flat_s = best_pair(lambda: [stores["chain"].load(e, layout, WORKLOAD_CTX) for e in chain],
                                lambda: [stores["flat"].load(flat[e.sha], layout, WORKLOAD_CTX) for e in chain],
                                max(ctx.repeats, RESTORE_REPEATS))
    row.update(chain_restore_s=chain_s, flat_restore_s=flat_s)
    real = StateLayout.ds4()
    trace = traces["flat"]
    trace = replace(trace, header=replace(trace.header, layout={
        "n_layer": real.n_layer, "head_dim": real.head_dim, "idx_dim": real.idx_dim, "n_vocab": real.n_vocab,
        "n_swa": real.n_swa, "ratios": list(real.ratios)}))
    for kind in LAYOUTS:
        s = replay(trace, WORKLOAD_POLICY, trace_rates(trace), kv_layout=kind).summary()
        row[f"real_{kind}_written"], row[f"real_{kind}_disk"] = s["bytes_written"], s["disk_bytes"]
    result.add_row(row, WORKLOADS)
    what = f"{name} workload, {row['requests']} requests"
    result.figures += [
        Figure(NAME, f"chain.{name}.written", f"{what}, tiny model", row["chain_written"], "bytes",
               "flat store, same requests", row["flat_written"], False),
        Figure(NAME, f"chain.{name}.disk", f"{what}, tiny model", row["chain_disk"], "bytes",
               "flat store, same requests", row["flat_disk"], False),
        Figure(NAME, f"chain.{name}.restore", f"{what}: {len(chain)} checkpoints, depth <= {row['max_depth']}",
               chain_s, "s", "flat restores of the same checkpoints", flat_s, False),
        Figure(NAME, f"chain.{name}.real_written", f"{what}, replayed at ds4 widths (43 layers)",
               row["real_chain_written"], "bytes", "flat layout, same replay", row["real_flat_written"], False,
               f"{mib(row['real_chain_written']):,.0f} vs {mib(row['real_flat_written']):,.0f} MiB"),
    ]
    for st in stores.values():
        shutil.rmtree(st.dir, ignore_errors=True)


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    row = tables[NAME][-1]
    out = [grouped_bars(["bytes written", "disk used"],
                        [(kind, [row[f"{kind}_written"] / 2**20, row[f"{kind}_disk"] / 2**20]) for kind in LAYOUTS],
                        f"{row['checkpoints']} checkpoints of one conversation", "MiB")]
    rows = tables.get(WORKLOADS) or []
    if rows:
        out.append(grouped_bars([r["workload"] for r in rows],
                                [(kind, [r[f"real_{kind}_written"] / 2**20 for r in rows]) for kind in LAYOUTS],
                                "bytes written by the workloads, replayed at ds4 widths", "MiB"))
    return out
