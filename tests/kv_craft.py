"""Test helpers: .kv files crafted byte by byte as ds4 writes them (today and in May
2026), from the field table in ../shared/reference/ds4-kvcache-current.md §1, without
the workbench's writer."""

from __future__ import annotations

import io
import struct
import zlib

from workbench.kv import dsv4
from workbench.kv.checksum import CHECKSUM_CHUNK, ChunkCRC
from workbench.state import SessionState


def kvc(text: bytes, *, tokens: int, ctx: int, payload_bytes: int, quant: int = 2, reason: int = 1, ext: int = 0,
        model_id: int = 0, abi: int = 2, hits: int = 0, created: int = 0, last_used: int = 0) -> bytes:
    """The 48-byte KVC header, the u32 text length and the text."""
    return struct.pack("<3sBBBBBIIIB3xQQQ", b"KVC", 1, quant, reason, ext, model_id, tokens, hits, ctx, abi, created,
                       last_used, payload_bytes) + struct.pack("<I", len(text)) + text


def payload(state: SessionState, version: int = 2) -> bytes:
    """The DSV4 payload of ``state`` with its version field set to ``version``."""
    buf = io.BytesIO()
    dsv4.write_payload(buf, state)
    out = bytearray(buf.getvalue())
    out[4:8] = struct.pack("<I", version)
    return bytes(out)


def tool_map(entries: list[tuple[bytes, bytes]]) -> bytes:
    """ds4-server's KTM trailer (ext bit0)."""
    out = b"KTM" + bytes([1]) + struct.pack("<I", len(entries))
    for tool_id, dsml in entries:
        out += struct.pack("<II", len(tool_id), len(dsml)) + tool_id + dsml
    return out


def title(t: bytes) -> bytes:
    """ds4 agent's session-title trailer (ext bit3)."""
    return struct.pack("<I", len(t)) + t


def ds4_file(state: SessionState, text: bytes, *, now: int, reason: int = 1, ext: int = 0, trailer: bytes = b"",
             abi: int = 2, quant: int = 2) -> bytes:
    """A whole file as ds4 writes it (today: ABI 2, payload v2; ``abi=0``: May 2026, v1)."""
    body = payload(state, 2 if abi == 2 else 1)
    return kvc(text, tokens=state.n_tokens, ctx=state.ctx, payload_bytes=len(body), quant=quant, reason=reason,
               ext=ext, abi=abi, created=now, last_used=now) + body + trailer


def legacy_checksum_trailer(blob: bytes, text_len: int, payload_len: int, algorithm: int,
                            chunks: list[int] | None = None) -> bytes:
    """The workbench's old KCS v1 trailer (ext bit3, ABI-0 files) for ``blob`` (header,
    text and payload, bit 3 already set); ``chunks`` overrides the chunk checksums."""
    p0 = 52 + text_len
    if chunks is None:
        crc = ChunkCRC(algorithm=algorithm)
        crc.update(blob[p0:p0 + payload_len])
        chunks = crc.finish()
    masked = bytearray(blob[:48])
    masked[12:16] = b"\0" * 4
    masked[32:40] = b"\0" * 8
    masked[6] &= 0xFE
    body = struct.pack("<3sBB3xIIII", b"KCS", 1, algorithm, CHECKSUM_CHUNK, len(chunks), zlib.crc32(masked),
                       zlib.crc32(blob[48:p0]))
    body += struct.pack(f"<{len(chunks)}I", *chunks)
    return body + struct.pack("<I", zlib.crc32(body))


def to_may_with_checksum(blob: bytes, text_len: int, payload_len: int, algorithm: int,
                         chunks: list[int] | None = None) -> bytes:
    """A file the workbench wrote before this ABI change, made from today's bytes (``blob``,
    footer or not): byte 20 = 0, payload version 1, ext bit3, the KCS v1 trailer."""
    end = 52 + text_len + payload_len
    old = bytearray(blob[:end])
    old[20] = 0
    old[6] |= 8
    old[52 + text_len + 4] = 1
    return bytes(old) + legacy_checksum_trailer(bytes(old), text_len, payload_len, algorithm, chunks)
