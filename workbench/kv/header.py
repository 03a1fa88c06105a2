"""The KVC envelope of a ds4 ``.kv`` file: the 48-byte header, the text, the save reasons.

File layout (all integers little-endian, no padding)::

    offset 0         48 B   KVC header (``KVHeader``; field offsets below)
    offset 48         4 B   u32 text_bytes
    offset 52         text  rendered text, the lookup key (UTF-8 bytes as given)
    52 + text     payload   DSV4 session payload (``workbench.kv.dsv4``); 0 bytes in a
                            file ds4's agent ``/strip`` wrote (text and title only)
    ...           trailer   ds4's: the tool-id map "KTM" (ext bit0, server) or the session
                            title (ext bit3, agent); never both (``workbench.kv.trailers``)
    ...            footer   this workbench's checksums and model fingerprint, found from
                            the file's end, no ext bit (``workbench.kv.checksum``)

KVC header offsets: 0 magic "KVC", 3 version 1, 4 routed-expert quant bits (2|4),
5 save reason, 6 extension flags, 7 model id (Flash 0, Pro 1, GLM-5.2 2), 8 u32 tokens,
12 u32 hits, 16 u32 ctx, 20 payload ABI (2 today; 0 in May-2026 files, which today's
ds4 ignores), 21..23 zero, 24 u64 created_at, 32 u64 last_used (Unix s), 40 u64
payload_bytes. This module is the one place that knows them.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from workbench.kv.errors import KVFormatError
from workbench.safeopen import open_regular

KVC_MAGIC = b"KVC"
KVC_VERSION = 1
HEADER_BYTES = 48
TEXT_LEN_BYTES = 4
TEXT_OFFSET = HEADER_BYTES + TEXT_LEN_BYTES  # 52
MAX_TEXT_BYTES = 2**32 - 1
QUANT_BITS = (2, 4)
MODEL_FLASH = 0  # byte 7 for DeepSeek V4 Flash, the model this workbench runs
ABI_MAY_2026 = 0  # byte 20 of files ds4 wrote up to 2026-05-26 (and the workbench before): DSV4 payload v1
ABI_CURRENT = 2  # byte 20 today's ds4 writes and requires: DSV4 payload v2
PAYLOAD_ABIS = {ABI_CURRENT: "ds4 today (ABI 2)",
                ABI_MAY_2026: "May 2026 (ABI 0; today's ds4 ignores this file)"}
_HEADER = struct.Struct("<3sBBBBBIIIB3sQQQ")
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
    """Header byte 6, all ds4's. Bit 3 meant this workbench's checksum trailer in ABI-0
    files it wrote before (``KVHeader.has_legacy_checksum``); the checksum now lives in a
    footer without a bit."""

    TOOL_MAP = 1  # ds4's KTM trailer follows the payload (server; never set by the workbench)
    RESPONSES_VISIBLE = 2  # the text is the Responses API visible transcript
    THINKING_VISIBLE = 4  # the text is the chat transcript with hidden thinking
    TITLE = 8  # ds4's session-title trailer follows the payload (agent; never set by the workbench)


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
    model_id: int = MODEL_FLASH  # byte 7
    abi: int = ABI_CURRENT  # byte 20
    reserved21: bytes = b"\0\0\0"  # bytes 21..23 (written 0, ignored)

    @property
    def abi_name(self) -> str:
        """Which ds4 reads this file, in words."""
        return PAYLOAD_ABIS.get(self.abi, f"unknown ABI {self.abi}")

    @property
    def stripped(self) -> bool:
        """True for a file with no payload (ds4's agent ``/strip``): listed, never loaded."""
        return self.payload_bytes == 0

    @property
    def payload_offset(self) -> int:
        return TEXT_OFFSET + self.text_bytes

    @property
    def payload_end(self) -> int:
        return self.payload_offset + self.payload_bytes

    @property
    def has_legacy_checksum(self) -> bool:
        """True for an ABI-0 file with bit 3 and no tool map: the workbench's old "KCS"
        trailer is expected right after the payload (ds4's May readers ignored bit 3)."""
        return (self.abi == ABI_MAY_2026 and bool(self.ext_flags & ExtFlag.TITLE)
                and not self.ext_flags & ExtFlag.TOOL_MAP)

    def pack(self) -> bytes:
        """The 48 header bytes followed by the u32 text length (52 bytes)."""
        return _HEADER.pack(KVC_MAGIC, KVC_VERSION, self.quant_bits, int(self.reason), self.ext_flags,
                            self.model_id, self.tokens, self.hits, self.ctx, self.abi, self.reserved21,
                            self.created_at, self.last_used, self.payload_bytes) + struct.pack("<I", self.text_bytes)


def new_header(text: bytes, *, tokens: int, ctx: int, payload_bytes: int, quant_bits: int, reason: SaveReason,
               ext_flags: int = 0, now: int, hits: int = 0, model_id: int = MODEL_FLASH) -> KVHeader:
    """The header today's ds4 writes for a checkpoint of ``tokens`` tokens saved under
    ``text`` at ``now`` (Unix s): byte 7 ``model_id``, byte 20 ABI 2."""
    if quant_bits not in QUANT_BITS:
        raise KVFormatError(f"quant bits {quant_bits}, expected 2 or 4")
    if len(text) > MAX_TEXT_BYTES:
        raise KVFormatError(f"rendered text is {len(text)} bytes, the format allows {MAX_TEXT_BYTES}")
    if ext_flags & (ExtFlag.TOOL_MAP | ExtFlag.TITLE):
        raise KVFormatError("ext bit0 (ds4 tool-id map) and bit3 (ds4 session title) are never written by the "
                            "workbench")
    if not 0 <= model_id <= 255:
        raise KVFormatError(f"model id {model_id}, expected 0..255")
    return KVHeader(quant_bits=quant_bits, reason=SaveReason(reason), ext_flags=int(ext_flags), tokens=tokens,
                    hits=hits, ctx=ctx, created_at=now, last_used=now, payload_bytes=payload_bytes,
                    text_bytes=len(text), model_id=model_id)


def parse_header(buf: bytes, name: str, file_size: int) -> KVHeader:
    """Parse and check the first 52 bytes of a .kv file of ``file_size`` bytes."""
    if len(buf) < TEXT_OFFSET or file_size < TEXT_OFFSET:
        raise KVFormatError(f"{name}: truncated header: {file_size} bytes, need at least {TEXT_OFFSET}")
    (magic, version, quant, reason, ext, model_id, tokens, hits, ctx, abi, res21, created, last_used,
     payload) = _HEADER.unpack_from(buf, 0)
    (text_bytes,) = struct.unpack_from("<I", buf, HEADER_BYTES)
    if magic != KVC_MAGIC:
        raise KVFormatError(f"{name}: header magic {magic!r} at offset 0, expected b'KVC' (not a .kv file)")
    if version != KVC_VERSION:
        raise KVFormatError(f"{name}: header version {version} at offset 3, expected {KVC_VERSION}")
    if quant not in QUANT_BITS:
        raise KVFormatError(f"{name}: header quant bits {quant} at offset 4, expected 2 or 4")
    if abi not in PAYLOAD_ABIS:
        raise KVFormatError(f"{name}: header payload ABI {abi} at offset 20, expected 2 (ds4 today) or 0 (May 2026)")
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
                    file_size=file_size, model_id=model_id, abi=abi, reserved21=res21)


def read_header(path: str | os.PathLike) -> KVHeader:
    """Read and check a file's header without reading its text or payload."""
    name = os.fspath(path)
    try:
        with open_regular(name) as f:  # a FIFO named *.kv must not block the reader
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
