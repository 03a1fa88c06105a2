"""Running the benchmarks: which exist, in what order, and the suite's result."""

from __future__ import annotations

import importlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from workbench.bench.core import BenchContext, BenchError, BenchResult, Figure, machine

# name -> module (each has ``run(ctx) -> BenchResult``), in run order
BENCHMARKS: dict[str, str] = {
    "kv_io": "workbench.bench.kvio",
    "kv_chain": "workbench.bench.kvchain",
    "lookup": "workbench.bench.lookup",
    "dequant": "workbench.bench.dequant",
    "experts": "workbench.bench.experts",
    "gguf_load": "workbench.bench.loading",
    "tokenizer": "workbench.bench.tokenization",
    "prefill": "workbench.bench.prefill",
    "real_width": "workbench.bench.realwidth",
    "long_ctx": "workbench.bench.longctx",
    "ttft": "workbench.bench.ttft",
}
DEFAULT_OUT = Path("build/bench")
DEFAULT_MODEL = Path("data/tiny.gguf")
DEFAULT_REAL_DIR = Path("build/bench-models")


@dataclass(frozen=True)
class BenchProgress:
    """What a progress callback receives: benchmark ``index`` (0-based) of ``total``, its
    name, the step starting now and the seconds since the suite started."""

    bench: str
    index: int
    total: int
    step: str
    elapsed_s: float


@dataclass
class SuiteResult:
    """Every benchmark's result plus the run's description and the files written."""

    command: str
    mode: str
    machine: dict[str, Any]
    planned: list[str] = field(default_factory=list)  # benchmarks selected, in run order
    results: list[BenchResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # benchmark -> error line
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    finished: str = ""

    @property
    def figures(self) -> list[Figure]:
        return [f for r in self.results for f in r.figures]


def select(only: list[str] | None) -> list[str]:
    """The benchmarks to run, in suite order; raises BenchError naming unknown ones."""
    if not only:
        return list(BENCHMARKS)
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        raise BenchError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in only]


def read_tables(name: str, out_dir: Path = DEFAULT_OUT) -> dict[str, list[dict[str, Any]]]:
    """Benchmark ``name``'s measurement tables read back from ``<table>.csv`` in
    ``out_dir`` (the main table and any ``<name>_*`` one); {} when it has not run."""
    import pandas as pd

    select([name])
    paths = [Path(out_dir) / f"{name}.csv", *sorted(Path(out_dir).glob(f"{name}_*.csv"))]
    return {p.stem: pd.read_csv(p).to_dict("records") for p in paths if p.is_file()}


def charts(name: str, tables: dict[str, list[dict[str, Any]]]) -> list[Any]:
    """Benchmark ``name``'s plotly figures from its tables (e.g. :func:`read_tables`)."""
    select([name])
    return importlib.import_module(BENCHMARKS[name]).charts(tables)


def run_suite(mode: str = "standard", only: list[str] | None = None, out_dir: Path = DEFAULT_OUT,
              model: Path = DEFAULT_MODEL, real_dir: Path = DEFAULT_REAL_DIR, command: str = "",
              progress: Callable[[BenchProgress], None] | None = None) -> SuiteResult:
    """Run the selected benchmarks in ``mode`` ("quick", "standard" or "full"), write the
    outputs into ``out_dir`` (see :mod:`workbench.bench.report`) and return the result.

    The outputs are rewritten after every benchmark, so an interrupted run keeps the
    figures of those that finished. A benchmark that raises is recorded in ``failed``
    (its summary row says FAILED; the others still run). Scratch files live in a
    temporary directory removed at the end; ``real_dir`` keeps the synthesized
    real-width model between runs.
    """
    from workbench.bench import report

    names = select(only)
    t0 = time.perf_counter()
    suite = SuiteResult(command or f"workbench.bench.run_suite(mode={mode!r}, only={only!r})", mode, machine(), names)
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp:
        for i, name in enumerate(names):
            def step(msg: str, i: int = i, name: str = name) -> None:
                if progress is not None:
                    progress(BenchProgress(name, i, len(names), msg, time.perf_counter() - t0))

            ctx = BenchContext(mode, Path(model), Path(tmp) / name, Path(real_dir), step)
            ctx.work_dir.mkdir(parents=True)
            step("starting")
            started = time.perf_counter()
            try:
                result = importlib.import_module(BENCHMARKS[name]).run(ctx)
            except Exception as err:  # one broken benchmark must not hide the others' figures
                suite.failed[name] = f"{type(err).__name__}: {err}"
                result = BenchResult(name, notes=[f"FAILED: {suite.failed[name]}"])
            result.seconds = time.perf_counter() - started
            suite.results.append(result)
            suite.seconds = time.perf_counter() - t0
            suite.finished = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            suite.files = report.write(suite, Path(out_dir))
    return suite
