"""ds4's ``.kv`` checkpoint file: the KVC v1 envelope and the DSV4 v1 session payload.

File layout (all integers little-endian, no padding)::

    offset 0         48 B   KVC header (see ``KVHeader``; field offsets below)
    offset 48         4 B   u32 text_bytes
    offset 52         text  rendered text, the lookup key (UTF-8 bytes as given)
    52 + text     payload   DSV4 session payload (13 x u32 header, then the body)
    ...               rest  optional trailer: ds4's tool-id map "KTM" (ext bit0, never
                            written here) or this workbench's checksum "KCS" (ext bit3)

KVC header offsets: 0 magic "KVC", 3 version 1, 4 routed-expert quant bits (2|4),
5 save reason, 6 extension flags, 7 reserved (0), 8 u32 tokens, 12 u32 hits,
16 u32 ctx, 20 4 reserved bytes (0), 24 u64 created_at, 32 u64 last_used (Unix s),
40 u64 payload_bytes.

The DSV4 payload header is 13 u32: magic 0x34565344, version 1, ctx, prefill chunk,
raw_cap, raw_window, comp_cap, T, n_layer, head_dim, idx_dim, vocab, raw_live. The body
is u32[T] tokens, f32[vocab] next-token logits, u32[n_layer] compressed row counts,
u32[n_layer] indexer row counts, then per layer the tensors of ``LayerState.tensors()``
in that order (raw window rows in logical position order). Layer count and widths come
from the state's ``StateLayout``; with ``StateLayout.ds4()`` the bytes are exactly what
ds4-server writes (23,995,788 + 13,764*T bytes for T a multiple of 128).

Checksum trailer "KCS" (this workbench; ds4 never reads past the payload unless ext bit0
is set, and treats extension bits and trailing bytes as opaque, so ds4 loads these files)::

    0  "KCS"   3  u8 version 1   4  u8 algorithm of the chunk checksums   5  3 x 0
    8  u32 chunk_bytes   12 u32 n_chunks
    16 u32 CRC of the 48 header bytes with hits (12..15) and last_used (32..39) zeroed
           and ext bit0 cleared (the fields a touch or a ds4 trailer rewrite may change)
    20 u32 CRC of the u32 text length and the text
    24 u32[n_chunks] checksum of each chunk_bytes slice of the payload (the last one shorter)
    .. u32 CRC of the trailer bytes before it

Algorithm 1: the chunk checksums are CRC-32 (zlib polynomial, ~6 GB/s). Algorithm 2: the
low 32 bits of XXH3-64 (seed 0) of each chunk (~45 GB/s; needs the ``xxhash`` package,
written whenever it is installed). The header, text and trailer checks are CRC-32 under
both. Payload chunk checksums are checked while the payload streams in (2 MiB reads, each
hashed while in cache), so a load fails at the first corrupt 16 MiB. Loaded states hold
MLX float32 arrays, one per tensor, allocated first and filled by ``readinto`` straight
from the file (so ``SessionState.to_mlx`` and ``Session.restore`` copy nothing). Writers
accept MLX or NumPy arrays and stream each tensor from its own memory (no payload-sized
buffer).
"""

from __future__ import annotations

import bisect
import enum
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import mlx.core as mx
import numpy as np

try:
    import xxhash
except ImportError:  # optional: without it files are written with CRC-32 chunk checksums
    xxhash = None

from workbench.errors import WorkbenchError
from workbench.spec.args import ds4_ratio_schedule
from workbench.spec.statelayout import F32, StateLayout
from workbench.state import LayerState, SessionState


Progress = Callable[[int, int], None]  # (payload bytes done, payload bytes total), called as bytes stream


class KVFormatError(WorkbenchError):
    """A .kv file (or payload) is malformed, truncated, corrupt or does not fit the runtime."""


# ---- KVC envelope ----------------------------------------------------------------
KVC_MAGIC = b"KVC"
KVC_VERSION = 1
HEADER_BYTES = 48
TEXT_LEN_BYTES = 4
TEXT_OFFSET = HEADER_BYTES + TEXT_LEN_BYTES  # 52
MAX_TEXT_BYTES = 2**32 - 1
QUANT_BITS = (2, 4)
_HEADER = struct.Struct("<3sBBBBBIII4sQQQ")
assert _HEADER.size == HEADER_BYTES
OFF_HITS, OFF_LAST_USED = 12, 32  # the two fields updated in place on a hit


class SaveReason(enum.IntEnum):
    """Header byte 5: why the checkpoint was written (ds4's numbering)."""

    UNKNOWN = 0
    COLD = 1
    CONTINUED = 2
    EVICT = 3
    SHUTDOWN = 4
    AGENT_SYSTEM = 5
    AGENT_SESSION = 6


class ExtFlag(enum.IntFlag):
    """Header byte 6. Bits 0-2 are ds4's; bit 3 is this workbench's checksum trailer."""

    TOOL_MAP = 1  # ds4's KTM trailer follows the payload (never set by the workbench)
    RESPONSES_VISIBLE = 2  # the text is the Responses API visible transcript
    THINKING_VISIBLE = 4  # the text is the chat transcript with hidden thinking
    CHECKSUM = 8  # a "KCS" checksum trailer follows the payload


@dataclass(frozen=True)
class KVHeader:
    """The 48-byte KVC header plus what the file's first 52 bytes and size tell."""

    quant_bits: int
    reason: SaveReason
    ext_flags: int
    tokens: int
    hits: int
    ctx: int
    created_at: int  # Unix seconds
    last_used: int  # Unix seconds
    payload_bytes: int
    text_bytes: int
    file_size: int = 0  # bytes on disk (0 when not read from a file)
    reserved7: int = 0  # byte 7 (later upstream ds4: model id)
    reserved20: bytes = b"\0\0\0\0"  # bytes 20..23 (later upstream ds4: payload ABI)

    @property
    def payload_offset(self) -> int:
        return TEXT_OFFSET + self.text_bytes

    @property
    def payload_end(self) -> int:
        return self.payload_offset + self.payload_bytes

    @property
    def has_checksum(self) -> bool:
        """True when the checksum trailer is expected (bit3 set, no ds4 tool map)."""
        return bool(self.ext_flags & ExtFlag.CHECKSUM) and not self.ext_flags & ExtFlag.TOOL_MAP

    def pack(self) -> bytes:
        """The 48 header bytes followed by the u32 text length (52 bytes)."""
        return _HEADER.pack(KVC_MAGIC, KVC_VERSION, self.quant_bits, int(self.reason), self.ext_flags,
                            self.reserved7, self.tokens, self.hits, self.ctx, self.reserved20,
                            self.created_at, self.last_used, self.payload_bytes) + struct.pack("<I", self.text_bytes)


def parse_header(buf: bytes, name: str, file_size: int) -> KVHeader:
    """Parse and check the first 52 bytes of a .kv file of ``file_size`` bytes."""
    if len(buf) < TEXT_OFFSET or file_size < TEXT_OFFSET:
        raise KVFormatError(f"{name}: truncated header: {file_size} bytes, need at least {TEXT_OFFSET}")
    (magic, version, quant, reason, ext, res7, tokens, hits, ctx, res20, created, last_used,
     payload) = _HEADER.unpack_from(buf, 0)
    (text_bytes,) = struct.unpack_from("<I", buf, HEADER_BYTES)
    if magic != KVC_MAGIC:
        raise KVFormatError(f"{name}: header magic {magic!r} at offset 0, expected b'KVC' (not a .kv file)")
    if version != KVC_VERSION:
        raise KVFormatError(f"{name}: header version {version} at offset 3, expected {KVC_VERSION}")
    if quant not in QUANT_BITS:
        raise KVFormatError(f"{name}: header quant bits {quant} at offset 4, expected 2 or 4")
    if tokens == 0:
        raise KVFormatError(f"{name}: header token count at offset 8 is 0")
    need = TEXT_OFFSET + text_bytes + payload
    if file_size < need:
        raise KVFormatError(f"{name}: truncated file: {file_size} bytes, header says 52 + text {text_bytes} "
                            f"+ payload {payload} = {need}")
    try:
        why = SaveReason(reason)
    except ValueError:  # ds4 maps unknown reasons to 0 instead of rejecting the file
        why = SaveReason.UNKNOWN
    return KVHeader(quant_bits=quant, reason=why, ext_flags=ext, tokens=tokens, hits=hits, ctx=ctx,
                    created_at=created, last_used=last_used, payload_bytes=payload, text_bytes=text_bytes,
                    file_size=file_size, reserved7=res7, reserved20=res20)


def read_header(path: str | os.PathLike) -> KVHeader:
    """Read and check a file's header without reading its text or payload."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = f.read(TEXT_OFFSET)
    except OSError as err:
        raise KVFormatError(f"{name}: cannot read header: {err.strerror or err}") from err
    return parse_header(buf, name, size)


def read_text(f: BinaryIO, header: KVHeader, name: str) -> bytes:
    """The rendered text section (``f`` positioned anywhere)."""
    f.seek(TEXT_OFFSET)
    text = f.read(header.text_bytes)
    if len(text) != header.text_bytes:
        raise KVFormatError(f"{name}: truncated text: {len(text)} of {header.text_bytes} bytes")
    return text


def encode_text(text: str | bytes) -> bytes:
    """The key bytes of a rendered text (str is UTF-8 encoded)."""
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


# ---- DSV4 payload geometry ---------------------------------------------------------
DSV4_MAGIC = 0x34565344  # "DSV4" as little-endian bytes
DSV4_VERSION = 1
_PAYLOAD_HEADER = struct.Struct("<13I")
PAYLOAD_HEADER_BYTES = _PAYLOAD_HEADER.size  # 52
RAW_CAP_MAX = 8192
RAW_CAP_ALIGN = 256


def default_prefill_chunk(ctx: int) -> int:
    """ds4's prefill chunk: min(ctx, 2048)."""
    return min(ctx, 2048)


def raw_window(layout: StateLayout, ctx: int) -> int:
    """Raw sliding-window rows kept: min(n_swa, ctx)."""
    return min(layout.n_swa, ctx)


def raw_cap(layout: StateLayout, ctx: int, prefill_chunk: int) -> int:
    """ds4's GPU raw ring capacity: min(8192, align_up(min(ctx, n_swa + chunk), 256)), >= raw window."""
    want = min(ctx, layout.n_swa + prefill_chunk)
    aligned = -(-want // RAW_CAP_ALIGN) * RAW_CAP_ALIGN
    return max(min(RAW_CAP_MAX, aligned), raw_window(layout, ctx))


def comp_cap(ctx: int) -> int:
    """Compressed-row capacity ds4 allocates for ratio-4 layers: ctx/4 + 2."""
    return ctx // 4 + 2


@dataclass(frozen=True)
class PayloadHeader:
    """The 13 u32 at the start of a DSV4 payload."""

    magic: int
    version: int
    ctx: int
    prefill_chunk: int
    raw_cap: int
    raw_window: int
    comp_cap: int
    tokens: int
    n_layer: int
    head_dim: int
    idx_dim: int
    vocab: int
    raw_live: int

    def pack(self) -> bytes:
        return _PAYLOAD_HEADER.pack(self.magic, self.version, self.ctx, self.prefill_chunk, self.raw_cap,
                                    self.raw_window, self.comp_cap, self.tokens, self.n_layer, self.head_dim,
                                    self.idx_dim, self.vocab, self.raw_live)

    @classmethod
    def for_state(cls, state: SessionState) -> "PayloadHeader":
        lay, ctx, T = state.layout, state.ctx, state.n_tokens
        return cls(DSV4_MAGIC, DSV4_VERSION, ctx, state.prefill_chunk, raw_cap(lay, ctx, state.prefill_chunk),
                   raw_window(lay, ctx), comp_cap(ctx), T, lay.n_layer, lay.head_dim, lay.idx_dim, lay.n_vocab,
                   min(T, raw_window(lay, ctx)))


def payload_size(layout: StateLayout, n_tokens: int, ctx: int | None = None) -> int:
    """Exact DSV4 payload bytes for ``n_tokens`` tokens (row counts floor(T/ratio))."""
    n_raw = min(n_tokens, layout.n_swa if ctx is None else raw_window(layout, ctx))
    return (PAYLOAD_HEADER_BYTES + 4 * n_tokens + F32 * layout.n_vocab + 8 * layout.n_layer
            + layout.kv_bytes(n_tokens, n_raw))


def payload_bytes(state: SessionState) -> int:
    """Exact bytes ``write_payload`` will write for this state."""
    return payload_size(state.layout, state.n_tokens, state.ctx)


# ---- checksums ----------------------------------------------------------------------
CHECKSUM_MAGIC = b"KCS"
CHECKSUM_VERSION = 1
CRC32_ZLIB = 1  # chunk checksums: CRC-32
XXH3_LOW32 = 2  # chunk checksums: low 32 bits of XXH3-64, seed 0
CHECKSUM_ALGORITHMS = {CRC32_ZLIB: "CRC-32", XXH3_LOW32: "XXH3-64 (low 32 bits)"}
DEFAULT_ALGORITHM = XXH3_LOW32 if xxhash is not None else CRC32_ZLIB
CHECKSUM_CHUNK = 16 * 1024 * 1024
_KCS_HEAD = struct.Struct("<3sBB3xIIII")  # magic, version, algorithm, chunk, n_chunks, crc_hdr, crc_text
TOOL_MAP_MAGIC = b"KTM"


def checksum_trailer_bytes(payload_len: int, chunk_bytes: int = CHECKSUM_CHUNK) -> int:
    """Size of the KCS trailer for a payload of ``payload_len`` bytes."""
    return _KCS_HEAD.size + 4 * -(-payload_len // chunk_bytes) + 4


def header_crc(header52: bytes) -> int:
    """CRC of the 48 KVC header bytes minus the fields a hit or a ds4 rewrite may change."""
    h = bytearray(header52[:HEADER_BYTES])
    h[OFF_HITS:OFF_HITS + 4] = b"\0" * 4
    h[OFF_LAST_USED:OFF_LAST_USED + 8] = b"\0" * 8
    h[6] &= ~int(ExtFlag.TOOL_MAP) & 0xFF
    return zlib.crc32(h)


class _CRC32:
    """Running CRC-32 of one chunk."""

    def __init__(self) -> None:
        self._v = 0

    def update(self, data: memoryview) -> None:
        self._v = zlib.crc32(data, self._v)

    def value(self) -> int:
        return self._v


class _XXH3Low32:
    """Running XXH3-64 (seed 0) of one chunk; its value is the low 32 bits."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: memoryview) -> None:
        self._h.update(data)

    def value(self) -> int:
        return self._h.intdigest() & 0xFFFFFFFF


class ChunkCRC:
    """Checksums (trailer ``algorithm``) of a byte stream cut into fixed chunks; checks
    each chunk as it completes when ``expected`` is given (raising with the field being read)."""

    def __init__(self, chunk_bytes: int = CHECKSUM_CHUNK, expected: list[int] | None = None, name: str = "",
                 algorithm: int = DEFAULT_ALGORITHM):
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise KVFormatError(f"{name}: checksum algorithm {algorithm}, expected one of {sorted(CHECKSUM_ALGORITHMS)}")
        if algorithm == XXH3_LOW32 and xxhash is None:
            raise KVFormatError(f"{name}: checksum trailer uses XXH3 (algorithm 2) and the xxhash package is not "
                                "installed (pip install xxhash), or load with verify=False")
        self.chunk_bytes = chunk_bytes
        self.algorithm = algorithm
        self._new = _XXH3Low32 if algorithm == XXH3_LOW32 else _CRC32
        self.crcs: list[int] = []
        self.expected = expected
        self.name = name
        self._crc = self._new()
        self._fill = 0

    def update(self, data: memoryview | bytes, what: str = "") -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), self.chunk_bytes - self._fill)
            self._crc.update(mv[:take])
            self._fill += take
            mv = mv[take:]
            if self._fill == self.chunk_bytes:
                self._close(what)

    def _close(self, what: str) -> None:
        i = len(self.crcs)
        value = self._crc.value()
        if self.expected is not None and (i >= len(self.expected) or self.expected[i] != value):
            lo = i * self.chunk_bytes
            raise KVFormatError(f"{self.name}: payload checksum mismatch in chunk {i} (payload bytes {lo}.."
                                f"{lo + self._fill - 1}, while reading {what or 'the payload'})")
        self.crcs.append(value)
        self._crc, self._fill = self._new(), 0

    def finish(self, what: str = "end of payload") -> list[int]:
        if self._fill:
            self._close(what)
        if self.expected is not None and len(self.crcs) != len(self.expected):
            raise KVFormatError(f"{self.name}: checksum trailer lists {len(self.expected)} chunks, "
                                f"payload has {len(self.crcs)}")
        return self.crcs


@dataclass(frozen=True)
class Checksums:
    """The contents of a KCS trailer."""

    chunk_bytes: int
    header: int
    text: int
    chunks: list[int]
    algorithm: int = CRC32_ZLIB  # of the chunk checksums

    def pack(self) -> bytes:
        body = _KCS_HEAD.pack(CHECKSUM_MAGIC, CHECKSUM_VERSION, self.algorithm, self.chunk_bytes, len(self.chunks),
                              self.header, self.text) + struct.pack(f"<{len(self.chunks)}I", *self.chunks)
        return body + struct.pack("<I", zlib.crc32(body))


def parse_checksums(buf: bytes, name: str) -> Checksums:
    """Parse a KCS trailer (``buf`` holds at least the whole trailer)."""
    if len(buf) < _KCS_HEAD.size + 4:
        raise KVFormatError(f"{name}: truncated checksum trailer: {len(buf)} bytes")
    magic, version, algo, chunk, n, crc_hdr, crc_text = _KCS_HEAD.unpack_from(buf, 0)
    if magic != CHECKSUM_MAGIC:
        raise KVFormatError(f"{name}: checksum trailer magic {magic!r}, expected b'KCS' (ext bit3 is set)")
    if version != CHECKSUM_VERSION or algo not in CHECKSUM_ALGORITHMS:
        raise KVFormatError(f"{name}: checksum trailer version {version} algorithm {algo}, expected 1 and "
                            f"{' or '.join(map(str, sorted(CHECKSUM_ALGORITHMS)))}")
    if chunk == 0:
        raise KVFormatError(f"{name}: checksum trailer chunk size is 0")
    end = _KCS_HEAD.size + 4 * n
    if len(buf) < end + 4:
        raise KVFormatError(f"{name}: truncated checksum trailer: {len(buf)} bytes, {n} chunks need {end + 4}")
    (own,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[:end]) != own:
        raise KVFormatError(f"{name}: checksum trailer is corrupt (its own CRC does not match)")
    return Checksums(chunk, crc_hdr, crc_text, list(struct.unpack_from(f"<{n}I", buf, _KCS_HEAD.size)), algo)


# ---- streaming I/O helpers ------------------------------------------------------------
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


WRITE_PIECE = 2 * 1024 * 1024  # checksummed writes go out in pieces of this size


def _as_f32(arr: Any) -> np.ndarray:
    """A C-contiguous float32 NumPy view (zero-copy for contiguous float32 MLX/NumPy arrays)."""
    return np.ascontiguousarray(np.asarray(arr, dtype=np.float32))


def _state_problems(state: SessionState) -> list[str]:
    out = state.problems()
    T = state.n_tokens
    if T == 0:
        out.append("no tokens (a .kv checkpoint needs at least one)")
    elif T >= state.ctx:
        out.append(f"{T} tokens do not fit context {state.ctx} (need T < ctx)")
    if state.prefill_chunk <= 0:
        out.append(f"prefill chunk {state.prefill_chunk}")
    return out


def write_payload(f: BinaryIO, state: SessionState, crc: ChunkCRC | None = None,
                  progress: Progress | None = None) -> int:
    """Stream the DSV4 payload of ``state`` into ``f``, tensor by tensor, with no
    payload-sized buffer; feed every byte to ``crc`` if given. Returns bytes written."""
    problems = _state_problems(state)
    if problems:
        raise KVFormatError("cannot serialize session state: " + "; ".join(problems[:5]))
    lay, T = state.layout, state.n_tokens

    def put(data: bytes | memoryview) -> int:
        if crc is None:
            return write_all(f, data)
        mv, n = memoryview(data).cast("B"), 0
        for at in range(0, len(mv), WRITE_PIECE):  # checksum each piece while it is in cache
            crc.update(mv[at:at + WRITE_PIECE])
            n += write_all(f, mv[at:at + WRITE_PIECE])
        return n

    n = put(PayloadHeader.for_state(state).pack())
    n += put(np.asarray(state.tokens, dtype="<u4").tobytes())
    n += put(memoryview(_as_f32(state.logits)).cast("B"))
    n += put(struct.pack(f"<{lay.n_layer}I", *(lay.n_comp(L, T) for L in range(lay.n_layer))))
    n += put(struct.pack(f"<{lay.n_layer}I", *(lay.n_idx(L, T) for L in range(lay.n_layer))))
    total = payload_bytes(state)
    for ls in state.layers:
        for _, arr in ls.tensors():
            data = _as_f32(arr)
            if data.size:  # e.g. no ratio-128 rows below 128 tokens
                n += put(memoryview(data).cast("B"))
        if progress is not None:
            progress(n, total)
    return n


def write_kv_file(f: BinaryIO, state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason,
                  ext_flags: int = 0, checksum: bool = True, now: int, hits: int = 0,
                  progress: Progress | None = None) -> tuple[KVHeader, int]:
    """Write a whole .kv file (header, text, payload, optional checksum trailer) into ``f``.

    Returns the header written and the bytes written. The caller compares the count with
    ``kv_file_bytes`` before publishing the file.
    """
    header = make_header(state, text, quant_bits=quant_bits, reason=reason, ext_flags=ext_flags,
                         checksum=checksum, now=now, hits=hits)
    head = header.pack()
    crc = ChunkCRC() if checksum else None
    n = write_all(f, head) + write_all(f, text)
    n += write_payload(f, state, crc, progress)
    if crc is not None:
        n += write_all(f, Checksums(CHECKSUM_CHUNK, header_crc(head), text_crc(text), crc.finish(),
                                    crc.algorithm).pack())
    return header, n


def make_header(state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason, ext_flags: int = 0,
                checksum: bool = True, now: int, hits: int = 0, payload_len: int | None = None) -> KVHeader:
    """The header for saving ``state`` under ``text`` (``payload_len`` defaults to the exact size)."""
    if quant_bits not in QUANT_BITS:
        raise KVFormatError(f"quant bits {quant_bits}, expected 2 or 4")
    if len(text) > MAX_TEXT_BYTES:
        raise KVFormatError(f"rendered text is {len(text)} bytes, the format allows {MAX_TEXT_BYTES}")
    if ext_flags & ExtFlag.TOOL_MAP:
        raise KVFormatError("ext bit0 (ds4 tool-id map) is never written by the workbench")
    flags = (ext_flags | ExtFlag.CHECKSUM) if checksum else (ext_flags & ~ExtFlag.CHECKSUM)
    return KVHeader(quant_bits=quant_bits, reason=SaveReason(reason), ext_flags=int(flags), tokens=state.n_tokens,
                    hits=hits, ctx=state.ctx, created_at=now, last_used=now,
                    payload_bytes=payload_bytes(state) if payload_len is None else payload_len,
                    text_bytes=len(text))


def text_crc(text: bytes) -> int:
    """CRC of the u32 text length followed by the text (the KCS 'text' field)."""
    return zlib.crc32(text, zlib.crc32(struct.pack("<I", len(text))))


def kv_file_bytes(state: SessionState, text_len: int, checksum: bool = True) -> int:
    """Exact size of the .kv file ``write_kv_file`` produces."""
    p = payload_bytes(state)
    return TEXT_OFFSET + text_len + p + (checksum_trailer_bytes(p) if checksum else 0)


# ---- payload reading ------------------------------------------------------------------
class _Source:
    """Exact reads from ``f`` within a byte budget, in pieces of at most ``PIECE`` bytes
    (so each piece is checksummed while still in cache), fed to an optional chunk CRC."""

    PIECE = 2 * 1024 * 1024

    def __init__(self, f: BinaryIO, budget: int, name: str, crc: ChunkCRC | None, progress: Progress | None):
        self.f, self.budget, self.left, self.name, self.crc, self.progress = f, budget, budget, name, crc, progress
        self.done = 0  # payload bytes read so far

    def reserve(self, n: int, what: str) -> None:
        if n > self.left:
            raise KVFormatError(f"{self.name}: truncated session payload: {what} needs {n} bytes, "
                                f"{self.left} left of payload_bytes")
        self.left -= n

    def fill(self, mv: memoryview, locate: Callable[[int], str]) -> None:
        """Read exactly ``len(mv)`` bytes; ``locate(offset in mv)`` names the field there."""
        pos = 0
        while pos < len(mv):
            piece = mv[pos:pos + self.PIECE]
            got = 0
            while got < len(piece):
                n = self.f.readinto(piece[got:])
                if not n:
                    raise KVFormatError(f"{self.name}: file ends inside {locate(pos + got)} "
                                        f"(payload byte {self.done + pos + got} of {self.budget})")
                got += n
            if self.crc is not None:
                self.crc.update(piece, locate(pos))
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
        """Read (and checksum) ``n`` reserved bytes without keeping them."""
        scratch = memoryview(bytearray(min(n, self.PIECE)))
        pos = 0
        while pos < n:
            take = min(n - pos, len(scratch))
            base = pos
            self.fill(scratch[:take], lambda o: locate(base + o))
            pos += take


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise KVFormatError(f"{name}: {message}")


def check_payload_header(ph: PayloadHeader, layout: StateLayout, name: str, ctx: int | None = None,
                         prefill_chunk: int | None = None) -> None:
    """ds4's payload header checks against the runtime (``ctx`` None: the saved context)."""
    _check(ph.magic == DSV4_MAGIC and ph.version == DSV4_VERSION, name,
           f"unsupported session payload: magic {ph.magic:#010x} version {ph.version}, expected "
           f"{DSV4_MAGIC:#010x} ('DSV4') version {DSV4_VERSION}")
    want = (layout.n_layer, layout.head_dim, layout.idx_dim, layout.n_vocab)
    got = (ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab)
    _check(got == want, name, "payload written for a different layout: layers/head_dim/idx_dim/vocab "
           f"{got}, runtime {want}")
    cur_ctx = ph.ctx if ctx is None else ctx
    cur_chunk = (ph.prefill_chunk if ctx is None else default_prefill_chunk(cur_ctx)) if prefill_chunk is None \
        else prefill_chunk
    _check(ph.ctx <= cur_ctx and ph.tokens < cur_ctx, name,
           f"KV checkpoint does not fit current context: saved ctx {ph.ctx}, tokens {ph.tokens}, current ctx {cur_ctx}")
    _check(ph.prefill_chunk == cur_chunk and ph.raw_window == raw_window(layout, cur_ctx), name,
           f"graph chunk layout does not match current runtime: prefill chunk {ph.prefill_chunk} (current "
           f"{cur_chunk}), raw window {ph.raw_window} (current {raw_window(layout, cur_ctx)})")
    cur_raw_cap = raw_cap(layout, cur_ctx, cur_chunk)
    _check(ph.raw_cap > 0 and ph.raw_live == min(ph.tokens, ph.raw_window) and ph.raw_live <= ph.raw_cap
           and ph.raw_live <= cur_raw_cap, name,
           f"raw ring layout does not match current context: raw_cap {ph.raw_cap}, raw_live {ph.raw_live}, "
           f"tokens {ph.tokens}, raw window {ph.raw_window}, current raw_cap {cur_raw_cap}")
    _check(ph.comp_cap <= comp_cap(cur_ctx), name,
           f"compressed cache is larger than current context: comp_cap {ph.comp_cap} > {comp_cap(cur_ctx)}")
    _check(ph.tokens > 0, name, "payload token count is 0")


def check_row_counts(ph: PayloadHeader, layout: StateLayout, n_comp: list[int], n_idx: list[int],
                     name: str, ctx: int | None = None) -> None:
    """Every layer's compressed/indexer row count must be floor(T/ratio) (0 where absent)."""
    cap = min(ph.comp_cap, comp_cap(ph.ctx if ctx is None else ctx))
    for L in range(layout.n_layer):
        want_c, want_i = layout.n_comp(L, ph.tokens), layout.n_idx(L, ph.tokens)
        _check(n_comp[L] <= cap and n_idx[L] <= cap, name,
               f"invalid compressed/indexer row count at layer {L}: {n_comp[L]}/{n_idx[L]} > cap {cap}")
        _check(n_comp[L] == want_c and n_idx[L] == want_i, name,
               f"invalid compressed/indexer row count at layer {L} (ratio {layout.ratios[L]}): "
               f"{n_comp[L]}/{n_idx[L]}, expected {want_c}/{want_i} for {ph.tokens} tokens")


def read_payload(f: BinaryIO, budget: int, layout: StateLayout, ctx: int | None = None, *,
                 prefill_chunk: int | None = None, name: str = "<payload>", crc: ChunkCRC | None = None,
                 keep: bool = True, progress: Progress | None = None) -> SessionState | None:
    """Read a DSV4 payload of exactly ``budget`` bytes from ``f`` into a new SessionState.

    ``ctx``/``prefill_chunk`` describe the runtime it must fit (None: the saved values);
    the returned state carries the runtime's. ``crc`` (with expected chunks) verifies the
    bytes as they stream. ``keep=False`` validates and reads every byte but keeps no
    tensors (returns None). Raises KVFormatError naming ``name`` and the field.
    """
    src = _Source(f, budget, name, crc, progress)
    ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(src.bytes(PAYLOAD_HEADER_BYTES, "payload header")))
    check_payload_header(ph, layout, name, ctx, prefill_chunk)
    T = ph.tokens
    tokens = src.array((T,), "<u4", "token ids")
    logits = mx.array(np.zeros(layout.n_vocab, dtype=np.float32))
    src.reserve(logits.nbytes, "logits")
    src.fill(memoryview(logits).cast("B"), lambda _: "logits")
    n_comp = list(struct.unpack(f"<{layout.n_layer}I", src.bytes(4 * layout.n_layer, "compressed row counts")))
    n_idx = list(struct.unpack(f"<{layout.n_layer}I", src.bytes(4 * layout.n_layer, "indexer row counts")))
    check_row_counts(ph, layout, n_comp, n_idx, name, ctx)
    # the layer tensors: one float32 buffer (one allocation, large reads), then views into it
    fields = [(L, fname, shape) for L in range(layout.n_layer)
              for fname, shape in layout.layer_shapes(L, T, ph.raw_live)]
    starts = [0]
    for _, _, (rows, cols) in fields:
        starts.append(starts[-1] + rows * cols * F32)

    def locate(offset: int) -> str:
        i = min(bisect.bisect_right(starts, offset) - 1, len(fields) - 1)
        return f"layer {fields[i][0]} {fields[i][1]}"

    body = starts[-1]
    if body > src.left:
        i = bisect.bisect_right(starts, src.left) - 1  # the first tensor that does not fit
        raise KVFormatError(f"{name}: truncated session payload: {locate(starts[i])} needs "
                            f"{starts[i + 1] - starts[i]} bytes, {src.left - starts[i]} left of payload_bytes")
    _check(body == src.left, name, f"KV checkpoint has trailing payload bytes: {src.left - body} after the last tensor")
    src.reserve(body, "layer tensors")
    if not keep:
        src.skip(body, locate)
        return None
    # one MLX float32 array per tensor (mx.array copies, so each owns writable contiguous
    # memory, allocated on this thread: measured 10x cheaper than evaluating mx.zeros on
    # MLX's stream thread), then filled in place from the file: no to_mlx copy afterwards
    arrays = [mx.array(np.zeros(shape, dtype=np.float32)) for _, _, shape in fields]
    layers = []
    for (L, fname, _), start, arr in zip(fields, starts, arrays):
        if arr.size:
            src.fill(memoryview(arr).cast("B"), lambda o, at=start: locate(at + o))
        if fname == "raw":
            layers.append(LayerState(raw=None))
        setattr(layers[-1], fname, arr)
    cur_ctx = ph.ctx if ctx is None else ctx
    chunk = prefill_chunk if prefill_chunk is not None else (ph.prefill_chunk if ctx is None
                                                             else default_prefill_chunk(cur_ctx))
    return SessionState(layout=layout, ctx=cur_ctx, prefill_chunk=chunk, tokens=tokens.tolist(),
                        logits=logits, layers=layers)


# ---- whole files --------------------------------------------------------------------------
@dataclass(frozen=True)
class Trailer:
    """What follows the payload: 'none', 'checksum', 'tool-map' or 'unknown', and notes."""

    kind: str
    bytes: int
    checksums: Checksums | None = None
    tool_map_entries: int | None = None
    notes: tuple[str, ...] = ()


def _tool_map_entries(f: BinaryIO, start: int, size: int) -> tuple[int | None, int]:
    """(entry count, bytes) of a ds4 KTM trailer at ``start``; (None, 0) when unreadable."""
    f.seek(start)
    head = f.read(8)
    if len(head) < 8 or head[:3] != TOOL_MAP_MAGIC or head[3] != 1:
        return None, 0
    (count,) = struct.unpack_from("<I", head, 4)
    pos = start + 8
    for i in range(count):
        f.seek(pos)
        lens = f.read(8)
        if len(lens) < 8:
            return i, pos - start
        id_len, dsml_len = struct.unpack("<II", lens)
        if pos + 8 + id_len + dsml_len > size:
            return i, pos - start
        pos += 8 + id_len + dsml_len
    return count, pos - start


def read_trailer(f: BinaryIO, header: KVHeader, name: str) -> Trailer:
    """Identify and parse what follows the payload, checking it agrees with the ext flags."""
    start, size, flags = header.payload_end, header.file_size, header.ext_flags
    rest = size - start
    if rest <= 0:
        _check(not flags & ExtFlag.CHECKSUM or flags & ExtFlag.TOOL_MAP, name,
               "checksum trailer missing: ext bit3 is set but the file ends at the payload "
               "(truncated, or the trailer was cut by another writer)")
        return Trailer("none", 0)
    f.seek(start)
    magic = f.read(3)
    if magic == CHECKSUM_MAGIC:
        _check(bool(flags & ExtFlag.CHECKSUM), name, "a checksum trailer follows the payload but ext bit3 is clear")
        _check(not flags & ExtFlag.TOOL_MAP, name, "ext bit0 (tool map) is set but the trailer is a checksum")
        f.seek(start)
        cs = parse_checksums(f.read(rest), name)
        own = checksum_trailer_bytes(header.payload_bytes, cs.chunk_bytes)
        _check(rest == own, name, f"{rest - own} trailing bytes after the checksum trailer")
        _check(len(cs.chunks) == -(-header.payload_bytes // cs.chunk_bytes), name,
               f"checksum trailer lists {len(cs.chunks)} chunks for a {header.payload_bytes}-byte payload")
        return Trailer("checksum", rest, checksums=cs)
    _check(not header.has_checksum, name, f"checksum trailer missing: ext bit3 is set but found {magic!r}")
    if magic == TOOL_MAP_MAGIC:
        entries, used = _tool_map_entries(f, start, size)
        notes = ("ds4 tool-map rewrite dropped the checksum",) if flags & ExtFlag.CHECKSUM else ()
        if flags & ExtFlag.TOOL_MAP and used < rest:
            notes += (f"{rest - used} bytes after the tool map",)
        return Trailer("tool-map", rest, tool_map_entries=entries, notes=notes)
    return Trailer("unknown", rest, notes=(f"{rest} unrecognized trailing bytes (ignored, as ds4 does)",))


def read_kv_file(f: BinaryIO, layout: StateLayout | None, ctx: int | None = None, *, name: str,
                 prefill_chunk: int | None = None, keep: bool = True, verify: bool = True,
                 progress: Progress | None = None) -> tuple[KVHeader, bytes, SessionState | None, Trailer]:
    """Read and check a whole .kv file from an open binary file.

    Checks the header, the text, the trailer, the payload (all §1.4 checks against the
    runtime ``ctx``), the payload's token count against the header's, and, when the file
    carries a checksum trailer and ``verify`` is set, every CRC while streaming.
    ``layout`` None infers it from the payload header (see ``infer_layout``).
    """
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(TEXT_OFFSET)
    header = parse_header(head, name, size)
    text = read_text(f, header, name)
    trailer = read_trailer(f, header, name)
    crc = None
    if trailer.checksums is not None and verify:
        cs = trailer.checksums
        _check(header_crc(head) == cs.header, name, "header checksum mismatch (bytes 0..47 outside hits/last_used)")
        _check(text_crc(text) == cs.text, name, "text checksum mismatch")
        crc = ChunkCRC(cs.chunk_bytes, cs.chunks, name, cs.algorithm)
    if layout is None:
        layout, _ = infer_layout(read_payload_summary(f, header, name))
    f.seek(header.payload_offset)
    state = read_payload(f, header.payload_bytes, layout, ctx, prefill_chunk=prefill_chunk, name=name, crc=crc,
                         keep=keep, progress=progress)
    if crc is not None:
        crc.finish()
    if state is not None:
        _check(state.n_tokens == header.tokens, name,
               f"payload holds {state.n_tokens} tokens, header says {header.tokens}")
    return header, text, state, trailer


@dataclass(frozen=True)
class PayloadSummary:
    """The payload header and row counts, read without the tensors."""

    header: PayloadHeader
    n_comp: list[int]
    n_idx: list[int]


def read_payload_summary(f: BinaryIO, header: KVHeader, name: str) -> PayloadSummary:
    """Seek-read the payload header and per-layer row counts of a .kv file."""
    f.seek(header.payload_offset)
    raw = f.read(PAYLOAD_HEADER_BYTES)
    _check(len(raw) == PAYLOAD_HEADER_BYTES and header.payload_bytes >= PAYLOAD_HEADER_BYTES, name,
           "truncated session payload: payload header")
    ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(raw))
    _check(ph.magic == DSV4_MAGIC and ph.version == DSV4_VERSION, name,
           f"unsupported session payload: magic {ph.magic:#010x} version {ph.version}")
    counts_at = PAYLOAD_HEADER_BYTES + 4 * ph.tokens + F32 * ph.vocab
    _check(counts_at + 8 * ph.n_layer <= header.payload_bytes, name, "truncated session payload: row counts")
    f.seek(header.payload_offset + counts_at)
    raw = f.read(8 * ph.n_layer)
    _check(len(raw) == 8 * ph.n_layer, name, "file ends inside the row counts")
    counts = struct.unpack(f"<{2 * ph.n_layer}I", raw)
    return PayloadSummary(ph, list(counts[: ph.n_layer]), list(counts[ph.n_layer:]))


DS4_DIMS = (43, 512, 128, 129280)  # n_layer, head_dim, idx_dim, vocab of ds4-server's model


def infer_layout(summary: PayloadSummary) -> tuple[StateLayout, str]:
    """A layout for reading a payload without a model, and how it was obtained.

    ds4-server's dimensions give ``StateLayout.ds4()``. Otherwise the header gives layers
    and widths; n_swa is the raw window (exact when ctx > window); ratios follow ds4's
    schedule unless the row counts contradict it, in which case they are read off the
    counts (unambiguous from 128 tokens on).
    """
    ph = summary.header
    if (ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab) == DS4_DIMS:
        return StateLayout.ds4(), "ds4-server layout (43 layers x 512, indexer 128, vocab 129280)"
    T = ph.tokens
    ratios = ds4_ratio_schedule(ph.n_layer)
    note = "inferred from the payload header (ds4 layer schedule"

    def fits(rs: tuple[int, ...]) -> bool:
        return all(summary.n_comp[L] == (T // r if r else 0) and summary.n_idx[L] == (T // 4 if r == 4 else 0)
                   for L, r in enumerate(rs))

    if not fits(ratios):
        guess = []
        for L in range(ph.n_layer):
            c, i = summary.n_comp[L], summary.n_idx[L]
            guess.append(4 if i or (c and c == T // 4) else (128 if c and c == T // 128 else 0))
        ratios = tuple(guess)
        note = "inferred from the payload header (ratios from the row counts"
    n_swa = ph.raw_window
    note += f", n_swa {n_swa}{'' if ph.ctx > ph.raw_window else ' or more'}); pass --model for certainty"
    return StateLayout(ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab, n_swa, ratios), note


def payload_breakdown(layout: StateLayout, summary: PayloadSummary) -> list[dict]:
    """Per-layer payload bytes by kind from the row counts (rows: layer, ratio, kind, bytes),
    plus layer -1 rows for the header, tokens, logits and row counts."""
    ph = summary.header
    rows = [{"layer": -1, "ratio": None, "kind": "header", "bytes": PAYLOAD_HEADER_BYTES + 8 * ph.n_layer},
            {"layer": -1, "ratio": None, "kind": "tokens", "bytes": 4 * ph.tokens},
            {"layer": -1, "ratio": None, "kind": "logits", "bytes": F32 * ph.vocab}]
    return rows + layout.layer_bytes_at(ph.tokens, ph.raw_live)
