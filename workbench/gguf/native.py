"""The optional native kernels (``native/dequant.cpp``, built by ``make native`` into
``workbench/gguf/_native*.so``), loaded once.

:data:`NATIVE` is the extension module when it is built for the running MLX and not
switched off (``WORKBENCH_NATIVE=0``), else None; every user has a pure-Python/MLX path
for None. A module built against another MLX is never called into (its C++ ABI differs).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def load_native() -> ModuleType | None:
    """The extension module, or None (not built, another MLX, or WORKBENCH_NATIVE=0)."""
    if os.environ.get("WORKBENCH_NATIVE", "1") == "0":
        return None
    try:
        import mlx.core as mx

        mod = importlib.import_module("workbench.gguf._native")
    except ImportError:
        return None
    return mod if getattr(mod, "mlx_version", None) == mx.__version__ else None


NATIVE: ModuleType | None = load_native()
