"""The one streaming reader and writer both checkpoint payloads (DSV4, DSVL) use.

Bytes move in pieces of ``PIECE`` (2 MiB), and every piece is fed to the stream's
checksums while it is still in cache: the writer (``Sink``) hashes what it writes, the
reader (``Source``) what it reads, straight into the caller's buffer (``readinto``, no
payload-sized copy). The reader keeps a byte budget (the header's payload size), so a
field that would run past it fails before any read, naming the field.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from workbench.kv.checksum import Hasher
from workbench.kv.errors import KVFormatError

PIECE = 2 * 1024 * 1024  # bytes moved (and hashed while in cache) per read or write
Progress = Callable[[int, int], None]  # (bytes done, bytes total), called as bytes stream


def write_all(f: BinaryIO, data: bytes | memoryview) -> int:
    """Write every byte (raw files may write partially); return the count."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = f.write(mv[done:])
        if n is None or n <= 0:
            raise OSError(f"write returned {n}")
        done += n
    return done


def as_f32(arr: Any) -> np.ndarray:
    """A C-contiguous float32 NumPy view (zero-copy for contiguous float32 MLX/NumPy arrays)."""
    return np.ascontiguousarray(np.asarray(arr, dtype=np.float32))


def f32_bytes(arr: Any) -> memoryview:
    """The bytes of ``arr`` as float32 (see ``as_f32``)."""
    return memoryview(as_f32(arr)).cast("B")


class Sink:
    """Writes to ``f`` piece by piece, feeding every piece to ``hashers`` (and to the
    per-call ones given to ``put``); ``progress`` gets (bytes written, ``total``) per piece."""

    def __init__(self, f: BinaryIO, hashers: Sequence[Hasher] = (), progress: Progress | None = None,
                 total: int = 0) -> None:
        self.f, self.hashers, self.progress, self.total = f, tuple(hashers), progress, total
        self.n = 0  # bytes written

    def put(self, data: bytes | memoryview, *also: Hasher) -> int:
        """Write ``data``; return its length."""
        mv = memoryview(data).cast("B")
        for at in range(0, len(mv), PIECE):
            piece = mv[at:at + PIECE]
            for h in self.hashers + also:
                h.update(piece)
            self.n += write_all(self.f, piece)
            if self.progress is not None:
                self.progress(self.n, self.total)
        return len(mv)


class Source:
    """Exact reads from ``f`` within a byte ``budget`` counted from where ``f`` stood at
    creation, each piece fed to ``hashers`` (and to the per-call ones given to ``fill``).

    Errors are ``error`` and name ``name``, the field (``what`` or ``locate(offset)``) and
    ``kind`` (what the budget holds, e.g. "session payload").
    """

    def __init__(self, f: BinaryIO, budget: int, name: str, hashers: Sequence[Hasher] = (),
                 progress: Progress | None = None, kind: str = "session payload",
                 error: type[KVFormatError] = KVFormatError, budget_name: str = "payload_bytes") -> None:
        self.f, self.budget, self.left, self.name = f, budget, budget, name
        self.hashers, self.progress, self.kind, self.error = tuple(hashers), progress, kind, error
        self.budget_name = budget_name
        self.base = f.tell()
        self.done = 0  # offset of the next byte, from the start

    def reserve(self, n: int, what: str) -> None:
        """Claim ``n`` bytes of the budget for ``what`` (raises when they are not there)."""
        if n > self.left:
            raise self.error(f"{self.name}: truncated {self.kind}: {what} needs {n} bytes, "
                             f"{self.left} left of {self.budget_name}")
        self.left -= n

    def seek(self, offset: int) -> None:
        """Continue reading at ``offset`` from the start (for partial reads)."""
        self.f.seek(self.base + offset)
        self.done = offset

    def fill(self, mv: memoryview, locate: Callable[[int], str], *also: Hasher) -> None:
        """Read exactly ``len(mv)`` bytes into ``mv``; ``locate(offset in mv)`` names the field there."""
        pos = 0
        while pos < len(mv):
            piece = mv[pos:pos + PIECE]
            got = 0
            while got < len(piece):
                n = self.f.readinto(piece[got:])
                if not n:
                    raise self.error(f"{self.name}: file ends inside {locate(pos + got)} "
                                     f"(payload byte {self.done + pos + got} of {self.budget})")
                got += n
            for h in self.hashers + also:
                h.update(piece, locate(pos))
            pos += len(piece)
            if self.progress is not None:
                self.progress(self.done + pos, self.budget)
        self.done += len(mv)

    def bytes(self, n: int, what: str) -> bytes:
        self.reserve(n, what)
        buf = bytearray(n)
        self.fill(memoryview(buf), lambda _: what)
        return bytes(buf)

    def array(self, shape: tuple[int, ...], dtype: str, what: str) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self.reserve(out.nbytes, what)
        if out.nbytes:
            self.fill(memoryview(out.reshape(-1)).cast("B"), lambda _: what)
        return out

    def skip(self, n: int, locate: Callable[[int], str]) -> None:
        """Read (and hash) ``n`` reserved bytes without keeping them."""
        scratch = memoryview(bytearray(min(n, PIECE)))
        pos = 0
        while pos < n:
            take = min(n - pos, len(scratch))
            base = pos
            self.fill(scratch[:take], lambda o: locate(base + o))
            pos += take
