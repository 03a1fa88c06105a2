"""ds4-workbench: DeepSeek V4 Flash on MLX, with ds4 GGUF loading and KV checkpoints.

Kept light on purpose: a ``.pth`` hook imports ``workbench._blas`` in every venv process,
so nothing heavy may be imported here. Public entry points load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("workbench.session", "load"),
    "Session": ("workbench.session", "Session"),
    "GGUFFile": ("workbench.gguf.reader", "GGUFFile"),
    "GGUFError": ("workbench.gguf.reader", "GGUFError"),
    "KVStore": ("workbench.kv.store", "KVStore"),
    "Engine": ("workbench.engine", "Engine"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
