"""What follows a ``.kv`` payload: ds4's trailer (tool map or session title), then the
workbench's footer (or, in old ABI-0 files, its ext-bit-3 checksum trailer).

ds4's trailers (at most one; ds4 never sets bits 0 and 3 together)::

    bit 0  "KTM", u8 1, u32 n, then n x {u32 id_len, u32 dsml_len, id, dsml}
           (server; n >= 1, id 1..256 bytes, dsml 1 byte..512 MiB, n <= 4 x 100000)
    bit 3  u32 len, then len bytes of title, no NUL (agent)

A file with ``payload_bytes`` 0 (ds4's agent ``/strip``) has its title right after the
text. Counts and sizes are bounded as ds4's reader bounds them, and by the bytes left
before the footer, before anything is read.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO

from workbench.kv.checksum import (
    CHECKSUM_MAGIC, FOOTER_VERSION, LEGACY_VERSION, Checksums, footer_length, has_footer, legacy_trailer_bytes,
    parse_footer, parse_legacy_trailer,
)
from workbench.kv.errors import KVFormatError, check
from workbench.kv.header import ABI_MAY_2026, ExtFlag, KVHeader

TOOL_MAP_MAGIC = b"KTM"
TOOL_MAP_VERSION = 1
MAX_TOOL_ID_BYTES = 256  # ds4-server's bound on a tool-call id
MAX_DSML_BYTES = 512 * 1024 * 1024  # ds4-server's bound on one DSML block
MAX_TOOL_MAP_ENTRIES = 4 * 100_000  # 4 x ds4-server's default --tool-memory-max-ids


@dataclass(frozen=True)
class Trailer:
    """Everything after the payload.

    ``kind`` names the parts ("none", "title", "tool-map", "footer", "checksum (bit 3)",
    joined by "+"; "invalid" when it does not parse, the error in ``notes``); ``bytes``
    counts them all. ``checksums`` comes from the footer or the old bit-3 trailer.
    """

    kind: str
    bytes: int
    checksums: Checksums | None = None
    tool_ids: tuple[str, ...] | None = None  # the tool map's ids, in file order
    title: bytes | None = None  # the session title's bytes (ds4 writes UTF-8)
    notes: tuple[str, ...] = ()

    @property
    def title_text(self) -> str | None:
        """The title as text (undecodable bytes replaced)."""
        return None if self.title is None else self.title.decode("utf-8", "replace")

    def names(self, text: bytes, created_at: int) -> tuple[str, ...]:
        """The file stems ds4 gives this file: SHA-1 of the text (server), or of the title
        then created_at as u64 LE (agent sessions, which carry a title)."""
        out = (hashlib.sha1(text).hexdigest(),)
        if self.title is not None:
            out += (hashlib.sha1(self.title + struct.pack("<Q", created_at)).hexdigest(),)
        return out

    @property
    def tool_map_entries(self) -> int | None:
        return None if self.tool_ids is None else len(self.tool_ids)

    @property
    def fingerprint(self) -> bytes | None:
        """The writer's model fingerprint, None when the file records none."""
        return None if self.checksums is None else self.checksums.model_fingerprint

    def checksum_status(self, verified: bool) -> str:
        """verified | skipped (present, not checked) | dropped (by a ds4 tool-map rewrite) | absent."""
        if self.checksums is not None:
            return "verified" if verified else "skipped"
        return "dropped" if any("dropped" in n for n in self.notes) else "absent"


def _read_exact(f: BinaryIO, at: int, n: int, name: str, what: str) -> bytes:
    f.seek(at)
    buf = f.read(n)
    if len(buf) != n:
        raise KVFormatError(f"{name}: file ends inside {what} (offset {at}, {n} bytes)")
    return buf


def read_tool_map(f: BinaryIO, start: int, end: int, name: str) -> tuple[tuple[str, ...], int]:
    """(tool ids, bytes used) of the KTM trailer in ``[start, end)``, bounded as ds4 bounds it."""
    check(end - start >= 8, name, f"tool-map trailer (ext bit0): {end - start} bytes after the payload, need 8")
    head = _read_exact(f, start, 8, name, "the tool-map header")
    check(head[:3] == TOOL_MAP_MAGIC and head[3] == TOOL_MAP_VERSION, name,
          f"tool-map trailer (ext bit0) starts {head[:4]!r}, expected b'KTM\\x01'")
    (n,) = struct.unpack_from("<I", head, 4)
    check(1 <= n <= MAX_TOOL_MAP_ENTRIES and 8 * n <= end - start - 8, name,
          f"tool-map entry count {n} at offset {start + 4}, expected 1..{MAX_TOOL_MAP_ENTRIES} within the file")
    ids, pos = [], start + 8
    for i in range(n):
        check(pos + 8 <= end, name, f"tool-map entry {i} at offset {pos}: file ends inside its lengths")
        id_len, dsml_len = struct.unpack("<II", _read_exact(f, pos, 8, name, f"tool-map entry {i}"))
        check(1 <= id_len <= MAX_TOOL_ID_BYTES, name,
              f"tool-map entry {i} id length {id_len} at offset {pos}, expected 1..{MAX_TOOL_ID_BYTES}")
        check(1 <= dsml_len <= MAX_DSML_BYTES, name,
              f"tool-map entry {i} DSML length {dsml_len} at offset {pos + 4}, expected 1..{MAX_DSML_BYTES}")
        check(pos + 8 + id_len + dsml_len <= end, name,
              f"tool-map entry {i} at offset {pos}: {id_len} + {dsml_len} bytes run past the trailer")
        ids.append(_read_exact(f, pos + 8, id_len, name, f"tool-map entry {i} id").decode("utf-8", "replace"))
        pos += 8 + id_len + dsml_len
    return tuple(ids), pos - start


def read_title(f: BinaryIO, start: int, end: int, name: str) -> tuple[bytes, int]:
    """(title, bytes used) of the session-title trailer in ``[start, end)``."""
    check(end - start >= 4, name, f"title trailer (ext bit3): {end - start} bytes after the payload, need 4")
    (n,) = struct.unpack("<I", _read_exact(f, start, 4, name, "the title length"))
    check(n <= end - start - 4, name, f"title length {n} at offset {start} runs past the file "
          f"({end - start - 4} bytes left)")
    return _read_exact(f, start + 4, n, name, "the title"), 4 + n


def _footer(f: BinaryIO, start: int, size: int, name: str) -> Checksums | None:
    """The footer at the file's end, None when the file has none."""
    room = size - start
    if room < 8:
        return None
    tail = _read_exact(f, size - 8, 8, name, "the footer tail")
    if not has_footer(tail):
        return None
    n = footer_length(tail, name, room)
    return parse_footer(_read_exact(f, size - n, n, name, "the footer"), name)


def read_trailer(f: BinaryIO, header: KVHeader, name: str) -> Trailer:
    """Identify and parse what follows the payload, checking it against the ext flags."""
    start, size, flags = header.payload_end, header.file_size, header.ext_flags
    f.seek(start)
    lead = f.read(4)
    if header.abi == ABI_MAY_2026 and flags & ExtFlag.TITLE and lead == CHECKSUM_MAGIC + bytes([LEGACY_VERSION]):
        # the workbench's old checksum trailer (bit 3 before ds4 used it for titles)
        check(not flags & ExtFlag.TOOL_MAP, name, "ext bit0 (tool map) is set but the trailer is a checksum")
        cs = parse_legacy_trailer(_read_exact(f, start, size - start, name, "the checksum trailer"), name)
        own = legacy_trailer_bytes(header.payload_bytes, cs.chunk_bytes)
        check(size - start == own, name, f"{size - start - own} trailing bytes after the checksum trailer")
        check(len(cs.chunks) == -(-header.payload_bytes // cs.chunk_bytes), name,
              f"checksum trailer lists {len(cs.chunks)} chunks for a {header.payload_bytes}-byte payload")
        return Trailer("checksum (bit 3)", size - start, checksums=cs)
    footer = _footer(f, start, size, name)
    end = size - (footer.size if footer is not None else 0)
    if footer is not None:
        check(len(footer.chunks) == -(-header.payload_bytes // footer.chunk_bytes), name,
              f"footer lists {len(footer.chunks)} chunks for a {header.payload_bytes}-byte payload")
    parts, used, ids, title, notes = [], 0, None, None, []
    if flags & ExtFlag.TOOL_MAP:
        ids, used = read_tool_map(f, start, end, name)
        parts.append("tool-map")
        if header.abi == ABI_MAY_2026 and flags & ExtFlag.TITLE:
            notes.append("ds4 tool-map rewrite dropped the checksum (bit 3)")
    elif flags & ExtFlag.TITLE:
        title, used = read_title(f, start, end, name)
        parts.append("title")
    if used < end - start:
        if footer is None:
            f.seek(start + used)
            check(f.read(4) != CHECKSUM_MAGIC + bytes([FOOTER_VERSION]), name,
                  f"truncated footer: it starts at offset {start + used} but the file does not end in b'KWBF'")
        notes.append(f"{end - start - used} unrecognized trailing bytes (ignored, as ds4 does)")
    if footer is not None:
        parts.append("footer")
    return Trailer("+".join(parts) or "none", size - start, checksums=footer, tool_ids=ids, title=title,
                   notes=tuple(notes))
