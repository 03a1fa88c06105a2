"""Advisory directory lock for a KV cache directory shared by several processes.

``flock`` on ``<dir>/.lock``: loads and lookups that read files take it shared (for the
whole read, so nobody unlinks a file under a reader), renames, evictions, in-place header
touches and quarantine moves take it exclusive. Writing a ``.kv.tmp`` file needs no lock
(nobody else sees it). Each acquisition opens its own descriptor, so threads of one
process exclude each other like separate processes do. ds4 itself does not take this
lock (it relies on one ds4 process per machine). In a directory this process may not
write, the shared lock uses an existing lock file read-only, or none when there is none.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"


class DirLock:
    """Shared/exclusive advisory lock of one directory (not re-entrant: never nest)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_NAME

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            if mode != fcntl.LOCK_SH:
                raise
            fd = self._open_readonly()
        if fd is None:  # a read-only directory nobody can have written a lock into: read unlocked
            yield
            return
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _open_readonly(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def shared(self) -> AbstractContextManager[None]:
        """Held while reading files (lookup text checks, loads, verification)."""
        return self._hold(fcntl.LOCK_SH)

    def exclusive(self) -> AbstractContextManager[None]:
        """Held while renaming, unlinking or rewriting files in place."""
        return self._hold(fcntl.LOCK_EX)
