"""Advisory directory lock for a KV cache directory shared by several processes.

``flock`` on ``<dir>/.lock``: loads and lookups that read files take it shared (for the
whole read, so nobody unlinks a file under a reader), renames, evictions, in-place header
touches and quarantine moves take it exclusive. Writing a ``.kv.tmp`` file needs no lock
(nobody else sees it). Each acquisition opens its own descriptor, so threads of one
process exclude each other like separate processes do. ds4 itself does not take this
lock (it relies on one ds4 process per machine). In a directory this process may not
write, the shared lock uses an existing lock file read-only, or none when there is none.

The lock file is opened without following links and must be a regular file (a link, a
FIFO or a directory named ``.lock`` is refused with :class:`LockError`). A wait gives up
after ``timeout_s`` seconds (default ``LOCK_TIMEOUT_S``, or the environment's
``WORKBENCH_KV_LOCK_TIMEOUT_S``) with a message naming the holder when known: an
exclusive holder writes ``pid <pid> on <host>: <command>`` into the lock file while it
holds it; a shared holder is named from ``/proc/locks`` where there is one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

from workbench.kv.errors import KVStoreError
from workbench.safeopen import kind_of

LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 60.0  # seconds a lock wait lasts before giving up
TIMEOUT_ENV = "WORKBENCH_KV_LOCK_TIMEOUT_S"
POLL_S = 0.05  # the longest wait between tries while another process holds the lock (from 1 ms, doubling)
HOLDER_BYTES = 512  # the most of the holder line written or read


class LockError(KVStoreError):
    """The directory lock cannot be taken: timed out, or the lock file is unusable.
    ``errno`` is the operating system's reason when there is one (EROFS: a read-only disk)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def default_timeout() -> float:
    """``WORKBENCH_KV_LOCK_TIMEOUT_S`` when set to a number >= 0, else ``LOCK_TIMEOUT_S``."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return LOCK_TIMEOUT_S
    return value if value >= 0 else LOCK_TIMEOUT_S


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), at most ``limit`` chars."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def holder_line() -> bytes:
    """What an exclusive holder writes into the lock file: pid, host and command."""
    argv = list(sys.argv) or [""]
    argv[0] = "workbench" if argv[0].endswith(os.path.join("workbench", "cli.py")) else os.path.basename(argv[0])
    line = one_line(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(argv)}")
    return line.encode("utf-8", "replace")[:HOLDER_BYTES]


def _proc_lock_pids(st: os.stat_result) -> list[int]:
    """Pids ``/proc/locks`` shows holding a lock on the file with stat ``st`` (Linux; [] elsewhere)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            rows = [line.split() for line in f]
    except OSError:
        return []
    return sorted({int(r[4]) for r in rows if len(r) > 5 and "->" not in r and r[5] == want and r[4].isdigit()})


def _stale(line: str) -> bool:
    """Whether a holder line names a process of this host that is gone (it crashed holding the lock)."""
    m = re.match(r"pid (\d+) on (\S+):", line)
    if m is None or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(HOLDER_BYTES).replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


class DirLock:
    """Shared/exclusive advisory lock of one directory (not re-entrant: never nest).

    ``timeout_s`` None uses ``default_timeout()``; 0 fails at once when the lock is held.
    """

    def __init__(self, directory: str | os.PathLike, timeout_s: float | None = None):
        self.path = Path(directory) / LOCK_NAME
        self.timeout_s = default_timeout() if timeout_s is None else timeout_s

    def _open(self, writable: bool) -> int | None:
        """The lock file's descriptor (None: read-only directory without one)."""
        flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags | (os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY), 0o600)
        except FileNotFoundError:
            if writable:
                raise LockError(f"{self.path.parent}: cache directory no longer exists") from None
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise LockError(f"{self.path}: is a symbolic link, not a lock file (remove it)") from None
            if err.errno in (errno.EISDIR, errno.ENXIO):
                what = "a directory" if err.errno == errno.EISDIR else "a socket"
                raise LockError(f"{self.path}: is {what}, not a lock file (remove it)") from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise LockError(f"{self.path}: is {kind_of(mode)}, not a lock file (remove it)")
        return fd

    def _fd(self, mode: int) -> int | None:
        try:
            return self._open(writable=True)
        except OSError as err:
            if mode == fcntl.LOCK_SH and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                try:
                    return self._open(writable=False)
                except OSError as err2:
                    err = err2
            raise LockError(f"{self.path}: cannot open the directory lock: {err.strerror or err}", err.errno) from None

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        fd = self._fd(mode)
        if fd is None:  # a read-only directory nobody can have written a lock into: read unlocked
            yield
            return
        try:
            self._acquire(fd, mode)
            named = mode == fcntl.LOCK_EX and self._name_holder(fd)
            try:
                yield
            finally:
                if named:
                    try:
                        os.ftruncate(fd, 0)
                    except OSError:
                        pass
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _acquire(self, fd: int, mode: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as err:
                raise LockError(f"{self.path}: cannot lock: {err.strerror or err}") from None
            if time.monotonic() >= deadline:
                raise LockError(f"{self.path}: still locked after {self.timeout_s:g} s by {self.holder(fd)} "
                                f"(set {TIMEOUT_ENV} to wait longer)")
            time.sleep(pause)
            pause = min(2 * pause, POLL_S)

    def _name_holder(self, fd: int) -> bool:
        """Write this process's holder line into the lock file (False: read-only, not written)."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_line(), 0)
            return True
        except OSError:
            return False

    def holder(self, fd: int) -> str:
        """Who holds the lock, in words ("an unknown process" when nothing says)."""
        try:
            line = one_line(os.pread(fd, HOLDER_BYTES, 0).decode("utf-8", "replace"))
            st = os.fstat(fd)
        except OSError:
            return "an unknown process"
        if line and not _stale(line):
            return line
        pids = [p for p in _proc_lock_pids(st) if p != os.getpid()]
        if pids:
            return ", ".join(f"pid {p} ({one_line(_command_of(p), 120) or 'command unknown'})" for p in pids[:3])
        return "an unknown process"

    def shared(self) -> AbstractContextManager[None]:
        """Held while reading files (lookup text checks, loads, verification)."""
        return self._hold(fcntl.LOCK_SH)

    def exclusive(self) -> AbstractContextManager[None]:
        """Held while renaming, unlinking or rewriting files in place."""
        return self._hold(fcntl.LOCK_EX)
