"""One MLX stream every thread may use: what lets a notebook widget's worker thread
continue a session built on the kernel's main thread.

MLX (since 0.31.2) ties each lazy array to the stream of the thread that made it: an
array built on the main thread's default stream cannot be evaluated on another thread
("There is no Stream(cpu, 0) in current thread"). :func:`share_default_stream` makes the
calling thread's default stream a ``new_thread_unsafe_stream`` that another thread
adopts with :func:`adopt_shared_stream`. It must run before the arrays are made: the
``ds4-workbench`` kernel runs it at start (``PYTHONSTARTUP``, see
:mod:`workbench.kernelspec`). MLX does not synchronise such a stream; the workbench uses
it from one thread at a time (the widgets run one long action at a time, on one worker).
"""

from __future__ import annotations

import mlx.core as mx

_shared: mx.Stream | None = None


def share_default_stream() -> bool:
    """Make this thread's default stream one that other threads may use (once per
    process). False where MLX has no such stream (older MLX: streams were shared)."""
    global _shared
    if _shared is None and hasattr(mx, "new_thread_unsafe_stream"):
        _shared = mx.new_thread_unsafe_stream(mx.default_device())
        mx.set_default_stream(_shared)
    return _shared is not None


def shared() -> bool:
    """True once :func:`share_default_stream` has run in this process."""
    return _shared is not None


def adopt_shared_stream() -> None:
    """Make the shared stream this thread's default (call first on a worker thread)."""
    if _shared is not None:
        mx.set_default_stream(_shared)
