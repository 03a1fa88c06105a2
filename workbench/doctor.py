"""Environment check: which Python, MLX, device and BLAS this process really runs on.

MLX's CPU backend sends every float32 matmul to the BLAS ``sgemm`` that the process
resolved. On Linux the ``mlx[cpu]`` wheel carries the netlib *reference* BLAS
(``mlx_cpu.libs/libblas-*.so``, ~8 GFLOP/s on two cores); the workbench preloads
Debian's OpenBLAS through a ``.pth`` hook (:mod:`workbench._blas`) instead (~100
GFLOP/s). On macOS MLX uses Apple's Accelerate framework. :func:`diagnose` reports
which of these the process has mapped, whether the hook is installed, and the matmul
throughput it measures, so that a slow setup shows up before a long prefill does.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

from workbench import _blas

DEFAULT_SIZES = (1024, 2048)
DEFAULT_REPEATS = 3
# Below this float32 matmul rate (GFLOP/s) the CPU backend is too slow for real work.
SLOW_GFLOPS = 20.0
# BLAS families by a substring of the shared-object file name, checked in this order:
# an optimized library mapped next to the reference one wins (it was preloaded).
BLAS_FAMILIES = (
    ("openblas", "libopenblas"),
    ("mkl", "libmkl"),
    ("blis", "libblis"),
    ("reference", "libblas"),
)
ENV_VARS = ("WORKBENCH_NO_OPENBLAS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def blas_from_maps(maps_text: str) -> dict:
    """Read the BLAS libraries out of a ``/proc/<pid>/maps`` text.

    Each maps line is ``address perms offset dev inode [path]``; the path (which may
    contain spaces) is everything after the fifth field. Returns ``{"kind", "path",
    "mapped"}``: ``mapped`` lists every distinct BLAS shared object in first-seen
    order, ``kind`` is the family that serves ``sgemm`` (``"openblas"``, ``"mkl"``,
    ``"blis"``, ``"reference"``, or ``"none"`` when no BLAS is mapped) and ``path``
    the file of that family (None when none).
    """
    mapped: list[str] = []
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6:
            continue
        path = fields[5].strip()
        name = os.path.basename(path)
        if path.startswith("/") and any(key in name for _, key in BLAS_FAMILIES) and path not in mapped:
            mapped.append(path)
    for kind, key in BLAS_FAMILIES:
        for path in mapped:
            if key in os.path.basename(path):
                return {"kind": kind, "path": path, "mapped": mapped}
    return {"kind": "none", "path": None, "mapped": mapped}


def blas_in_process() -> dict:
    """The BLAS this process uses, as :func:`blas_from_maps` reports it.

    Linux reads ``/proc/self/maps`` (call it after MLX is imported: the reference
    BLAS is mapped at import). macOS reports Accelerate, which MLX links there; other
    systems report ``"unknown"``.
    """
    if sys.platform == "linux":
        return blas_from_maps(Path("/proc/self/maps").read_text())
    if sys.platform == "darwin":
        path = "/System/Library/Frameworks/Accelerate.framework"
        return {"kind": "accelerate", "path": path, "mapped": [path]}
    return {"kind": "unknown", "path": None, "mapped": []}


def pth_hook() -> dict:
    """Whether the OpenBLAS start-up hook is installed in this environment.

    Returns ``{"installed": bool, "path": str, "preloaded": str | None}``; ``path``
    is where the hook lives (or would live) in this interpreter's site-packages and
    ``preloaded`` the OpenBLAS this process loaded through it (None if it did not).
    """
    path = os.path.join(sysconfig.get_paths()["purelib"], _blas.PTH_NAME)
    return {"installed": os.path.isfile(path), "path": path, "preloaded": _blas.loaded}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` or ``sysctl``), else ``platform.processor()``."""
    if sys.platform == "linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def matmul_gflops(n: int, repeats: int = DEFAULT_REPEATS) -> dict:
    """Best-of-``repeats`` float32 ``(n, n) @ (n, n)`` rate with MLX on its default device.

    One untimed warm-up product first. Returns ``{"n", "seconds", "gflops"}`` with
    ``seconds`` the fastest run's wall time and ``gflops = 2 n^3 / seconds / 1e9``.
    """
    import mlx.core as mx

    key_a, key_b = mx.random.split(mx.random.key(0))
    a = mx.random.normal((n, n), dtype=mx.float32, key=key_a)
    b = mx.random.normal((n, n), dtype=mx.float32, key=key_b)
    mx.eval(a, b)
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return {"n": n, "seconds": best, "gflops": 2.0 * n**3 / best / 1e9}


def _mlx_info() -> dict:
    try:
        import mlx.core as mx
    except ImportError as err:
        return {"version": None, "default_device": None, "metal": False, "error": str(err)}
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    return {"version": mx.__version__, "default_device": str(mx.default_device()), "metal": metal, "error": None}


def _verdict(report: dict) -> tuple[str, list[str]]:
    warnings: list[str] = []
    mlx, blas, hook = report["mlx"], report["blas"], report["pth_hook"]
    if mlx["error"]:
        return f"broken: MLX does not import ({mlx['error']})", [f"MLX import failed: {mlx['error']}"]
    on_cpu = "cpu" in (mlx["default_device"] or "")
    if on_cpu and blas["kind"] == "reference":
        why = (
            "WORKBENCH_NO_OPENBLAS is set" if os.environ.get("WORKBENCH_NO_OPENBLAS")
            else "install OpenBLAS (apt-get install libopenblas0-pthread) and run `make blas`"
        )
        warnings.append(f"MLX runs on the netlib reference BLAS (matmul ~10x-50x slower): {why}")
    if sys.platform == "linux" and not hook["installed"]:
        warnings.append(f"OpenBLAS start-up hook missing ({hook['path']}): run `python -m workbench._blas --install-pth`")
    best = max((m["gflops"] for m in report["matmul"]), default=None)
    if on_cpu and best is not None and best < SLOW_GFLOPS:
        warnings.append(f"float32 matmul reaches only {best:.1f} GFLOP/s (expected > {SLOW_GFLOPS:.0f})")
    rate = f", {best:.1f} GFLOP/s float32 matmul" if best is not None else ""
    where = f"MLX {mlx['version']} on {mlx['default_device']} with {blas['kind']} BLAS{rate}"
    return (f"slow: {where}" if warnings else f"ok: {where}"), warnings


def diagnose(measure: bool = True, *, sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS) -> dict:
    """Report the environment the workbench runs in; ``measure`` times MLX matmuls.

    Keys: ``python`` (version, executable, prefix), ``platform`` (system, release,
    machine, cpu, cpu_count), ``mlx`` (version, default_device, metal, error),
    ``blas`` (:func:`blas_in_process`), ``pth_hook`` (:func:`pth_hook`), ``env`` (the
    BLAS/MLX environment variables that are set), ``matmul`` (one
    :func:`matmul_gflops` entry per size in ``sizes``, empty unless ``measure``),
    ``verdict`` (one line starting ``ok:``, ``slow:`` or ``broken:``) and
    ``warnings`` (list of one-line strings).
    """
    report: dict = {
        "python": {"version": platform.python_version(), "executable": sys.executable, "prefix": sys.prefix},
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
        },
        "mlx": _mlx_info(),
    }
    report["matmul"] = [matmul_gflops(n, repeats) for n in sizes] if measure and not report["mlx"]["error"] else []
    report["blas"] = blas_in_process()
    report["pth_hook"] = pth_hook()
    report["env"] = {name: os.environ[name] for name in ENV_VARS if name in os.environ}
    report["verdict"], report["warnings"] = _verdict(report)
    return report


def format_report(report: dict) -> str:
    """The :func:`diagnose` report as aligned human-readable lines."""
    py, plat, mlx, blas, hook = report["python"], report["platform"], report["mlx"], report["blas"], report["pth_hook"]
    lines = [
        f"python      {py['version']}  ({py['executable']})",
        f"system      {plat['system']} {plat['release']} {plat['machine']}, {plat['cpu']}, {plat['cpu_count']} CPUs",
        f"mlx         {mlx['version'] or 'not importable'}  default device {mlx['default_device']}"
        + ("  (Metal available)" if mlx["metal"] else ""),
        f"blas        {blas['kind']}  {blas['path'] or ''}".rstrip(),
    ]
    lines += [f"            also mapped: {path}" for path in blas["mapped"] if path != blas["path"]]
    hook_state = "installed" if hook["installed"] else "missing"
    lines.append(f"pth hook    {hook_state}  {hook['path']}")
    for name, value in report["env"].items():
        lines.append(f"env         {name}={value}")
    for m in report["matmul"]:
        lines.append(f"matmul      {m['n']}^3 float32  {m['gflops']:8.1f} GFLOP/s  ({m['seconds'] * 1e3:.1f} ms)")
    lines += [f"warning     {w}" for w in report["warnings"]]
    lines.append(f"verdict     {report['verdict']}")
    return "\n".join(lines)
