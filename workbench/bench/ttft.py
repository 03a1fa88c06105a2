"""Time to first token: restore a saved prefix + prefill the suffix, against a full
prefill of prefix + suffix, on the tiny model.

For each prefix length P the prefix is prefilled once and saved as a checkpoint (text:
the token ids as decimal words, so longer prompts extend shorter ones). For each suffix
length S the restore path is ``KVStore.lookup`` of the whole prompt's text + ``load`` +
``Session.restore`` + ``prefill`` of the S new tokens; the baseline is one ``prefill`` of
all P + S tokens from an empty session (same chunk schedule, ds4's 2048). Both end with
the next-token logits. The restore path should grow with S and barely with P.
"""

from __future__ import annotations

import time
from typing import Any

from workbench.bench.core import BenchContext, BenchError, BenchResult, Figure, timed
from workbench.bench.prefill import prompt_tokens
from workbench.kv.header import SaveReason
from workbench.kv.store import KVStore

NAME = "ttft"


def key_text(tokens: list[int]) -> str:
    """The lookup text of a token sequence (a prefix's text is a prefix of a longer one's)."""
    return "".join(f"{t} " for t in tokens)


def run(ctx: BenchContext, prefixes: list[int] | None = None, suffixes: list[int] | None = None) -> BenchResult:
    """Run the benchmark (``prefixes``/``suffixes`` in tokens; defaults by mode)."""
    from workbench.session import load

    prefixes = prefixes or ctx.pick([2048, 8192], [2048, 8192, 32768])
    suffixes = suffixes or [64, 512, 2048]
    result = BenchResult(NAME)
    total = max(prefixes) + max(suffixes)
    session_ctx = total + 1
    session = load(ctx.tiny_model(), ctx=session_ctx)
    layout = session.layout
    tokens = prompt_tokens(total, seed=1)
    store = KVStore(ctx.work_dir / NAME, budget_mb=None, min_tokens=1, maintain=False)
    session.prefill(tokens[:256])  # warm-up
    for P in prefixes:
        ctx.step(f"ttft: prefill and save a {P:,}-token prefix")
        session.reset()
        prefix_s = session.prefill(tokens[:P]).seconds
        store.save(session.snapshot(), key_text(tokens[:P]), SaveReason.COLD)
        for S in suffixes:
            ctx.step(f"ttft: prefix {P:,} + suffix {S:,}: restore path and full prefill")
            prompt = key_text(tokens[: P + S])
            t0 = time.perf_counter()
            hit = store.lookup(prompt, session_ctx)
            t1 = time.perf_counter()
            if hit is None or hit.tokens != P:
                raise BenchError(f"{store.dir}: the saved {P}-token prefix was not found")
            state, _ = store.load(hit, layout, session_ctx)
            t2 = time.perf_counter()
            session.restore(state)
            t3 = time.perf_counter()
            session.prefill(tokens[P : P + S])
            t4 = time.perf_counter()
            session.reset()
            full_s = timed(lambda: session.prefill(tokens[: P + S]))
            result.add_row({"prefix": P, "suffix": S, "lookup_s": t1 - t0, "load_s": t2 - t1, "restore_s": t3 - t2,
                            "suffix_prefill_s": t4 - t3, "ttft_restore_s": t4 - t0, "ttft_full_s": full_s,
                            "prefix_prefill_s": prefix_s})
            result.figures.append(Figure(
                NAME, f"ttft.restore[P={P},S={S}]", f"tiny, prefix {P:,} + suffix {S:,} tokens", t4 - t0, "s",
                "full prefill of prefix + suffix", full_s, False,
                f"lookup {(t1 - t0) * 1e3:.0f} + load {(t2 - t1) * 1e3:.0f} + restore {(t3 - t2) * 1e3:.0f} ms "
                f"+ suffix {(t4 - t3):.2f} s"))
    rows = result.tables[NAME]
    lo, hi = min(prefixes), max(prefixes)
    if hi > lo:
        for S in suffixes:
            a = next(r for r in rows if r["prefix"] == lo and r["suffix"] == S)
            b = next(r for r in rows if r["prefix"] == hi and r["suffix"] == S)
            result.figures.append(Figure(
                NAME, f"ttft.prefix_scaling[S={S}]", f"tiny, suffix {S:,}: prefix {hi:,} vs {lo:,} tokens",
                b["ttft_restore_s"], "s", f"the same restore path at prefix {lo:,}", a["ttft_restore_s"], False,
                f"prefix x{hi // lo}; a full prefill grows x{b['ttft_full_s'] / a['ttft_full_s']:.1f}"))
    session.close()
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    import plotly.graph_objects as go

    rows = tables[NAME]
    fig = go.Figure()
    for P in sorted({r["prefix"] for r in rows}):
        part = [r for r in rows if r["prefix"] == P]
        fig.add_scatter(x=[r["suffix"] for r in part], y=[r["ttft_restore_s"] for r in part], mode="lines+markers",
                        name=f"restore + suffix, prefix {P:,}")
        fig.add_scatter(x=[r["suffix"] for r in part], y=[r["ttft_full_s"] for r in part], mode="lines+markers",
                        line=dict(dash="dash"), name=f"full prefill, prefix {P:,}")
    fig.update_layout(title="Time to first token vs suffix length", xaxis_title="suffix tokens", yaxis_title="s",
                      xaxis_type="log", yaxis_type="log", template="plotly_white")
    return [fig]
