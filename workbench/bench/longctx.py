"""Decode time per token at long contexts: 8,192 and 65,536 tokens, real layout widths.

Two attention layers with ds4's real state widths (a ratio-4 layer with its indexer and a
ratio-128 layer: 64 heads of ``head_dim`` 512, indexer 64 heads of 128, the 128-token raw
window, ``idx_topk`` 512) decode tokens after a context synthesized with
``state.random_state`` (no 64k-token prefill). Everything that does not depend on the
context is made narrow (``n_embd`` 256, ``q_lora``/``o_lora`` 64, random float32
weights), so the per-token time is mostly the part that grows with the context: the
attention over the rows, the indexer's scores, the compressed and indexer rows the
state gains (one every 4 tokens on the ratio-4 layer). Each token is timed with its
state update evaluated (``mx.eval`` of the output and of every state tensor).

Figures:

* ``decode.long_ctx[N]``: mean seconds per token over ``DECODE_TOKENS`` consecutive
  tokens at context N, against the attention FLOPs such a token must do at the MLX
  float32 matmul rate measured in the same run (QK and PV over the raw window and the
  visible compressed rows, top-k capped on the ratio-4 layer, plus the indexer's scores
  over every visible row: ``workbench.bench.flops``' count);
* ``decode.long_ctx.growth``: the per-token time at 65,536 over the one at 8,192, against
  the same ratio of that attention work (a ratio <= 1 means the time grows no faster than
  the work).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import mlx.core as mx
import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Figure
from workbench.bench.flops import visible_rows
from workbench.bench.prefill import MATMUL_N, matmul_baseline
from workbench.bench.report import grouped_bars
from workbench.spec.args import ModelArgs
from workbench.spec.statelayout import StateLayout
from workbench.state import LayerState, random_state

NAME = "long_ctx"
CONTEXTS = (8192, 65536)
DECODE_TOKENS = 16  # tokens timed per context (4 of them add a compressed row on the ratio-4 layer)
WARMUP_TOKENS = 2
NARROW = {"n_embd": 256, "q_lora_rank": 64, "o_lora_rank": 64}  # widths the context does not scale


def bench_args() -> ModelArgs:
    """Real-dims arguments (ds4's schedule: layers 2 and 3 have ratios 4 and 128) with the
    context-independent widths of ``NARROW``."""
    from workbench.synth import resolve_preset

    return replace(resolve_preset("real-dims-4").args, **NARROW)


def attention_layers(args: ModelArgs, layers: tuple[int, ...], seed: int = 0) -> list[Any]:
    """``Attention`` modules of ``layers`` with random float32 weights of the args' shapes."""
    from workbench.model.attention import Attention, AttentionWeights
    from workbench.model.compressor import Compressor, CompressorWeights
    from workbench.model.indexer import Indexer, IndexerWeights
    from workbench.model.rope import RopeSpec

    rng = np.random.default_rng(seed)
    a = args

    def w(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1]))

    def comp(r: int, width: int) -> CompressorWeights:
        c = 2 if r == 4 else 1
        return CompressorWeights(w(c * width, a.n_embd), w(c * width, a.n_embd), w(r, c * width),
                                 mx.ones((width,), mx.float32))

    out = []
    for L in layers:
        r, rope = a.ratio(L), RopeSpec.for_layer(a, L)
        aw = AttentionWeights(w(a.q_lora_rank, a.n_embd), mx.ones((a.q_lora_rank,)), w(a.n_head * a.head_dim, a.q_lora_rank),
                              w(a.head_dim, a.n_embd), mx.ones((a.head_dim,)), mx.zeros((a.n_head,)),
                              w(a.o_groups * a.o_lora_rank, a.n_head * a.head_dim // a.o_groups),
                              w(a.n_embd, a.o_groups * a.o_lora_rank))
        compressor = Compressor(r, a.head_dim, comp(r, a.head_dim), rope, a.rms_eps, "attn", a.n_nope) if r else None
        indexer = None
        if r == 4:
            indexer = Indexer(a.idx_heads, a.idx_dim, a.idx_topk, 4,
                              IndexerWeights(w(a.idx_heads * a.idx_dim, a.q_lora_rank), w(a.idx_heads, a.n_embd)),
                              Compressor(4, a.idx_dim, comp(4, a.idx_dim), rope, a.rms_eps, "index"), rope)
        out.append(Attention(a.n_head, a.head_dim, a.n_rot, a.n_swa, a.o_groups, a.rms_eps, aw, rope, r,
                             compressor, indexer))
    return out


def attention_flops(args: ModelArgs, layers: tuple[int, ...], position: int) -> float:
    """FLOPs of one token at ``position`` that grow with the context, over ``layers``: QK
    and PV over the attended rows (top-k capped on ratio-4 layers) and the indexer's
    scores once more than ``idx_topk`` rows are visible."""
    pos = np.array([position])
    total = 0.0
    for L in layers:
        attended, comp = visible_rows(args, L, pos)
        total += float(4 * args.n_head * args.head_dim * attended[0])
        if args.ratio(L) == 4 and comp[0] > args.idx_topk:
            total += float(2 * args.idx_heads * args.idx_dim * comp[0])
    return total


def decode_seconds(attn: list[Any], states: list[LayerState], n_context: int, n_embd: int, n_tokens: int,
                   warmup: int) -> float:
    """Mean seconds per token of ``n_tokens`` tokens after ``warmup`` ones, each through
    every layer of ``attn`` (its new state evaluated) starting at position ``n_context``."""
    rng = np.random.default_rng(1)
    h = [mx.array(rng.standard_normal((1, n_embd), dtype=np.float32)) for _ in range(warmup + n_tokens)]
    mx.eval(h)
    t0 = 0.0
    for i in range(warmup + n_tokens):
        if i == warmup:
            t0 = time.perf_counter()
        for L, layer in enumerate(attn):
            o, states[L] = layer(h[i], n_context + i, states[L])
            mx.eval(o, *(v for _, v in states[L].tensors()))
    return (time.perf_counter() - t0) / n_tokens


def run(ctx: BenchContext, contexts: tuple[int, ...] = CONTEXTS, n_tokens: int = DECODE_TOKENS) -> BenchResult:
    """Run the benchmark (``contexts``/``n_tokens`` smaller in tests)."""
    result = BenchResult(NAME)
    args = bench_args()
    layers = tuple(L for L in range(args.n_layer) if args.ratio(L))  # one ratio-4, one ratio-128 layer
    ctx.step(f"{NAME}: building {len(layers)} attention layers at the real state widths")
    attn = attention_layers(args, layers)
    ctx.step(f"{NAME}: MLX float32 matmul baseline")
    peak = matmul_baseline()
    layout = StateLayout.from_args(args)
    per_token: dict[int, float] = {}
    for n in contexts:
        ctx.step(f"{NAME}: {n:,}-token random context, {n_tokens} decode tokens")
        state = random_state(layout, n, n + n_tokens + WARMUP_TOKENS + 1).to_mlx()
        states = [state.layers[L] for L in layers]
        seconds = decode_seconds(attn, states, n, args.n_embd, n_tokens, WARMUP_TOKENS)
        mid = n + WARMUP_TOKENS + n_tokens // 2
        flops = attention_flops(args, layers, mid)
        kv_bytes = sum(int(a.nbytes) for ls in states for _, a in ls.tensors())
        per_token[n] = seconds
        result.add_row({"context": n, "tokens": n_tokens, "seconds_per_token": seconds, "attention_gflop": flops / 1e9,
                        "kv_bytes": kv_bytes, "matmul_gflops": peak})
        result.figures.append(Figure(
            NAME, f"decode.long_ctx[{n}]",
            f"ratio-4 + ratio-128 attention layers at real state widths, {n:,} tokens of context, "
            f"{flops / 1e6:,.0f} MFLOP of attention per token", seconds, "s",
            f"attention FLOPs per token at the MLX float32 matmul rate ({MATMUL_N}^3: {peak:,.0f} GFLOP/s)",
            flops / (peak * 1e9), False, f"mean of {n_tokens} tokens, {kv_bytes / 2**20:,.1f} MiB of KV state"))
    rows = result.tables[NAME]
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        result.figures.append(Figure(
            NAME, "decode.long_ctx.growth", f"time per token at {hi['context']:,} over {lo['context']:,} tokens",
            hi["seconds_per_token"] / lo["seconds_per_token"], "x", "the same ratio of the attention FLOPs per token",
            hi["attention_gflop"] / lo["attention_gflop"], False,
            "<= 1: the time per token grows no faster than the attention work"))
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    rows = tables[NAME]
    labels = [f"{r['context']:,} tok" for r in rows]
    bound = [r["attention_gflop"] / r["matmul_gflops"] * 1e3 for r in rows]
    return [grouped_bars(labels, [("decode ms/token", [r["seconds_per_token"] * 1e3 for r in rows]),
                                  ("attention FLOPs at matmul rate, ms", bound)],
                         "Decode time per token vs context (real state widths, 2 attention layers)", "ms")]
