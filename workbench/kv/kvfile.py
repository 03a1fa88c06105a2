"""Whole ``.kv`` files: header, text, DSV4 payload and trailer, written and read in one pass.

The writer streams the header, the text, the payload (``workbench.kv.dsv4``) and, when
asked, the KCS checksum trailer (``workbench.kv.checksum``) into one open file; the
reader checks the header, the text, the trailer against the extension flags, every
checksum while the payload streams in, every payload check against the runtime, and the
payload's token count against the header's. ds4's tool-id map trailer ("KTM") is
recognised and counted, never written.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from workbench.kv.checksum import (
    CHECKSUM_MAGIC, ChunkCRC, Checksums, checksum_trailer_bytes, header_crc, parse_checksums, text_crc,
)
from workbench.kv.dsv4 import payload_bytes, read_payload, write_payload
from workbench.kv.errors import check
from workbench.kv.header import TEXT_OFFSET, ExtFlag, KVHeader, SaveReason, new_header, parse_header, read_text
from workbench.kv.stream import Progress, write_all
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState

TOOL_MAP_MAGIC = b"KTM"


# ---- writing ------------------------------------------------------------------------------
def make_header(state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason, ext_flags: int = 0,
                checksum: bool = True, now: int, hits: int = 0, payload_len: int | None = None) -> KVHeader:
    """The header for saving ``state`` under ``text`` (``payload_len`` defaults to the exact size)."""
    return new_header(text, tokens=state.n_tokens, ctx=state.ctx,
                      payload_bytes=payload_bytes(state) if payload_len is None else payload_len,
                      quant_bits=quant_bits, reason=reason, ext_flags=ext_flags, checksum=checksum, now=now, hits=hits)


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
        n += write_all(f, Checksums.of(head, text, crc).pack())
    return header, n


def kv_file_bytes(state: SessionState, text_len: int, checksum: bool = True) -> int:
    """Exact size of the .kv file ``write_kv_file`` produces."""
    p = payload_bytes(state)
    return TEXT_OFFSET + text_len + p + (checksum_trailer_bytes(p) if checksum else 0)


# ---- trailers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trailer:
    """What follows the payload: 'none', 'checksum', 'tool-map' or 'unknown', and notes."""

    kind: str
    bytes: int
    checksums: Checksums | None = None
    tool_map_entries: int | None = None
    notes: tuple[str, ...] = ()

    def checksum_status(self, verified: bool) -> str:
        """verified | skipped (present, not checked) | dropped (by a ds4 tool-map rewrite) | absent."""
        if self.checksums is not None:
            return "verified" if verified else "skipped"
        return "dropped" if any("dropped" in n for n in self.notes) else "absent"


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
        check(not flags & ExtFlag.CHECKSUM or flags & ExtFlag.TOOL_MAP, name,
              "checksum trailer missing: ext bit3 is set but the file ends at the payload "
              "(truncated, or the trailer was cut by another writer)")
        return Trailer("none", 0)
    f.seek(start)
    magic = f.read(3)
    if magic == CHECKSUM_MAGIC:
        check(bool(flags & ExtFlag.CHECKSUM), name, "a checksum trailer follows the payload but ext bit3 is clear")
        check(not flags & ExtFlag.TOOL_MAP, name, "ext bit0 (tool map) is set but the trailer is a checksum")
        f.seek(start)
        cs = parse_checksums(f.read(rest), name)
        own = checksum_trailer_bytes(header.payload_bytes, cs.chunk_bytes)
        check(rest == own, name, f"{rest - own} trailing bytes after the checksum trailer")
        check(len(cs.chunks) == -(-header.payload_bytes // cs.chunk_bytes), name,
              f"checksum trailer lists {len(cs.chunks)} chunks for a {header.payload_bytes}-byte payload")
        return Trailer("checksum", rest, checksums=cs)
    check(not header.has_checksum, name, f"checksum trailer missing: ext bit3 is set but found {magic!r}")
    if magic == TOOL_MAP_MAGIC:
        entries, used = _tool_map_entries(f, start, size)
        notes = ("ds4 tool-map rewrite dropped the checksum",) if flags & ExtFlag.CHECKSUM else ()
        if flags & ExtFlag.TOOL_MAP and used < rest:
            notes += (f"{rest - used} bytes after the tool map",)
        return Trailer("tool-map", rest, tool_map_entries=entries, notes=notes)
    return Trailer("unknown", rest, notes=(f"{rest} unrecognized trailing bytes (ignored, as ds4 does)",))


# ---- reading ------------------------------------------------------------------------------
def read_kv_file(f: BinaryIO, layout: StateLayout, ctx: int | None = None, *, name: str,
                 prefill_chunk: int | None = None, keep: bool = True, verify: bool = True,
                 progress: Progress | None = None) -> tuple[KVHeader, bytes, SessionState | None, Trailer]:
    """Read and check a whole .kv file from an open binary file.

    Checks the header, the text, the trailer, the payload (all §1.4 checks against the
    runtime ``ctx``), the payload's token count against the header's, and, when the file
    carries a checksum trailer and ``verify`` is set, every CRC while streaming. A file
    whose layout is unknown gets one from ``workbench.kv.inspection.file_layout``.
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
        check(header_crc(head) == cs.header, name, "header checksum mismatch (bytes 0..47 outside hits/last_used)")
        check(text_crc(text) == cs.text, name, "text checksum mismatch")
        crc = ChunkCRC(cs.chunk_bytes, cs.chunks, name, cs.algorithm)
    f.seek(header.payload_offset)
    state = read_payload(f, header.payload_bytes, layout, ctx, prefill_chunk=prefill_chunk, name=name, crc=crc,
                         keep=keep, progress=progress)
    if crc is not None:
        crc.finish()
    if state is not None:
        check(state.n_tokens == header.tokens, name,
              f"payload holds {state.n_tokens} tokens, header says {header.tokens}")
    return header, text, state, trailer
