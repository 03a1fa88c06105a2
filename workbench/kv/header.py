"""The KVC envelope of a ds4 ``.kv`` file: the 48-byte header, the text, the save reasons.

File layout (all integers little-endian, no padding)::

    offset 0         48 B   KVC header (``KVHeader``; field offsets below)
    offset 48         4 B   u32 text_bytes
    offset 52         text  rendered text, the lookup key (UTF-8 bytes as given)
    52 + text     payload   DSV4 session payload (``workbench.kv.dsv4``)
    ...               rest  optional trailer: ds4's tool-id map "KTM" (ext bit0, never
                            written here) or this workbench's checksum "KCS" (ext bit3,
                            ``workbench.kv.checksum``)

KVC header offsets: 0 magic "KVC", 3 version 1, 4 routed-expert quant bits (2|4),
5 save reason, 6 extension flags, 7 reserved (0), 8 u32 tokens, 12 u32 hits,
16 u32 ctx, 20 4 reserved bytes (0), 24 u64 created_at, 32 u64 last_used (Unix s),
40 u64 payload_bytes. This module is the one place that knows them.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from workbench.kv.errors import KVFormatError

KVC_MAGIC = b"KVC"
KVC_VERSION = 1
HEADER_BYTES = 48
TEXT_LEN_BYTES = 4
TEXT_OFFSET = HEADER_BYTES + TEXT_LEN_BYTES  # 52
MAX_TEXT_BYTES = 2**32 - 1
QUANT_BITS = (2, 4)
_HEADER = struct.Struct("<3sBBBBBIII4sQQQ")
assert _HEADER.size == HEADER_BYTES
OFF_EXT_FLAGS, OFF_HITS, OFF_LAST_USED = 6, 12, 32  # the fields a hit or a ds4 trailer rewrite changes


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


def new_header(text: bytes, *, tokens: int, ctx: int, payload_bytes: int, quant_bits: int, reason: SaveReason,
               ext_flags: int = 0, checksum: bool = True, now: int, hits: int = 0) -> KVHeader:
    """The header for a new checkpoint of ``tokens`` tokens saved under ``text`` at ``now``
    (Unix s); ``checksum`` sets ext bit3 (the KCS trailer follows the payload)."""
    if quant_bits not in QUANT_BITS:
        raise KVFormatError(f"quant bits {quant_bits}, expected 2 or 4")
    if len(text) > MAX_TEXT_BYTES:
        raise KVFormatError(f"rendered text is {len(text)} bytes, the format allows {MAX_TEXT_BYTES}")
    if ext_flags & ExtFlag.TOOL_MAP:
        raise KVFormatError("ext bit0 (ds4 tool-id map) is never written by the workbench")
    flags = (ext_flags | ExtFlag.CHECKSUM) if checksum else (ext_flags & ~ExtFlag.CHECKSUM)
    return KVHeader(quant_bits=quant_bits, reason=SaveReason(reason), ext_flags=int(flags), tokens=tokens,
                    hits=hits, ctx=ctx, created_at=now, last_used=now, payload_bytes=payload_bytes,
                    text_bytes=len(text))


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


def text_sha(text: bytes) -> str:
    """ds4's file stem for a rendered text: SHA-1 hex, lower case (``<sha>.kv``)."""
    return hashlib.sha1(text).hexdigest()


def encode_text(text: str | bytes) -> bytes:
    """The key bytes of a rendered text (str is UTF-8 encoded)."""
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)
