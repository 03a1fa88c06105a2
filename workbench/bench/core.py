"""What every benchmark shares: figures (a measurement over a baseline from the same run),
the run context, timing and the machine description.

Absolute times on a shared two-core machine are noise, so a benchmark never reports a
number alone: each :class:`Figure` divides a measured value by a baseline measured in the
same process, right next to it (interleaved repeats, best of each), in the same unit.
``ratio = value / baseline``. For a time (``higher_is_better`` False) a ratio of 1.3 means
"30 % slower than the baseline"; for a rate (True) a ratio of 0.7 means "70 % of the
baseline's rate".
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError

MODES = ("quick", "standard", "full")


class BenchError(WorkbenchError):
    """A benchmark cannot run as asked (unknown name, missing input, bad option)."""


@dataclass(frozen=True)
class Figure:
    """One measured value over its baseline, both in ``unit``, with the sizes in words."""

    bench: str  # benchmark that produced it, e.g. "kv_io"
    name: str  # figure id, e.g. "kv.save[20480]"
    sizes: str  # what was measured, e.g. "20,480 tokens, 291.7 MiB payload"
    value: float
    unit: str  # "s", "GB/s", "tok/s", "GFLOP/s", "bytes" ...
    baseline_name: str  # what the baseline is, e.g. "raw sequential write, same bytes"
    baseline: float
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        """``value / baseline`` (inf when the baseline is 0)."""
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def reads_as(self) -> str:
        """How to read the ratio: ``"x baseline time"`` or ``"x baseline rate"``."""
        what = "rate" if self.higher_is_better else ("size" if self.unit == "bytes" else "time")
        return f"x baseline {what}"

    def row(self) -> dict[str, Any]:
        """A flat dict (the figure's fields plus ``ratio`` and ``reads_as``)."""
        return {**asdict(self), "ratio": self.ratio, "reads_as": self.reads_as}


@dataclass
class BenchResult:
    """What one benchmark returns: its measurement tables (each written as
    ``<table>.csv``, the main one named after the benchmark), figures, charts, notes."""

    name: str
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    charts: list[Any] = field(default_factory=list)  # plotly go.Figure
    notes: list[str] = field(default_factory=list)  # skipped figures and caveats, one line each
    seconds: float = 0.0

    def add_row(self, row: dict[str, Any], table: str = "") -> None:
        """Append a measurement row to ``table`` (default: the benchmark's main table)."""
        self.tables.setdefault(table or self.name, []).append(row)


Step = Callable[[str], None]  # progress: a one-line description of the step starting now


@dataclass
class BenchContext:
    """A run's settings and shared inputs.

    ``mode`` is "quick" (small sizes, under 5 minutes on two cores), "standard" (the
    default sizes) or "full" (standard plus the real-width model ``real-dims-4``).
    ``model`` is the tiny ds4 GGUF (when the path does not exist, synthesized on first
    use next to ``work_dir``, where the other benchmarks of the run find it);
    ``work_dir`` holds this benchmark's scratch files; ``real_dir`` is where the
    synthesized real-width models (``real-dims-1.gguf``, ``real-dims-4.gguf``) are kept
    between runs.
    """

    mode: str
    model: Path
    work_dir: Path
    real_dir: Path
    step: Step = lambda _msg: None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BenchError(f"mode {self.mode!r}, expected one of {', '.join(MODES)}")

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    @property
    def full(self) -> bool:
        return self.mode == "full"

    @property
    def repeats(self) -> int:
        """Timed repeats per measurement (the best counts)."""
        return 3 if self.quick else 5

    def pick(self, quick: Any, standard: Any, full: Any | None = None) -> Any:
        """The setting for this mode (``full`` defaults to ``standard``)."""
        if self.quick:
            return quick
        return standard if full is None or not self.full else full

    def tiny_model(self) -> Path:
        """The tiny model (preset "tiny", seed 0), synthesized once per run if absent."""
        if not self.model.exists():
            shared = self.work_dir.parent / "tiny.gguf"
            if not shared.exists():
                from workbench.synth import synthesize

                self.step(f"synthesizing the tiny model ({self.model} is absent)")
                synthesize("tiny", shared, seed=0)
            self.model = shared
        return self.model


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best(fn: Callable[[], Any], repeats: int, after: Callable[[], Any] | None = None) -> float:
    """Fastest of ``repeats`` timed calls (``after()`` untimed after each)."""
    out = float("inf")
    for _ in range(max(1, repeats)):
        out = min(out, timed(fn))
        if after is not None:
            after()
    return out


def best_pair(value_fn: Callable[[], Any], baseline_fn: Callable[[], Any], repeats: int,
              after: Callable[[], Any] | None = None) -> tuple[float, float]:
    """Interleave ``repeats`` rounds of the baseline then the measured call (``after()``
    untimed after each call); return (best value s, best baseline s)."""
    v = b = float("inf")
    for _ in range(max(1, repeats)):
        b = min(b, timed(baseline_fn))
        if after is not None:
            after()
        v = min(v, timed(value_fn))
        if after is not None:
            after()
    return v, b


class Copier:
    """``np.copyto`` of float32 buffers by one thread or split over ``threads`` (default
    ``min(cpu_count, 8)``, as many as the native kernels use), for copy baselines that
    take the better of the two: the bandwidth the machine offers, whatever its cores.
    Use as a context manager (it owns a thread pool)."""

    def __init__(self, threads: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.threads = threads or max(1, min(os.cpu_count() or 1, 8))
        self._pool = ThreadPoolExecutor(self.threads)

    def __enter__(self) -> "Copier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown()

    def one(self, dst: Any, src: Any) -> None:
        """One thread copies 1-D ``src`` into ``dst``."""
        import numpy as np

        np.copyto(dst, src)

    def split(self, dst: Any, src: Any) -> None:
        """``threads`` threads copy one contiguous piece of 1-D ``src`` into ``dst`` each."""
        import numpy as np

        step = -(-src.size // self.threads)
        list(self._pool.map(lambda a: np.copyto(dst[a : a + step], src[a : a + step]), range(0, src.size, step)))

    def best_seconds(self, dst: Any, src: Any, repeats: int) -> float:
        """Fastest of ``repeats`` rounds of both ways of copying."""
        return min(best(lambda: self.one(dst, src), repeats), best(lambda: self.split(dst, src), repeats))


def memory_bytes() -> int:
    """Physical memory in bytes (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, Python, MLX version and the BLAS MLX's matmuls resolve to."""
    import mlx.core as mx

    from workbench.doctor import blas_in_process, cpu_model

    blas = blas_in_process()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(memory_bytes() / 2**30, 1),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "blas": blas["kind"],
        "blas_path": blas["path"],
        "executable": sys.executable,
    }


def mib(n: int | float) -> float:
    return n / 2**20


def fmt_tokens(n: int) -> str:
    return f"{n:,}"
