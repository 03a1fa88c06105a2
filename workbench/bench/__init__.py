"""The benchmark suite: every figure a ratio to a baseline measured in the same run.

    from workbench.bench import run_suite
    suite = run_suite("quick", only=["dequant"])      # writes build/bench/
    for f in suite.figures:
        print(f.name, f.value, f.baseline, f.ratio)

Benchmarks (``BENCHMARKS``, one module each): ``kv_io`` (KV save/restore vs raw I/O,
direct vs staged, checksum, mlx-lm), ``lookup`` (1,000 checkpoints, cold/warm index),
``dequant`` (per quant type vs gguf-py and a memory copy), ``gguf_load`` (vs one read of
the file, vs ``mx.load``), ``tokenizer`` (vs ``tokenizers``), ``prefill`` (GFLOP/s vs
the MLX matmul rate, tokens/s vs nano-deepseek-v4), ``ttft`` (restore + suffix vs full
prefill). The CLI is ``workbench bench``; outputs are described in :mod:`.report`.
"""

from workbench.bench.core import BenchContext, BenchError, BenchResult, Figure
from workbench.bench.suite import BENCHMARKS, BenchProgress, SuiteResult, charts, read_tables, run_suite

__all__ = ["BENCHMARKS", "BenchContext", "BenchError", "BenchProgress", "BenchResult", "Figure", "SuiteResult",
           "charts", "read_tables", "run_suite"]
