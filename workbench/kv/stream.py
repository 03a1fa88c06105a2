"""The one streaming reader and writer both checkpoint payloads (DSV4, DSVL) use.

Bytes move in pieces and every piece is fed to the stream's checksums while it is still
in cache: the writer (``Sink``) hashes what it has just written, the reader (``Source``)
what it has just read, straight into the caller's buffer (``readinto``, no payload-sized
copy). The reader keeps a byte budget (the header's payload size), so a field that would
run past it fails before any read, naming the field.

The writer moves ``WRITE_PIECE`` (8 MiB) per ``os.write``; with checksums to compute, a
helper thread hashes each piece right after this thread has written it (the kernel's copy
into the page cache has just pulled it into the CPU cache; ``xxhash`` and ``zlib`` release
the GIL), so hashing overlaps the next write and never reads the state's bytes cold from
memory. ``Sink.put_many`` keeps that pipeline across many tensors. The reader moves
``PIECE`` (2 MiB) per call: when a read spans several pieces and there are checksums, the
reads run on the helper thread while this thread hashes (piece k is hashed while piece k+1
is read). Pieces move in file order, one system call at a time, and every call returns only
after its last piece has moved and been hashed (no I/O or hashing left in flight, whatever
it raises).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from queue import SimpleQueue
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np

from workbench.kv.checksum import Hasher
from workbench.kv.errors import KVFormatError

PIECE = 2 * 1024 * 1024  # bytes moved (and hashed while in cache) per read
WRITE_PIECE = 8 * 1024 * 1024  # bytes per write (hashed right after, while in cache)
Progress = Callable[[int, int], None]  # (bytes done, bytes total), called as bytes stream
_io_pool: ThreadPoolExecutor | None = None
_io_pool_lock = threading.Lock()


def _io() -> ThreadPoolExecutor:
    """The helper thread the pipelined reads run their system calls on, and the pipelined
    writes their hashing (made on first use; one thread, so one process's streams share it
    in call order)."""
    global _io_pool
    with _io_pool_lock:
        if _io_pool is None:
            _io_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-io")
        return _io_pool


def _forget_io_pool() -> None:
    """In a forked child the helper thread does not exist: make a new one on first use."""
    global _io_pool
    _io_pool = None


os.register_at_fork(after_in_child=_forget_io_pool)


def _settle(pending: Future | None) -> None:
    """Wait for an I/O call still in flight, dropping its error (one is already raised)."""
    if pending is not None:
        try:
            pending.result()
        except BaseException:
            pass


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
    per-call ones given to ``put``/``put_many``) right after it is written; ``progress``
    gets (bytes written, ``total``) per piece."""

    def __init__(self, f: BinaryIO, hashers: Sequence[Hasher] = (), progress: Progress | None = None,
                 total: int = 0) -> None:
        self.f, self.hashers, self.progress, self.total = f, tuple(hashers), progress, total
        self.n = 0  # bytes written

    def put(self, data: bytes | memoryview, *also: Hasher) -> int:
        """Write ``data``; return its length (every byte is written and hashed when it returns)."""
        mv = memoryview(data).cast("B")
        if len(mv) > WRITE_PIECE:
            return self.put_many((mv,), *also)
        hashers = self.hashers + also
        self._wrote(write_all(self.f, mv))
        for h in hashers:
            h.update(mv)
        return len(mv)

    def put_many(self, datas: Iterable[bytes | memoryview], *also: Hasher) -> int:
        """Write each buffer of ``datas`` in order (a generator may yield them as it goes);
        return the bytes written. With checksums, the helper thread hashes each piece after
        it is written while this thread writes the next; every byte is written and hashed
        when it returns."""
        hashers = self.hashers + also
        written: SimpleQueue[memoryview | None] = SimpleQueue()
        hashing = _io().submit(_hash_pieces, written, hashers) if hashers else None
        n = 0
        try:
            for data in datas:
                mv = memoryview(data).cast("B")
                for at in range(0, len(mv), WRITE_PIECE):
                    piece = mv[at:at + WRITE_PIECE]
                    self._wrote(write_all(self.f, piece))
                    written.put(piece)
                n += len(mv)
        except BaseException:
            written.put(None)
            _settle(hashing)
            raise
        written.put(None)
        if hashing is not None:
            hashing.result()
        return n

    def _wrote(self, n: int) -> None:
        self.n += n
        if self.progress is not None:
            self.progress(self.n, self.total)


def _hash_pieces(written: SimpleQueue, hashers: tuple[Hasher, ...]) -> None:
    """Feed each piece taken from ``written`` to ``hashers``, in order, until None (on the
    helper thread); after a hasher raises, drain the rest unhashed, then raise its error."""
    error: BaseException | None = None
    while (piece := written.get()) is not None:
        if error is None:
            try:
                for h in hashers:
                    h.update(piece)
            except BaseException as e:  # re-raised once the writer has finished
                error = e
    if error is not None:
        raise error


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
        hashers = self.hashers + also
        pending: Future | None = None
        if len(mv) > PIECE and hashers:
            pending = _io().submit(self._read_piece, mv, 0, locate)
        try:
            for pos in range(0, len(mv), PIECE):
                if pending is None:
                    self._read_piece(mv, pos, locate)
                else:
                    pending.result()
                    nxt = pos + PIECE  # read the next piece while this one is hashed
                    pending = _io().submit(self._read_piece, mv, nxt, locate) if nxt < len(mv) else None
                piece = mv[pos:pos + PIECE]
                for h in hashers:
                    h.update(piece, locate(pos))
                if self.progress is not None:
                    self.progress(self.done + pos + len(piece), self.budget)
        finally:
            _settle(pending)
        self.done += len(mv)

    def _read_piece(self, mv: memoryview, pos: int, locate: Callable[[int], str]) -> None:
        """Read exactly the piece of ``mv`` at ``pos`` (``PIECE`` bytes or up to its end)."""
        piece = mv[pos:pos + PIECE]
        got = 0
        while got < len(piece):
            n = self.f.readinto(piece[got:])
            if not n:
                raise self.error(f"{self.name}: file ends inside {locate(pos + got)} "
                                 f"(payload byte {self.done + pos + got} of {self.budget})")
            got += n

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
