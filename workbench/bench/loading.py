"""GGUF load time against reading the file once (page cache warm), and against MLX's own
GGUF loader for a Q8_0-only file.

* ``workbench.session.load`` of the tiny model (open, validate, build every layer, close);
* ``GGUFFile`` open + ``validate_ds4`` of each real-width file present (``real-dims-N``
  under ``data/`` or the bench's real-model folder);
* a Q8_0-only file written with ``workbench.gguf.writer`` (square 4096-wide matrices):
  the workbench path (``GGUFFile`` + ``Tensors.matrix``, what the model loader does with
  Q8_0 weights: a ``QTensor`` mapping the file's blocks on the CPU with the native kernels
  built, nothing copied; else a conversion to MLX affine 8-bit) against ``mx.load`` (which
  converts to the affine form) and against reading the file once.

The read baseline copies the whole file into a buffer allocated beforehand, in 8 MiB calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np
from gguf import GGUFValue, GGUFValueType

from workbench.bench.core import BenchContext, BenchResult, Figure, best_pair
from workbench.bench.kvio import raw_read
from workbench.bench.report import grouped_bars
from workbench.gguf.layout import validate_ds4
from workbench.gguf.quants import native_available
from workbench.gguf.reader import GGUFFile
from workbench.gguf.writer import TensorInfo, write_gguf
from workbench.spec.ggml import Q8_0

NAME = "gguf_load"
Q8_WIDTH = 4096


def q8_0_file(path: Path, n_tensors: int, rows: int = Q8_WIDTH, cols: int = Q8_WIDTH) -> Path:
    """Write a GGUF holding ``n_tensors`` random Q8_0 matrices ``[rows, cols]``."""
    def chunks(seed: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, 256, (rows * cols // 32, 34), dtype=np.uint8)
        blocks[:, 0:2] = rng.uniform(2.0**-10, 2.0**-6, (blocks.shape[0], 1)).astype("<f2").view(np.uint8)
        yield blocks

    tensors = [(TensorInfo(f"blk.{i}.weight", (cols, rows), Q8_0), lambda i=i: chunks(i)) for i in range(n_tensors)]
    return write_gguf(path, {"general.architecture": GGUFValue("bench", GGUFValueType.STRING),
                             "general.name": GGUFValue("Q8_0 load benchmark", GGUFValueType.STRING)}, tensors)


def workbench_q8_0(path: Path) -> None:
    """Open the file and keep every Q8_0 matrix as the model loader does."""
    from workbench.model.weights import Tensors

    with GGUFFile(path) as f:
        t = Tensors(f)
        for name in f.tensors:
            t.matrix(name)


def mlx_load(path: Path) -> None:
    mx.eval(list(mx.load(str(path)).values()))


def session_load(path: Path) -> None:
    from workbench.session import load

    load(path, ctx=4096).close()


def open_validate(path: Path) -> None:
    with GGUFFile(path) as f:
        problems = validate_ds4(f)
    if problems:
        raise ValueError(f"{path}: {problems[0]}")


def real_files(ctx: BenchContext) -> list[Path]:
    """Real-width synthetic models present (never made here)."""
    root = ctx.model.parent
    found = {p.resolve() for d in (root, ctx.real_dir) if d.is_dir() for p in d.glob("real-dims-*.gguf")}
    return sorted(found)


def _read_pair(value_fn: Any, path: Path, reps: int) -> tuple[float, float]:
    buf = np.ones(path.stat().st_size, dtype=np.uint8)
    return best_pair(value_fn, lambda: raw_read(path, buf), reps)


def run(ctx: BenchContext, n_q8: int | None = None) -> BenchResult:
    """Run the benchmark (``n_q8`` Q8_0 matrices of 4096 x 4096, default by mode)."""
    n_q8 = n_q8 or ctx.pick(4, 16)
    result = BenchResult(NAME)
    reps = ctx.repeats
    model = ctx.tiny_model()
    ctx.step(f"gguf_load: session.load of {model.name}")
    session_load(model)  # warm-up: page cache and first-call setup
    load_s, read_s = _read_pair(lambda: session_load(model), model, reps)
    size = model.stat().st_size
    result.add_row({"file": model.name, "what": "session.load", "bytes": size, "seconds": load_s, "read_s": read_s})
    result.figures.append(Figure(NAME, "gguf.session_load.tiny", f"{model.name}, {size / 2**20:,.1f} MiB", load_s, "s",
                                 "read the file once (page cache)", read_s, False,
                                 "open + validate + build every layer"))
    for path in real_files(ctx):
        ctx.step(f"gguf_load: open + validate {path.name}")
        size = path.stat().st_size
        open_s, read_s = _read_pair(lambda: open_validate(path), path, 2)
        result.add_row({"file": path.name, "what": "open+validate", "bytes": size, "seconds": open_s, "read_s": read_s})
        result.figures.append(Figure(NAME, f"gguf.open_validate.{path.stem}", f"{path.name}, {size / 2**30:,.2f} GiB",
                                     open_s, "s", "read the file once (page cache)", read_s, False,
                                     "GGUFFile (mmap, tensor table checks) + validate_ds4"))
    ctx.step(f"gguf_load: Q8_0-only file, {n_q8} x [{Q8_WIDTH}, {Q8_WIDTH}]")
    q8 = q8_0_file(ctx.work_dir / NAME / "q8_0.gguf", n_q8)
    size = q8.stat().st_size
    workbench_q8_0(q8)
    ours_s, read_s = _read_pair(lambda: workbench_q8_0(q8), q8, reps)
    ours2_s, mlx_s = best_pair(lambda: workbench_q8_0(q8), lambda: mlx_load(q8), reps)
    what = "Q8_0 mapped (QTensor)" if native_available() else "Q8_0 -> MLX affine 8-bit"
    result.add_row({"file": q8.name, "what": what, "bytes": size, "seconds": min(ours_s, ours2_s),
                    "read_s": read_s, "mx_load_s": mlx_s})
    sizes = f"{n_q8} Q8_0 matrices [{Q8_WIDTH}, {Q8_WIDTH}], {size / 2**20:,.1f} MiB"
    result.figures += [
        Figure(NAME, "gguf.q8_0_load.vs_read", sizes, ours_s, "s", "read the file once (page cache)", read_s, False,
               f"GGUFFile + Tensors.matrix ({what})"),
        Figure(NAME, "gguf.q8_0_load.vs_mx_load", sizes, ours2_s, "s", "mx.load (MLX's GGUF loader, same affine form)",
               mlx_s, False),
    ]
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    rows = tables[NAME]
    series = [("load / read once", [r["seconds"] / r["read_s"] for r in rows]),
              ("mx.load / read once", [r["mx_load_s"] / r["read_s"] if "mx_load_s" in r else None for r in rows])]
    return [grouped_bars([f"{r['file']} ({r['what']})" for r in rows], series,
                         "GGUF load time in units of one read of the file", "x read time")]
