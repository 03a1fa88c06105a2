"""Chained vs flat KV checkpoints on a growing conversation: bytes written, disk, restore.

One conversation at ds4's real widths (``StateLayout.ds4(n_layer)``, few layers) grows by
a continued save every ``step`` tokens, as an agent session does between its tool calls
(ds4's continued interval is 10,240 tokens; a coding agent's turns are a few thousand).
Every checkpoint is saved in a flat store (ds4's ``<sha>.kv`` files, the baseline) and
in a chained one (``workbench.kv.chain``) from the same states: the compressed and
indexer rows of each checkpoint extend the previous one's, the raw window, frontiers
and logits are new each time, as in a live session. Figures: bytes written, disk used,
and the restore (``KVStore.load``, every check) of the last checkpoint, chain over flat.
Both stores write no checksum trailer (chain files have none; flat files as ds4 writes them),
so the restore figures compare the layouts' reads, not CRC work.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Figure, best_pair, mib
from workbench.bench.kvio import random_state, text_for
from workbench.kv.header import SaveReason
from workbench.kv.store import KVStore
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState

NAME = "kv_chain"
CTX = 131072


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


def run(ctx: BenchContext, n_layer: int | None = None, step: int | None = None, n: int | None = None) -> BenchResult:
    """Run the benchmark (the arguments shrink it for tests)."""
    n_layer = n_layer or ctx.pick(8, 8, 16)
    step = step or ctx.pick(1024, 2048, 4096)
    n = n or ctx.pick(8, 16, 16)
    layout = StateLayout.ds4(n_layer)
    result = BenchResult(NAME)
    ctx.step(f"kv_chain: {n} checkpoints of {step} tokens at real widths, {n_layer} layers")
    states = conversation(layout, step, n)
    texts = [text_for(s.n_tokens) for s in states]
    row: dict[str, Any] = {"layers": n_layer, "step_tokens": step, "checkpoints": n, "last_tokens": step * n}
    stores = {}
    for kind in ("flat", "chain"):
        d = ctx.work_dir / NAME / kind
        shutil.rmtree(d, ignore_errors=True)
        st = KVStore(d, budget_mb=None, min_tokens=1, kv_layout=kind, checksum=False)  # ds4's bytes: no trailer
        row[f"{kind}_written"] = sum(st.save(s, t, SaveReason.CONTINUED).bytes for s, t in zip(states, texts))
        row[f"{kind}_disk"] = st.total_bytes()
        stores[kind] = st
    last = {kind: st.lookup(texts[-1], CTX, 1) for kind, st in stores.items()}
    row["chain_depth"] = last["chain"].depth
    ctx.step("kv_chain: restoring the last checkpoint, chain vs flat")
    chain_s, flat_s = best_pair(lambda: stores["chain"].load(last["chain"], layout, CTX),
                                lambda: stores["flat"].load(last["flat"], layout, CTX), ctx.repeats)
    row.update(chain_restore_s=chain_s, flat_restore_s=flat_s, restore_ratio=chain_s / flat_s)
    result.add_row(row)
    sizes = f"{n} checkpoints x {step:,} tokens, ds4 widths, {n_layer} layers"
    result.figures += [
        Figure(NAME, "chain.disk", sizes, row["chain_disk"], "bytes", "flat .kv files, same states", row["flat_disk"],
               False, f"{mib(row['chain_disk']):,.1f} vs {mib(row['flat_disk']):,.1f} MiB"),
        Figure(NAME, "chain.written", sizes, row["chain_written"], "bytes", "flat .kv files, same states",
               row["flat_written"], False),
        Figure(NAME, "chain.restore", f"{step * n:,} tokens, chain depth {row['chain_depth']}", chain_s, "s",
               "flat restore of the same state", flat_s, False, "KVStore.load, every check"),
    ]
    for st in stores.values():
        shutil.rmtree(st.dir, ignore_errors=True)
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    import plotly.graph_objects as go

    row = tables[NAME][-1]
    fig = go.Figure()
    for kind in ("flat", "chain"):
        fig.add_bar(x=["bytes written", "disk used"], y=[row[f"{kind}_written"] / 2**20, row[f"{kind}_disk"] / 2**20],
                    name=kind)
    fig.update_layout(title=f"{row['checkpoints']} checkpoints of one conversation", yaxis_title="MiB",
                      barmode="group", template="plotly_white")
    return [fig]
