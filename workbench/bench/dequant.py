"""Dequantization throughput per ggml type: ``workbench.gguf.quants.dequantize`` (MLX)
against ``gguf.quants.dequantize`` (the NumPy reference) and against a plain memory copy
of the dequantized float32 bytes (the floor: writing the output once).

Inputs are random valid blocks (random codes, finite f16 scales) held in memory as an
MLX array for the workbench and a NumPy array for the reference, shaped as rows of 4,096
elements. Throughput is counted in GB/s of float32 output. The copy baseline is the better
of a one-thread ``np.copyto`` and one split over as many threads as the kernels use
(:class:`~workbench.bench.core.Copier`), each interleaved with the kernel's calls
(milliseconds each, so many repeats: the best of each is what the machine can do).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Copier, Figure, best_pair
from workbench.bench.report import grouped_bars
from workbench.gguf.quants import dequantize, native_available
from workbench.spec.ggml import BF16, F16, GGML_TYPES, IQ2_XXS, MXFP4, Q2_K, Q4_K, Q8_0

NAME = "dequant"
TYPES = (F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4)
ROW = 4096  # elements per row
# byte ranges of each block's f16 scales (d, and dmin where there is one)
_SCALE_BYTES = {Q8_0: (0, 2), Q2_K: (80, 84), Q4_K: (0, 4), IQ2_XXS: (0, 2)}


def random_blocks(ggml_type: int, n_elems: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[n_elems / ROW, row_bytes]`` of valid random data: random codes with finite
    f16 scales in [2^-10, 2^-6) for the block types (MXFP4: E8M0 scales 2^-11..2^-4);
    N(0, 1) values for F16/BF16."""
    rng = np.random.default_rng(seed)
    t = GGML_TYPES[ggml_type]
    rows = n_elems // ROW
    if ggml_type == F16:
        return rng.standard_normal((rows, ROW), dtype=np.float32).astype("<f2").view(np.uint8)
    if ggml_type == BF16:
        return (rng.standard_normal((rows, ROW), dtype=np.float32).view("<u4") >> 16).astype("<u2").view(np.uint8)
    blocks = rng.integers(0, 256, (rows * ROW // t.block_elems, t.block_bytes), dtype=np.uint8)
    if ggml_type == MXFP4:
        blocks[:, 0] = rng.integers(116, 124, blocks.shape[0])
        return blocks.reshape(rows, -1)
    lo, hi = _SCALE_BYTES[ggml_type]
    scales = rng.uniform(2.0**-10, 2.0**-6, (blocks.shape[0], (hi - lo) // 2)).astype("<f2")
    blocks[:, lo:hi] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def gbps(n_bytes: int, seconds: float) -> float:
    return n_bytes / seconds / 1e9


def run(ctx: BenchContext, n_elems: int | None = None) -> BenchResult:
    """Run the benchmark (``n_elems`` per type, a multiple of 4,096; default by mode)."""
    n = n_elems or ctx.pick(1 << 22, 1 << 24)
    result = BenchResult(NAME)
    path = "native kernels (native/dequant.cpp)" if native_available() else "pure MLX (native kernels not built)"
    result.notes.append(f"workbench decoders: {path}")
    src = np.random.default_rng(1).random(n, dtype=np.float32)
    dst = np.ones_like(src)
    with Copier() as copier:
        for ggml_type in TYPES:
            _one_type(ctx, result, ggml_type, n, src, dst, copier)
    result.charts = charts(result.tables)
    return result


def _one_type(ctx: BenchContext, result: BenchResult, ggml_type: int, n: int, src: np.ndarray, dst: np.ndarray,
              copier: Copier) -> None:
    """Measure one type: the workbench's decoder, the NumPy reference and the copy baseline."""
    import gguf.quants as ref

    out_bytes = 4 * n
    name = GGML_TYPES[ggml_type].name
    ctx.step(f"dequant: {name}, {n:,} elements")
    raw_np = random_blocks(ggml_type, n)
    raw = mx.array(raw_np)
    mx.eval(raw)
    qtype = ref.GGMLQuantizationType(ggml_type)

    def ours() -> None:
        mx.eval(dequantize(raw, ggml_type))

    ours()  # warm-up: first-call setup is not throughput
    _, ref_s = best_pair(lambda: None, lambda: ref.dequantize(raw_np, qtype), 3 * ctx.repeats)
    reps = 10 * ctx.repeats  # calls take milliseconds: more repeats cost little, steady the best
    ours1_s, copy1_s = best_pair(ours, lambda: copier.one(dst, src), reps)
    ours2_s, copy2_s = best_pair(ours, lambda: copier.split(dst, src), reps)
    ours_s, copy_s = min(ours1_s, ours2_s), min(copy1_s, copy2_s)
    result.add_row({"type": name, "elements": n, "input_bytes": raw_np.nbytes, "output_bytes": out_bytes,
                    "workbench_s": ours_s, "gguf_numpy_s": ref_s, "memcpy_s": copy_s,
                    "workbench_gbps": gbps(out_bytes, ours_s), "gguf_numpy_gbps": gbps(out_bytes, ref_s),
                    "memcpy_gbps": gbps(out_bytes, copy_s)})
    sizes = f"{n:,} elements ({raw_np.nbytes / 2**20:,.1f} MiB in, {out_bytes / 2**20:,.0f} MiB float32 out)"
    result.figures += [
        Figure(NAME, f"dequant.{name}.vs_gguf", sizes, gbps(out_bytes, ours_s), "GB/s",
               "gguf.quants.dequantize (NumPy)", gbps(out_bytes, ref_s), True),
        Figure(NAME, f"dequant.{name}.vs_memcpy", sizes, gbps(out_bytes, ours_s), "GB/s",
               "memory copy of the float32 output bytes (best of 1 and N threads)", gbps(out_bytes, copy_s), True),
    ]


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    rows = tables[NAME]
    series = [(name, [r[key] for r in rows]) for key, name in (
        ("workbench_gbps", "workbench (MLX)"), ("gguf_numpy_gbps", "gguf.quants (NumPy)"),
        ("memcpy_gbps", "memory copy of the output"))]
    return [grouped_bars([r["type"] for r in rows], series, "Dequantization throughput (GB/s of float32 output)",
                         "GB/s")]
