"""Checksums: the workbench's footer of a ``.kv`` file and the running CRCs the streams feed.

Footer (this workbench; written after everything ds4 writes, with no ext bit: ds4's
readers seek to 52 + text + payload, parse only their own trailer and ignore trailing
bytes, so ds4 loads these files, and the file is byte-identical to ds4's up to here)::

    0  "KCS"   3  u8 version 2   4  u8 algorithm of the chunk checksums   5  3 x 0
    8  u32 chunk_bytes   12 u32 n_chunks
    16 u32 CRC of the 48 header bytes with hits (12..15) and last_used (32..39) zeroed
           and ext bit0 cleared (the fields a touch or a ds4 trailer rewrite may change)
    20 u32 CRC of the u32 text length and the text
    24 u32[n_chunks] checksum of each chunk_bytes slice of the payload (the last one shorter)
    .. 32 B model fingerprint (``workbench.gguf.fingerprint``; all zero: none recorded)
    .. u32 CRC of the footer bytes before it
    .. u32 footer bytes, this field and the magic included
    .. "KWBF"  (the last 4 bytes of the file: the footer is found from the end)

Version 1 (ABI-0 files the workbench wrote before ds4 took ext bit 3 for titles) is the
same up to the chunk checksums, then the u32 CRC; it sits right after the payload with
ext bit 3 set, and is still verified. Algorithm 1: the chunk checksums are CRC-32 (zlib
polynomial, ~6 GB/s). Algorithm 2: the low 32 bits of XXH3-64 (seed 0) of each chunk
(~45 GB/s; needs the ``xxhash`` package, written whenever it is installed). The header,
text and footer checks are CRC-32 under both. Payload chunk checksums are checked while
the payload streams in (``workbench.kv.stream``), so a load fails at the first corrupt 16 MiB.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from typing import Protocol

try:
    import xxhash
except ImportError:  # optional: without it files are written with CRC-32 chunk checksums
    xxhash = None

from workbench.kv.errors import KVFormatError
from workbench.kv.header import HEADER_BYTES, OFF_EXT_FLAGS, OFF_HITS, OFF_LAST_USED, ExtFlag

CHECKSUM_MAGIC = b"KCS"
LEGACY_VERSION = 1  # the ext-bit-3 trailer right after the payload (ABI-0 files)
FOOTER_VERSION = 2  # the self-locating footer
FOOTER_MAGIC = b"KWBF"
FINGERPRINT_BYTES = 32
_FOOTER_TAIL = struct.Struct("<I4s")  # footer bytes, magic
CRC32_ZLIB = 1  # chunk checksums: CRC-32
XXH3_LOW32 = 2  # chunk checksums: low 32 bits of XXH3-64, seed 0
CHECKSUM_ALGORITHMS = {CRC32_ZLIB: "CRC-32", XXH3_LOW32: "XXH3-64 (low 32 bits)"}
DEFAULT_ALGORITHM = XXH3_LOW32 if xxhash is not None else CRC32_ZLIB
CHECKSUM_CHUNK = 16 * 1024 * 1024
_KCS_HEAD = struct.Struct("<3sBB3xIIII")  # magic, version, algorithm, chunk, n_chunks, crc_hdr, crc_text


class Hasher(Protocol):
    """What a stream feeds the bytes it moves to: ``what`` names the field, for errors."""

    def update(self, data: memoryview, what: str = "") -> None: ...


class CRC32:
    """Running CRC-32 (zlib) of a byte stream; ``value`` is the CRC so far."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: memoryview | bytes, what: str = "") -> None:
        self.value = zlib.crc32(data, self.value)


class _XXH3Low32:
    """Running XXH3-64 (seed 0) of one chunk; its value is the low 32 bits."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: memoryview, what: str = "") -> None:
        self._h.update(data)

    @property
    def value(self) -> int:
        return self._h.intdigest() & 0xFFFFFFFF


def _xxh3_low32(data: memoryview) -> int:
    """The low 32 bits of XXH3-64 (seed 0) of ``data`` in one call."""
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


def footer_bytes(payload_len: int, chunk_bytes: int = CHECKSUM_CHUNK) -> int:
    """Size of the footer for a payload of ``payload_len`` bytes."""
    return legacy_trailer_bytes(payload_len, chunk_bytes) + FINGERPRINT_BYTES + _FOOTER_TAIL.size


def legacy_trailer_bytes(payload_len: int, chunk_bytes: int = CHECKSUM_CHUNK) -> int:
    """Size of a version-1 (ext bit 3) checksum trailer for a payload of ``payload_len`` bytes."""
    return _KCS_HEAD.size + 4 * -(-payload_len // chunk_bytes) + 4


def header_crc(header52: bytes) -> int:
    """CRC of the 48 KVC header bytes minus the fields a hit or a ds4 rewrite may change."""
    h = bytearray(header52[:HEADER_BYTES])
    h[OFF_HITS:OFF_HITS + 4] = b"\0" * 4
    h[OFF_LAST_USED:OFF_LAST_USED + 8] = b"\0" * 8
    h[OFF_EXT_FLAGS] &= ~int(ExtFlag.TOOL_MAP) & 0xFF
    return zlib.crc32(h)


def text_crc(text: bytes) -> int:
    """CRC of the u32 text length followed by the text (the KCS 'text' field)."""
    return zlib.crc32(text, zlib.crc32(struct.pack("<I", len(text))))


class ChunkCRC:
    """Checksums (trailer ``algorithm``) of a byte stream cut into fixed chunks; checks
    each chunk as it completes when ``expected`` is given (raising with the field being read)."""

    def __init__(self, chunk_bytes: int = CHECKSUM_CHUNK, expected: list[int] | None = None, name: str = "",
                 algorithm: int = DEFAULT_ALGORITHM):
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise KVFormatError(f"{name}: checksum algorithm {algorithm}, "
                                f"expected one of {sorted(CHECKSUM_ALGORITHMS)}")
        if algorithm == XXH3_LOW32 and xxhash is None:
            raise KVFormatError(f"{name}: checksum trailer uses XXH3 (algorithm 2) and the xxhash package is not "
                                "installed (pip install xxhash), or load with verify=False")
        self.chunk_bytes = chunk_bytes
        self.algorithm = algorithm
        self._new = _XXH3Low32 if algorithm == XXH3_LOW32 else CRC32
        self._digest = _xxh3_low32 if algorithm == XXH3_LOW32 else zlib.crc32  # of one whole chunk
        self.crcs: list[int] = []
        self.expected = expected
        self.name = name
        self._crc = self._new()
        self._fill = 0

    def update(self, data: memoryview | bytes, what: str = "") -> None:
        mv = memoryview(data).cast("B")
        cb = self.chunk_bytes
        if self._fill:  # complete the open chunk first
            take = min(len(mv), cb - self._fill)
            self._crc.update(mv[:take])
            self._fill += take
            mv = mv[take:]
            if self._fill < cb:
                return
            self._close(what)
        whole = len(mv) - len(mv) % cb
        for lo in range(0, whole, cb):  # whole chunks: one call each, no running state
            self._append(self._digest(mv[lo:lo + cb]), cb, what)
        if whole < len(mv):
            self._crc.update(mv[whole:])
            self._fill = len(mv) - whole

    def _close(self, what: str) -> None:
        self._append(self._crc.value, self._fill, what)
        self._crc, self._fill = self._new(), 0

    def _append(self, value: int, size: int, what: str) -> None:
        """Record (and check) the checksum of the next chunk, ``size`` bytes long."""
        i = len(self.crcs)
        if self.expected is not None and (i >= len(self.expected) or self.expected[i] != value):
            lo = i * self.chunk_bytes
            raise KVFormatError(f"{self.name}: payload checksum mismatch in chunk {i} (payload bytes {lo}.."
                                f"{lo + size - 1}, while reading {what or 'the payload'})")
        self.crcs.append(value)

    def finish(self, what: str = "end of payload") -> list[int]:
        if self._fill:
            self._close(what)
        if self.expected is not None and len(self.crcs) != len(self.expected):
            raise KVFormatError(f"{self.name}: checksum trailer lists {len(self.expected)} chunks, "
                                f"payload has {len(self.crcs)}")
        return self.crcs


@dataclass(frozen=True)
class Checksums:
    """The contents of a footer (version 2) or of an old bit-3 trailer (version 1)."""

    chunk_bytes: int
    header: int
    text: int
    chunks: list[int]
    algorithm: int = CRC32_ZLIB  # of the chunk checksums
    fingerprint: bytes = bytes(FINGERPRINT_BYTES)  # of the model that wrote the file; zeros: none
    version: int = FOOTER_VERSION

    @classmethod
    def of(cls, header52: bytes, text: bytes, chunks: ChunkCRC, fingerprint: bytes | None = None) -> "Checksums":
        """The footer for a file whose payload ``chunks`` has hashed completely."""
        fp = bytes(FINGERPRINT_BYTES) if fingerprint is None else bytes(fingerprint)
        if len(fp) != FINGERPRINT_BYTES:
            raise KVFormatError(f"model fingerprint is {len(fp)} bytes, expected {FINGERPRINT_BYTES}")
        return cls(chunks.chunk_bytes, header_crc(header52), text_crc(text), chunks.finish(), chunks.algorithm, fp)

    @property
    def model_fingerprint(self) -> bytes | None:
        """The writer's model fingerprint, None when none was recorded (or version 1)."""
        return self.fingerprint if any(self.fingerprint) else None

    @property
    def size(self) -> int:
        return (footer_bytes if self.version == FOOTER_VERSION else legacy_trailer_bytes)(
            len(self.chunks) * self.chunk_bytes, self.chunk_bytes)

    def pack(self) -> bytes:
        """The footer bytes (version 2)."""
        body = _KCS_HEAD.pack(CHECKSUM_MAGIC, FOOTER_VERSION, self.algorithm, self.chunk_bytes, len(self.chunks),
                              self.header, self.text) + struct.pack(f"<{len(self.chunks)}I", *self.chunks)
        body += self.fingerprint
        body += struct.pack("<I", zlib.crc32(body))
        return body + _FOOTER_TAIL.pack(len(body) + _FOOTER_TAIL.size, FOOTER_MAGIC)


def _parse_kcs(buf: bytes, name: str, version: int, what: str) -> tuple[Checksums, int]:
    """(checksums, bytes up to the fingerprint) of a KCS block of ``version`` at ``buf``'s start."""
    if len(buf) < _KCS_HEAD.size + 4:
        raise KVFormatError(f"{name}: truncated {what}: {len(buf)} bytes")
    magic, ver, algo, chunk, n, crc_hdr, crc_text = _KCS_HEAD.unpack_from(buf, 0)
    if magic != CHECKSUM_MAGIC:
        raise KVFormatError(f"{name}: {what} magic {magic!r}, expected b'KCS'")
    if ver != version or algo not in CHECKSUM_ALGORITHMS:
        raise KVFormatError(f"{name}: {what} version {ver} algorithm {algo}, expected {version} and "
                            f"{' or '.join(map(str, sorted(CHECKSUM_ALGORITHMS)))}")
    if chunk == 0:
        raise KVFormatError(f"{name}: {what} chunk size is 0")
    end = _KCS_HEAD.size + 4 * n
    if len(buf) < end + 4:
        raise KVFormatError(f"{name}: truncated {what}: {len(buf)} bytes, {n} chunks need {end + 4}")
    chunks = list(struct.unpack_from(f"<{n}I", buf, _KCS_HEAD.size))
    return Checksums(chunk, crc_hdr, crc_text, chunks, algo, version=version), end


def parse_legacy_trailer(buf: bytes, name: str) -> Checksums:
    """Parse a version-1 checksum trailer (``buf`` holds at least the whole trailer)."""
    cs, end = _parse_kcs(buf, name, LEGACY_VERSION, "checksum trailer (ext bit 3)")
    (own,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[:end]) != own:
        raise KVFormatError(f"{name}: checksum trailer is corrupt (its own CRC does not match)")
    return cs


def has_footer(tail: bytes) -> bool:
    """True when a file's last bytes (at least 8) end in the footer magic."""
    return len(tail) >= _FOOTER_TAIL.size and tail[-4:] == FOOTER_MAGIC


def footer_length(tail: bytes, name: str, room: int) -> int:
    """The footer's length from a file's last 8 bytes; ``room``: bytes after the payload."""
    (n, _) = _FOOTER_TAIL.unpack(tail[-_FOOTER_TAIL.size:])
    if not _KCS_HEAD.size + FINGERPRINT_BYTES + 4 + _FOOTER_TAIL.size <= n <= room:
        raise KVFormatError(f"{name}: footer length {n} at the file's end does not fit the {room} bytes after "
                            "the payload")
    return n


def parse_footer(buf: bytes, name: str) -> Checksums:
    """Parse a whole footer (``buf`` is exactly its bytes, from "KCS" to "KWBF")."""
    cs, end = _parse_kcs(buf, name, FOOTER_VERSION, "footer")
    fp_end = end + FINGERPRINT_BYTES
    if len(buf) != fp_end + 4 + _FOOTER_TAIL.size:
        raise KVFormatError(f"{name}: footer is {len(buf)} bytes, its {len(cs.chunks)} chunks need "
                            f"{fp_end + 4 + _FOOTER_TAIL.size}")
    (own,) = struct.unpack_from("<I", buf, fp_end)
    if zlib.crc32(buf[:fp_end]) != own:
        raise KVFormatError(f"{name}: footer is corrupt (its own CRC does not match)")
    return replace(cs, fingerprint=bytes(buf[end:fp_end]))
