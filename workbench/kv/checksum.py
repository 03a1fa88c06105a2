"""Checksums: the "KCS" trailer of a ``.kv`` file and the running CRCs the streams feed.

KCS trailer (this workbench; ds4 never reads past the payload unless ext bit0 is set,
and treats extension bits and trailing bytes as opaque, so ds4 loads these files)::

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
both. Payload chunk checksums are checked while the payload streams in
(``workbench.kv.stream``), so a load fails at the first corrupt 16 MiB.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

try:
    import xxhash
except ImportError:  # optional: without it files are written with CRC-32 chunk checksums
    xxhash = None

from workbench.kv.errors import KVFormatError
from workbench.kv.header import HEADER_BYTES, OFF_EXT_FLAGS, OFF_HITS, OFF_LAST_USED, ExtFlag

CHECKSUM_MAGIC = b"KCS"
CHECKSUM_VERSION = 1
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


def checksum_trailer_bytes(payload_len: int, chunk_bytes: int = CHECKSUM_CHUNK) -> int:
    """Size of the KCS trailer for a payload of ``payload_len`` bytes."""
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
        value = self._crc.value
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

    @classmethod
    def of(cls, header52: bytes, text: bytes, chunks: ChunkCRC) -> "Checksums":
        """The trailer for a file whose payload ``chunks`` has hashed completely."""
        return cls(chunks.chunk_bytes, header_crc(header52), text_crc(text), chunks.finish(), chunks.algorithm)

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
