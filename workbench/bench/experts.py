"""Routed experts per ggml format: MLX's quantized matmul on repacked blocks ("native")
against dequantizing to float32 + BLAS, by rows per expert; and, with ``--full``, decode
tokens/s of a real-width model per expert format against the memory bound.

Part 1 (every mode): ``E`` real-width experts (n_ff 2,048 x n_embd 4,096, gate, up and
down) of random valid blocks per format (MXFP4, Q8_0, Q4_K), each given ``r`` rows, run
through :meth:`workbench.model.moe.MoE.routed` twice: all native (``native_max_rows``
unbounded) and all dequantized (0). The figure is the native time over the dequantized
time (the baseline) for the same rows; the crossover (largest ``r`` at which native is
faster) is what :data:`workbench.model.moe.NATIVE_MAX_ROWS` should hold on this machine.
The table also gives the largest difference of the two outputs relative to the largest
output (accumulation order only: the weights are the same bits).

Part 2 (``--full``): ``real-dims-1`` with each expert format (q2, q4, mxfp4),
synthesized once into the real-model folder: decode tokens/s after a short prompt, against
the memory bound = bytes of weights one token reads (every non-expert tensor except the
embedding table, one embedding row, ``n_expert_used`` experts per layer) / the memory
bandwidth measured in the same run (best of NumPy sums over a 1 GiB buffer).
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Figure, best
from workbench.bench.dequant import random_blocks
from workbench.gguf.quants import QTensor
from workbench.spec.ggml import GGML_TYPES, MXFP4, Q4_K, Q8_0
from workbench.model.moe import NATIVE_MAX_ROWS, MoE, MoEWeights

NAME = "experts"
FORMATS = (MXFP4, Q8_0, Q4_K)
N_FF, N_EMBD = 2048, 4096
DECODE_FORMATS = ("q2", "q4", "mxfp4")


def _bank(ggml_type: int, n_expert: int, out: int, n_in: int, seed: int) -> QTensor:
    raw = random_blocks(ggml_type, n_expert * out * n_in, seed).reshape(n_expert, out, -1)
    return QTensor(raw, ggml_type, (n_expert, out, n_in))


def expert_moe(ggml_type: int, n_expert: int, native_max_rows: int, n_ff: int = N_FF, n_embd: int = N_EMBD) -> MoE:
    """A MoE of ``n_expert`` experts ``n_ff`` x ``n_embd`` of one type; only :meth:`MoE.routed` is used."""
    zero = mx.zeros((1, 1))
    w = MoEWeights(zero, None, None, _bank(ggml_type, n_expert, n_ff, n_embd, 1),
                   _bank(ggml_type, n_expert, n_ff, n_embd, 2), _bank(ggml_type, n_expert, n_embd, n_ff, 3),
                   zero, zero, zero)
    return MoE(1, False, 1.0, 10.0, w, native_max_rows=native_max_rows)


def crossover(ctx: BenchContext, result: BenchResult, n_ff: int = N_FF, n_embd: int = N_EMBD) -> None:
    """Part 1: native vs dequantized per format and rows per expert (experts ``n_ff`` x ``n_embd``)."""
    n_expert = ctx.pick(1, 2)
    row_counts = ctx.pick((1, 4), (1, 2, 4, 8, 16))
    rng = np.random.default_rng(0)
    for ggml_type in FORMATS:
        name = GGML_TYPES[ggml_type].name
        native = expert_moe(ggml_type, n_expert, 1 << 30, n_ff, n_embd)
        dequant = MoE(1, False, 1.0, 10.0, native.w, native_max_rows=0)
        faster, leading = 0, True  # native faster at every row count so far
        for r in row_counts:
            ctx.step(f"experts: {name}, {n_expert} experts x {r} rows")
            sel = mx.array(np.repeat(np.arange(n_expert, dtype=np.int32), r)[:, None])
            wt = mx.ones(sel.shape)
            g = mx.array(rng.standard_normal((n_expert * r, n_embd), dtype=np.float32))
            y_nat, y_deq = np.array(native.routed(g, sel, wt)), np.array(dequant.routed(g, sel, wt))
            rel = float(np.abs(y_nat - y_deq).max() / np.abs(y_deq).max())
            nat_s = best(lambda: mx.eval(native.routed(g, sel, wt)), ctx.repeats)
            deq_s = best(lambda: mx.eval(dequant.routed(g, sel, wt)), ctx.repeats)
            leading = leading and nat_s < deq_s
            faster = r if leading else faster
            result.add_row({"type": name, "experts": n_expert, "rows_per_expert": r,
                            "native_ms_per_expert": 1e3 * nat_s / n_expert,
                            "dequant_ms_per_expert": 1e3 * deq_s / n_expert, "max_rel_diff": rel})
            result.figures.append(Figure(
                NAME, f"experts.{name}.native[{r}]",
                f"{n_expert} experts {n_ff}x{n_embd} (gate, up, down), {r} rows each",
                nat_s / n_expert, "s", "dequantize + float32 BLAS, same experts and rows", deq_s / n_expert, False,
                note=f"outputs differ by {rel:.1e} of the largest"))
        result.notes.append(f"{name}: native faster up to {faster} rows per expert on this machine "
                            f"(workbench.model.moe.NATIVE_MAX_ROWS says {NATIVE_MAX_ROWS[ggml_type]})")


def memory_bandwidth(n_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Read bandwidth in bytes/s: best NumPy sum over an ``n_bytes`` float64 buffer."""
    buf = np.ones(n_bytes // 8)
    return n_bytes / best(lambda: buf.sum(), repeats)


def token_bytes(path: Any) -> int:
    """Bytes of weights one decode token reads from a ds4 GGUF: every tensor except the
    embedding table and the routed experts, one embedding row, ``n_expert_used`` experts
    of each routed tensor."""
    from workbench.gguf.reader import GGUFFile

    with GGUFFile(path) as f:
        used = f.metadata["deepseek4.expert_used_count"]
        total = 0
        for name, t in f.tensors.items():
            if name == "token_embd.weight":
                total += t.nbytes // t.shape[0]
            elif "_exps." in name:
                total += t.nbytes // t.shape[0] * used
            else:
                total += t.nbytes
    return total


def decode(ctx: BenchContext, result: BenchResult) -> None:
    """Part 2: decode tokens/s of real-dims-1 per expert format against the memory bound."""
    from workbench.session import load
    from workbench.synth import synthesize

    bandwidth = memory_bandwidth()
    n_steps = 8
    for experts in DECODE_FORMATS:
        path = ctx.real_dir / f"real-dims-1-{experts}.gguf"
        if not path.exists():
            ctx.step(f"experts: synthesizing real-dims-1 --experts {experts} into {ctx.real_dir} (once)")
            ctx.real_dir.mkdir(parents=True, exist_ok=True)
            synthesize("real-dims-1", path, seed=0, experts=experts)
        ctx.step(f"experts: decoding {n_steps} tokens with {experts} experts")
        s = load(path, ctx=256)
        try:
            s.prefill(list(range(100, 116)))
            t0 = time.perf_counter()
            for i in range(n_steps):
                s.step(200 + i)
            seconds = (time.perf_counter() - t0) / n_steps
        finally:
            s.close()
        touched = token_bytes(path)
        bound = bandwidth / touched
        result.add_row({"experts": experts, "token_bytes": touched, "bandwidth_gbps": bandwidth / 1e9,
                        "decode_s_per_token": seconds, "tokens_per_s": 1 / seconds, "bound_tokens_per_s": bound},
                       table=f"{NAME}_decode")
        result.figures.append(Figure(
            NAME, f"experts.decode.{experts}",
            f"real-dims-1, {experts} experts, {touched / 2**20:,.0f} MiB read per token",
            1 / seconds, "tok/s", f"memory bound ({bandwidth / 1e9:.1f} GB/s measured / bytes per token)", bound, True))


def run(ctx: BenchContext, n_ff: int = N_FF, n_embd: int = N_EMBD) -> BenchResult:
    """Run the benchmark (expert widths default to the real model's)."""
    result = BenchResult(NAME)
    crossover(ctx, result, n_ff, n_embd)
    if ctx.full:
        decode(ctx, result)
    else:
        result.notes.append("decode per expert format on real-dims-1: --full only (synthesizes ~3.6 GB per format)")
    return result


def charts(tables: dict[str, list[dict[str, Any]]]) -> list[Any]:
    """Native and dequantized ms per expert against rows per expert, one line per format and path."""
    import plotly.graph_objects as go

    rows = tables.get(NAME, [])
    fig = go.Figure()
    for name in sorted({r["type"] for r in rows}):
        mine = [r for r in rows if r["type"] == name]
        for path in ("native", "dequant"):
            fig.add_trace(go.Scatter(x=[r["rows_per_expert"] for r in mine],
                                     y=[r[f"{path}_ms_per_expert"] for r in mine], name=f"{name} {path}"))
    fig.update_layout(title="Routed expert: MLX quantized matmul vs dequantize + BLAS", xaxis_title="rows per expert",
                      yaxis_title="ms per expert", xaxis_type="log")
    return [fig]
