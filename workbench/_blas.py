"""OpenBLAS for MLX's CPU backend.

The Linux ``mlx[cpu]`` wheel links the netlib *reference* BLAS (a few GFLOP/s). Loading
Debian's OpenBLAS into the process with ``RTLD_GLOBAL`` before MLX is imported makes
MLX's ``sgemm`` calls resolve to OpenBLAS (same results, ~50x faster on 2 cores).

``preload()`` does that; ``python -m workbench._blas --install-pth`` writes a ``.pth``
hook into the current environment's site-packages so that every process of the venv
(CLI, pytest, the Jupyter kernel) preloads it at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import sysconfig
import warnings

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libopenblasp-r0.so",
)
PTH_NAME = "workbench_openblas.pth"

loaded: str | None = None


def preload() -> str | None:
    """Load OpenBLAS globally; return its path, or None where absent or not needed."""
    global loaded
    if loaded is not None or sys.platform != "linux":
        return loaded
    if os.environ.get("WORKBENCH_NO_OPENBLAS"):
        return None
    names = list(CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        names.insert(0, found)
    for name in names:
        try:
            ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None


def warn_if_reference_blas() -> None:
    """Warn once, visibly, when MLX runs on the slow reference BLAS."""
    if sys.platform == "linux" and preload() is None and not os.environ.get("WORKBENCH_NO_OPENBLAS"):
        warnings.warn(
            "OpenBLAS not found: MLX's CPU backend uses the bundled reference BLAS "
            "(matmul ~50x slower). Install it: apt-get install libopenblas0-pthread",
            RuntimeWarning,
            stacklevel=2,
        )


def install_pth() -> str:
    """Write the start-up hook into this interpreter's site-packages; return its path."""
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w") as f:
        f.write("import workbench._blas as _wb_blas; _wb_blas.preload()\n")
    return path


if __name__ == "__main__":
    if "--install-pth" in sys.argv:
        where = install_pth()
        lib = preload()
        if lib:
            print(f"OpenBLAS hook installed ({where}) -> {lib}")
        else:
            print(f"warning: OpenBLAS not found; MLX will use the slow reference BLAS "
                  f"(hook installed at {where}, active once libopenblas0 is present)",
                  file=sys.stderr)
