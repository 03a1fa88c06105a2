"""Prefill and decode at the real widths, in every mode, on a 1-layer ``real-dims`` model.

* ``prefill.real-dims-N.c2048.gflops``: one 2,048-token chunk from an empty context
  (``session.prefill``, the default chunk, which is ds4's cap), FLOPs from
  :mod:`workbench.bench.flops`, against the MLX float32 matmul rate measured in the same
  run (the matmul bound).
* ``decode.real-dims-N.tok_s``: tokens/s of ``session.step`` after the prefill (best of the
  steps, each followed by a bandwidth measurement, best of those: the suite's rule), against
  the memory bound: the bytes one token must read (every non-expert tensor, the
  ``n_expert_used / n_expert`` share of the routed expert tensors, one embedding row, the
  KV rows it attends) divided by the memory bandwidth measured in the same run (bytes
  read + written per second by a 256 MiB copy, the better of one thread and as many
  threads as the decode kernels use: what the machine can do, not what one core does).

The model (``real-dims-1``: ~3.2 GB, the real ds4 tensors of layer 0 plus the embedding and
output head) is synthesized once into the bench's real-model folder (``build/bench-models``
by default) and reused. ``--full`` uses 2 layers and longer measurements; never more, here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Copier, Figure
from workbench.bench.flops import prefill_flops
from workbench.bench.prefill import MATMUL_N, matmul_baseline, prompt_tokens
from workbench.bench.report import grouped_bars

NAME = "real_width"
CHUNK = 2048  # the session's default (and ds4's maximum) prefill chunk
COPY_BYTES = 256 << 20


def real_model(ctx: BenchContext, n_layer: int) -> Path:
    """``real-dims-<n_layer>.gguf`` in the real-model folder, synthesized if absent."""
    from workbench.synth import synthesize

    path = ctx.real_dir / f"real-dims-{n_layer}.gguf"
    if not path.exists():
        ctx.step(f"{NAME}: synthesizing real-dims-{n_layer} into {ctx.real_dir} (once)")
        ctx.real_dir.mkdir(parents=True, exist_ok=True)
        synthesize(f"real-dims-{n_layer}", path)
    return path


def memory_bandwidth(repeats: int = 3) -> float:
    """Bytes read + written per second by a 256 MiB ``np.copyto``: the best of ``repeats``
    copies by one thread and of ``repeats`` split over ``min(cpu_count, 8)`` threads (the
    native few-row kernels split their rows over that many; :class:`Copier`), so the bound
    uses the bandwidth the machine offers, however many cores that takes."""
    src = np.ones(COPY_BYTES // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    with Copier() as copier:
        return 2 * COPY_BYTES / copier.best_seconds(dst, src, repeats)


def token_bytes(path: Path, n_context: int) -> dict[str, float]:
    """Bytes one decode token at context ``n_context`` must read, by part: ``experts``
    (the used share of the routed experts), ``weights`` (every other tensor but the
    embedding), ``embedding`` (one row) and ``kv`` (the rows attended, float32)."""
    from workbench.gguf.reader import GGUFFile
    from workbench.spec.args import ModelArgs
    from workbench.spec.statelayout import StateLayout

    with GGUFFile(path) as f:
        args = ModelArgs.from_metadata(f.metadata)
        infos = list(f.tensors.values())
    out = {"experts": 0.0, "weights": 0.0, "embedding": 0.0, "kv": 0.0}
    for t in infos:
        if "_exps." in t.name:
            out["experts"] += t.nbytes * args.n_expert_used / args.n_expert
        elif t.name.startswith("token_embd."):
            out["embedding"] += t.nbytes / args.n_vocab
        else:
            out["weights"] += t.nbytes
    layout = StateLayout.from_args(args)
    for layer in range(args.n_layer):
        rows = layout.n_raw(n_context) + layout.n_comp(layer, n_context)
        out["kv"] += 4.0 * (rows * args.head_dim + layout.n_idx(layer, n_context) * args.idx_dim)
    return out


def run(ctx: BenchContext) -> BenchResult:
    """Run the benchmark (real-dims-1 in quick/standard mode, real-dims-2 with --full)."""
    from workbench.session import load

    n_layer = ctx.pick(1, 1, 2)
    n_decode = ctx.pick(6, 8)
    result = BenchResult(NAME)
    path = real_model(ctx, n_layer)
    model = path.stem
    ctx.step(f"{NAME}: load {path.name}")
    t0 = time.perf_counter()
    session = load(path, ctx=CHUNK + 64 + n_decode + 1)
    load_s = time.perf_counter() - t0
    args = session.args
    tokens = prompt_tokens(CHUNK + 64 + n_decode)
    try:
        ctx.step(f"{NAME}: warm-up (a 64-token prefill)")
        session.prefill(tokens[:64])  # first touch of the mapped weights, first-call setup
        session.reset()
        ctx.step(f"{NAME}: MLX float32 matmul baseline")
        peak = matmul_baseline()
        ctx.step(f"{NAME}: prefill {model}, {CHUNK:,} tokens")
        seconds = session.prefill(tokens[:CHUNK]).seconds
        flops = sum(prefill_flops(args, 0, CHUNK).values())
        ctx.step(f"{NAME}: decode {model}, {n_decode} tokens, each followed by the memory bandwidth baseline")
        step_s, bandwidths = [], []
        for tok in tokens[CHUNK : CHUNK + n_decode]:  # interleaved: both see the same machine
            t0 = time.perf_counter()
            session.step(tok)
            step_s.append(time.perf_counter() - t0)
            bandwidths.append(memory_bandwidth(1))
        bandwidth = max(bandwidths)
    finally:
        session.close()
    decode_s = min(step_s)  # best of each, as every figure of the suite
    need = token_bytes(path, CHUNK + n_decode // 2)
    per_token = sum(need.values())
    bound_tps = bandwidth / per_token
    result.add_row({"model": model, "what": "prefill", "tokens": CHUNK, "chunk": CHUNK, "seconds": seconds,
                    "tokens_per_s": CHUNK / seconds, "gflop": flops / 1e9, "gflops": flops / seconds / 1e9,
                    "matmul_gflops": peak, "load_s": load_s})
    result.add_row({"model": model, "what": "decode", "tokens": n_decode, "context": CHUNK, "seconds": decode_s,
                    "median_seconds": float(np.median(step_s)),
                    "tokens_per_s": 1 / decode_s, "bytes_per_token": per_token, "bandwidth_gbps": bandwidth / 1e9,
                    "bound_tokens_per_s": bound_tps, **{f"bytes_{k}": v for k, v in need.items()}})
    result.figures += [
        Figure(NAME, f"prefill.{model}.c{CHUNK}.gflops",
               f"{model}, {CHUNK:,} tokens from empty, chunk {CHUNK}, {flops / CHUNK / 1e9:,.2f} GFLOP/token",
               flops / seconds / 1e9, "GFLOP/s", f"MLX float32 matmul {MATMUL_N}^3 (matmul bound)", peak, True,
               f"{CHUNK / seconds:,.1f} tok/s"),
        Figure(NAME, f"decode.{model}.tok_s",
               f"{model}, best of {n_decode} steps at {CHUNK:,} tokens of context, "
               f"{per_token / 2**20:,.0f} MiB read per token",
               1 / decode_s, "tok/s", f"memory bound: bytes per token / {bandwidth / 1e9:,.1f} GB/s copy bandwidth",
               bound_tps, True, ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in need.items())),
    ]
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    rows = tables[NAME]
    fraction = [r["gflops"] / r["matmul_gflops"] if r["what"] == "prefill"
                else r["tokens_per_s"] / r["bound_tokens_per_s"] for r in rows]
    return [grouped_bars([f"{r['model']} {r['what']}" for r in rows], [("fraction of the bound", fraction)],
                         "Real widths: prefill vs the matmul bound, decode vs the memory bound", "x bound")]
