"""Prefill throughput: tokens/s and achieved GFLOP/s against the MLX float32 matmul rate
measured in the same run, and against a peer implementation of the same architecture.

* tiny (``data/tiny.gguf``) at prefill chunks 256 and 2048, from an empty context;
  FLOPs from :mod:`workbench.bench.flops`; the peer is nano-deepseek-v4 (PyTorch CPU) at
  an equal config with random weights (:mod:`workbench.bench.peer`), same tokens, same
  chunk schedule;
* with ``--full``, ``real-dims-4`` (the real widths, 4 layers, ~9.5 GB; synthesized once
  into the bench's real-model folder): load + one 2,048-token chunk in a child process,
  whose peak resident set over the file size is the memory figure (target <= 1.25).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Figure
from workbench.bench.flops import prefill_flops
from workbench.bench.peer import DIFFERENCES, NanoPeer, PeerUnavailable
from workbench.bench.report import grouped_bars

NAME = "prefill"
MATMUL_N = 2048
RSS_TARGET = 1.25
REAL_PRESET = "real-dims-4"


def prompt_tokens(n: int, seed: int = 0) -> list[int]:
    """``n`` random ordinary-text token ids (below 128,000, no specials)."""
    return np.random.default_rng(seed).integers(0, 128_000, n).tolist()


def matmul_baseline(repeats: int = 3) -> float:
    """Best float32 ``[2048, 2048] @ [2048, 2048]`` GFLOP/s with MLX (``workbench.doctor``)."""
    from workbench.doctor import matmul_gflops

    return matmul_gflops(MATMUL_N, repeats)["gflops"]


def probe(path: str, n_tokens: int, chunk: int) -> dict[str, Any]:
    """Load ``path`` and prefill ``n_tokens`` random tokens; the process's peak RSS.
    Run in a child process (see :func:`run_probe`) so the peak is this work's alone."""
    from workbench.session import load

    t0 = time.perf_counter()
    s = load(path, ctx=max(4096, n_tokens + 1))
    load_s = time.perf_counter() - t0
    stats = s.prefill(prompt_tokens(n_tokens), chunk=chunk)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    s.close()
    return {"load_s": load_s, "prefill_s": stats.seconds, "tokens": n_tokens, "chunk": chunk, "peak_rss": peak}


def run_probe(path: Path, n_tokens: int, chunk: int, timeout_s: float = 3600) -> dict[str, Any]:
    """:func:`probe` in a fresh Python process (same interpreter)."""
    code = ("import json, sys; from workbench.bench.prefill import probe; "
            "print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(n_tokens), str(chunk)],
                         capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"prefill probe of {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(ctx: BenchContext, n_tokens: int | None = None, chunks: tuple[int, ...] = (256, 2048)) -> BenchResult:
    """Run the benchmark (``n_tokens`` per tiny prefill, default by mode)."""
    from workbench.session import load

    n = n_tokens or ctx.pick(2048, 4096)
    reps = ctx.pick(1, 2)
    result = BenchResult(NAME)
    ctx.step("prefill: MLX float32 matmul baseline")
    peak = matmul_baseline()
    model = ctx.tiny_model()
    session = load(model, ctx=max(4096, n + 1))
    args = session.args
    tokens = prompt_tokens(n)
    flops = sum(prefill_flops(args, 0, n).values())
    session.prefill(tokens[:256], chunk=256)  # warm-up: first-touch of the mapped weights
    try:
        peer: NanoPeer | None = NanoPeer(args)
    except PeerUnavailable as err:
        peer = None
        result.notes.append(f"peer skipped: {err}")
    if peer is not None:
        peer.prefill(tokens[:256], 256)  # warm-up
        result.notes.append("peer nano-deepseek-v4 (PyTorch CPU, "
                            f"{peer.threads} threads) differs: " + "; ".join(DIFFERENCES))
    for chunk in chunks:
        ctx.step(f"prefill: tiny, {n:,} tokens, chunk {chunk}")
        ours = float("inf")
        for _ in range(reps):
            session.reset()
            ours = min(ours, session.prefill(tokens, chunk=chunk).seconds)
        theirs = min(peer.prefill(tokens, chunk) for _ in range(reps)) if peer is not None else None
        row = {"model": model.name, "tokens": n, "chunk": chunk, "seconds": ours, "tokens_per_s": n / ours,
               "gflop": flops / 1e9, "gflops": flops / ours / 1e9, "matmul_gflops": peak,
               "nano_seconds": theirs, "nano_tokens_per_s": n / theirs if theirs else None}
        result.add_row(row)
        sizes = f"tiny, {n:,} tokens from empty, chunk {chunk}, {flops / n / 1e6:,.1f} MFLOP/token"
        result.figures.append(Figure(NAME, f"prefill.tiny.c{chunk}.gflops", sizes, row["gflops"], "GFLOP/s",
                                     f"MLX float32 matmul {MATMUL_N}^3", peak, True,
                                     f"{row['tokens_per_s']:,.0f} tok/s"))
        if theirs:
            result.figures.append(Figure(NAME, f"prefill.tiny.c{chunk}.vs_nano", sizes, row["tokens_per_s"], "tok/s",
                                         "nano-deepseek-v4 (PyTorch CPU), equal config", row["nano_tokens_per_s"],
                                         True))
    session.close()
    if ctx.full:
        _real_dims(ctx, result, peak)
    else:
        result.notes.append(f"{REAL_PRESET} prefill and peak-RSS figures run with --full only")
    result.charts = charts(result.tables)
    return result


def _real_dims(ctx: BenchContext, result: BenchResult, peak: float) -> None:
    from workbench.gguf.reader import GGUFFile
    from workbench.spec.args import ModelArgs
    from workbench.synth import synthesize

    path = ctx.real_dir / f"{REAL_PRESET}.gguf"
    if not path.exists():
        ctx.step(f"prefill: synthesizing {REAL_PRESET} into {ctx.real_dir} (about 9.5 GB, once)")
        ctx.real_dir.mkdir(parents=True, exist_ok=True)
        synthesize(REAL_PRESET, path)
    with GGUFFile(path) as f:
        args = ModelArgs.from_metadata(f.metadata)
    n, chunk = 2048, 2048
    ctx.step(f"prefill: {REAL_PRESET}, load + {n:,} tokens in a child process")
    out = run_probe(path, n, chunk)
    size = path.stat().st_size
    flops = sum(prefill_flops(args, 0, n).values())
    row = {"model": path.name, "tokens": n, "chunk": chunk, "seconds": out["prefill_s"],
           "tokens_per_s": n / out["prefill_s"], "gflop": flops / 1e9, "gflops": flops / out["prefill_s"] / 1e9,
           "matmul_gflops": peak, "load_s": out["load_s"], "peak_rss": out["peak_rss"], "file_bytes": size}
    result.add_row(row)
    sizes = f"{REAL_PRESET}, {n:,} tokens from empty, chunk {chunk}, {flops / n / 1e9:,.2f} GFLOP/token"
    result.figures += [
        Figure(NAME, f"prefill.{REAL_PRESET}.c{chunk}.gflops", sizes, row["gflops"], "GFLOP/s",
               f"MLX float32 matmul {MATMUL_N}^3", peak, True, f"{row['tokens_per_s']:,.1f} tok/s"),
        Figure(NAME, f"prefill.{REAL_PRESET}.peak_rss", f"{REAL_PRESET} load + {n:,}-token prefill, "
               f"file {size / 2**30:,.2f} GiB", float(out["peak_rss"]), "bytes", "GGUF file size", float(size), False,
               f"target <= {RSS_TARGET}"),
    ]
    result.notes.append(f"{REAL_PRESET}: no peer figure (nano-deepseek-v4 would hold ~100 GB of dense float32 experts)")


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    rows = tables[NAME]
    x = [f"{r['model']} chunk {r['chunk']}" for r in rows]
    fig = grouped_bars(x, [("achieved GFLOP/s", [r["gflops"] for r in rows]),
                           ("MLX float32 matmul GFLOP/s", [r["matmul_gflops"] for r in rows])],
                       "Prefill: achieved GFLOP/s vs the matmul rate", "GFLOP/s")
    tps = grouped_bars(x, [("workbench (MLX)", [r["tokens_per_s"] for r in rows]),
                           ("nano-deepseek-v4 (PyTorch)", [r.get("nano_tokens_per_s") for r in rows])],
                       "Prefill tokens/s", "tok/s")
    return [fig, tps]
