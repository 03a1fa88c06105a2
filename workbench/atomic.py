"""Crash-safe file publication: write to ``<final>.tmp.<pid>`` beside it, rename on success.

Readers never see a partial file under its final name; on any failure (an exception,
KeyboardInterrupt) the temp file is removed and whatever was at the final name is left
untouched. Callers translate ``OSError`` into their own error naming the file.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def tmp_path(final: Path) -> Path:
    """The temp name a process writes ``final`` under (same directory, so rename is atomic)."""
    return final.with_name(f"{final.name}.tmp.{os.getpid()}")


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """The temp path to write ``final`` under, for writers that open the file themselves;
    renamed onto ``final`` when the block completes, removed on any failure."""
    final = Path(final)
    tmp = tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(final: str | os.PathLike, durable: bool = False) -> Iterator[BinaryIO]:
    """Open ``<final>.tmp.<pid>`` for binary writing; rename it to ``final`` when the block
    completes. ``durable`` fsyncs the file before and its directory after the rename."""
    final = Path(final)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        yield f
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        fsync_dir(final.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
