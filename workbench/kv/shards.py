"""Sharded KV checkpoints: one DSVL layer-range payload per pipeline rank plus a manifest.

A pipeline-parallel session (``workbench.distributed``) holds each layer range's KV state
on a different rank. Its checkpoint is a directory::

    manifest.json                      published last (tmp + rename) when every shard is complete
    <save_id>.L<first>-<last>.dsvl     one per layer range, written directly by the rank holding it

Shard file layout (little-endian, no padding). The payload part is later upstream ds4's
"DSVL" layer payload, version 1 (facts from its ``ds4_session_save_layer_payload``)::

    0        14 x u32  magic 0x4C565344 ("DSVL"), version 1, ctx, prefill chunk, raw_cap,
                       raw_window, comp_cap, T, n_layer, head_dim, idx_dim, layer_start,
                       layer_end (inclusive), raw_live
    56       u32[n]    compressed row count of each layer of the range (n = last - first + 1)
    56+4n    u32[n]    indexer row count of each layer of the range
    56+8n    ...       per layer, the tensors of ``LayerState.tensors()`` in order, float32
                       (exactly the per-layer body of the DSV4 payload)
    payload_bytes      f32[n_vocab] next-token logits, only in the shard holding the last
                       layer (a workbench addition: DSVL itself carries no logits)

The manifest (JSON) holds what no shard holds: the token ids, the rendered text (the
KVC lookup key), the full :class:`StateLayout`, the KVC header fields a ``.kv`` file
needs (quant bits, save reason, extension flags, times, hits), and per shard its file
name, layer range, byte count, CRC-32 of the whole file, and CRC-32 of the header, of
each layer's bytes and of the logits, so that a restore reading only some layers of a
shard still verifies every byte it uses.

A ``.kv`` file (``workbench.kv.format``) and a sharded checkpoint convert into each
other losslessly: :func:`kv_to_checkpoint` and :func:`checkpoint_to_kv` (the latter
reproduces the original file byte for byte, times and hits included).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from workbench.atomic import atomic_write
from workbench.kv.format import (
    ExtFlag, KVFormatError, OFF_LAST_USED, SaveReason, comp_cap, default_prefill_chunk, kv_file_bytes,
    raw_cap, raw_window, read_kv_file, write_all, write_kv_file,
)
from workbench.kv.store import text_sha
from workbench.spec.statelayout import F32, StateLayout
from workbench.state import LayerState, SessionState, join

Progress = Callable[[int, int], None]  # (bytes done, bytes total) of one shard file

DSVL_MAGIC = 0x4C565344  # "DSVL" as little-endian bytes
DSVL_VERSION = 1
_DSVL_HEADER = struct.Struct("<14I")
DSVL_HEADER_BYTES = _DSVL_HEADER.size  # 56
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ds4-workbench sharded kv"
MANIFEST_VERSION = 1
SHARD_RE = re.compile(r"^([0-9a-f]{16})\.L(\d+)-(\d+)\.dsvl$")
PIECE = 2 * 1024 * 1024  # write/read/checksum granularity (stays in cache while hashed)


class ShardError(KVFormatError):
    """A sharded checkpoint (manifest or shard file) is malformed, corrupt or does not fit."""


# ---- layer ranges ------------------------------------------------------------------------
def split_layers(n_layer: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous half-open layer ranges ``[(start, stop), ...]``, sizes differing by at most one
    (the earlier ranges get the extra layers)."""
    if n_parts < 1 or n_parts > n_layer:
        raise ShardError(f"cannot split {n_layer} layers into {n_parts} ranges (need 1 <= ranges <= layers)")
    base, extra = divmod(n_layer, n_parts)
    out, a = [], 0
    for i in range(n_parts):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


def check_ranges(ranges: Sequence[tuple[int, int]], n_layer: int, what: str = "layer ranges") -> None:
    """Raise unless ``ranges`` are non-empty, contiguous and cover ``0..n_layer`` in order."""
    at = 0
    for a, b in ranges:
        if a != at or b <= a:
            raise ShardError(f"{what} {list(ranges)} must be non-empty, contiguous and start at 0")
        at = b
    if at != n_layer:
        raise ShardError(f"{what} {list(ranges)} cover layers 0..{at - 1}, the model has {n_layer}")


def parse_ranges(text: str, n_layer: int) -> list[tuple[int, int]]:
    """``"0-2,3-5"`` (inclusive layer numbers, as in shard names) → ``[(0, 3), (3, 6)]``."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m:
            raise ShardError(f"layer ranges {text!r}: expected FIRST-LAST[,FIRST-LAST...], e.g. 0-2,3-5")
        out.append((int(m.group(1)), int(m.group(2)) + 1))
    check_ranges(out, n_layer, f"layer ranges {text!r} =")
    return out


# ---- DSVL payload geometry -----------------------------------------------------------------
@dataclass(frozen=True)
class DSVLHeader:
    """The 14 u32 at the start of a DSVL payload (``layer_end`` inclusive, as ds4 writes it)."""

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
    layer_start: int
    layer_end: int
    raw_live: int

    def pack(self) -> bytes:
        return _DSVL_HEADER.pack(self.magic, self.version, self.ctx, self.prefill_chunk, self.raw_cap,
                                 self.raw_window, self.comp_cap, self.tokens, self.n_layer, self.head_dim,
                                 self.idx_dim, self.layer_start, self.layer_end, self.raw_live)

    @classmethod
    def for_shard(cls, s: SessionState) -> "DSVLHeader":
        lay, T = s.layout, s.n_tokens
        win = raw_window(lay, s.ctx)
        return cls(DSVL_MAGIC, DSVL_VERSION, s.ctx, s.prefill_chunk, raw_cap(lay, s.ctx, s.prefill_chunk), win,
                   comp_cap(s.ctx), T, lay.n_layer, lay.head_dim, lay.idx_dim, s.start, s.stop - 1, min(T, win))

    @property
    def n_range(self) -> int:
        return self.layer_end - self.layer_start + 1

    @property
    def prefix_bytes(self) -> int:
        """Header plus the two row-count arrays."""
        return DSVL_HEADER_BYTES + 8 * self.n_range


@dataclass(frozen=True)
class LayerSpan:
    """Where one layer's tensors lie in a shard file."""

    layer: int
    offset: int
    nbytes: int
    fields: tuple[tuple[str, tuple[int, int]], ...]


def layer_spans(layout: StateLayout, h: DSVLHeader) -> list[LayerSpan]:
    """Each layer's byte span (from the header; row counts already checked), in file order."""
    out, at = [], h.prefix_bytes
    for L in range(h.layer_start, h.layer_end + 1):
        fields = tuple(layout.layer_shapes(L, h.tokens, h.raw_live))
        nbytes = sum(r * c * F32 for _, (r, c) in fields)
        out.append(LayerSpan(L, at, nbytes, fields))
        at += nbytes
    return out


def shard_payload_bytes(layout: StateLayout, n_tokens: int, ctx: int, start: int, stop: int) -> int:
    """Exact DSVL payload bytes of layers ``start..stop-1`` at ``n_tokens`` tokens."""
    n_raw = min(n_tokens, raw_window(layout, ctx))
    return DSVL_HEADER_BYTES + 8 * (stop - start) + sum(
        rows * cols * F32 for L in range(start, stop) for _, (rows, cols) in layout.layer_shapes(L, n_tokens, n_raw))


def shard_file_bytes(layout: StateLayout, n_tokens: int, ctx: int, start: int, stop: int) -> int:
    """Exact shard file bytes: the payload plus the logits in the last range's shard."""
    logits = F32 * layout.n_vocab if stop == layout.n_layer else 0
    return shard_payload_bytes(layout, n_tokens, ctx, start, stop) + logits


# ---- manifest ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest records it (``stop`` exclusive; CRCs are zlib CRC-32)."""

    file: str
    start: int
    stop: int
    bytes: int  # whole file
    crc32: int  # whole file
    payload_bytes: int  # the DSVL part (the logits follow it)
    header_crc32: int  # header + row counts
    layer_crc32: tuple[int, ...]  # each layer's tensor bytes
    logits_crc32: int | None  # None: no logits section

    def to_json(self) -> dict:
        return {"file": self.file, "layers": [self.start, self.stop], "bytes": self.bytes, "crc32": self.crc32,
                "payload_bytes": self.payload_bytes, "header_crc32": self.header_crc32,
                "layer_crc32": list(self.layer_crc32), "logits_crc32": self.logits_crc32}

    @classmethod
    def from_json(cls, d: dict) -> "ShardEntry":
        return cls(str(d["file"]), int(d["layers"][0]), int(d["layers"][1]), int(d["bytes"]), int(d["crc32"]),
                   int(d["payload_bytes"]), int(d["header_crc32"]), tuple(int(c) for c in d["layer_crc32"]),
                   None if d["logits_crc32"] is None else int(d["logits_crc32"]))


def _text_to_json(text: bytes) -> str:
    # lossless for any bytes: undecodable bytes become lone surrogates, which JSON escapes
    return text.decode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class Manifest:
    """A sharded checkpoint's index: tokens, text, layout, KVC header fields and shards."""

    save_id: str  # 16 hex digits, the prefix of this save's shard names
    layout: StateLayout
    ctx: int
    prefill_chunk: int
    tokens: tuple[int, ...]
    text: bytes
    shards: tuple[ShardEntry, ...]
    quant_bits: int = 2
    reason: SaveReason = SaveReason.UNKNOWN
    ext_flags: int = 0  # KVC byte 6 without the checksum bit
    created_at: int = 0  # Unix seconds
    last_used: int = 0
    hits: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.shards]

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        lay = self.layout
        return json.dumps({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "save_id": self.save_id,
            "layout": {"n_layer": lay.n_layer, "head_dim": lay.head_dim, "idx_dim": lay.idx_dim,
                       "n_vocab": lay.n_vocab, "n_swa": lay.n_swa, "ratios": list(lay.ratios)},
            "ctx": self.ctx, "prefill_chunk": self.prefill_chunk, "n_tokens": self.n_tokens,
            "quant_bits": self.quant_bits, "reason": int(self.reason), "ext_flags": self.ext_flags,
            "created_at": self.created_at, "last_used": self.last_used, "hits": self.hits,
            "shards": [s.to_json() for s in self.shards],
            "text": _text_to_json(self.text), "tokens": list(self.tokens),
        }, indent=1)

    @classmethod
    def from_json(cls, data: str, name: str) -> "Manifest":
        try:
            d = json.loads(data)
            if d.get("format") != MANIFEST_FORMAT or d.get("version") != MANIFEST_VERSION:
                raise ShardError(f"{name}: not a version-{MANIFEST_VERSION} sharded KV manifest "
                                 f"(format {d.get('format')!r}, version {d.get('version')!r})")
            lay = d["layout"]
            layout = StateLayout(int(lay["n_layer"]), int(lay["head_dim"]), int(lay["idx_dim"]), int(lay["n_vocab"]),
                                 int(lay["n_swa"]), tuple(int(r) for r in lay["ratios"]))
            m = cls(save_id=str(d["save_id"]), layout=layout, ctx=int(d["ctx"]), prefill_chunk=int(d["prefill_chunk"]),
                    tokens=tuple(int(t) for t in d["tokens"]),
                    text=str(d["text"]).encode("utf-8", errors="surrogateescape"),
                    shards=tuple(ShardEntry.from_json(s) for s in d["shards"]), quant_bits=int(d["quant_bits"]),
                    reason=SaveReason(int(d["reason"])), ext_flags=int(d["ext_flags"]),
                    created_at=int(d["created_at"]), last_used=int(d["last_used"]), hits=int(d["hits"]))
            n = int(d["n_tokens"])
        except ShardError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ShardError(f"{name}: malformed manifest: {type(err).__name__}: {err}") from None
        if n != m.n_tokens:
            raise ShardError(f"{name}: manifest says {n} tokens but lists {m.n_tokens}")
        if len(layout.ratios) != layout.n_layer:
            raise ShardError(f"{name}: layout lists {len(layout.ratios)} ratios for {layout.n_layer} layers")
        check_ranges(m.ranges, layout.n_layer, f"{name}: shard ranges")
        for s in m.shards:
            if len(s.layer_crc32) != s.stop - s.start or (s.logits_crc32 is None) == (s.stop == layout.n_layer):
                raise ShardError(f"{name}: shard {s.file}: {len(s.layer_crc32)} layer checksums for layers "
                                 f"{s.start}..{s.stop - 1}, logits checksum {s.logits_crc32}")
            if os.path.basename(s.file) != s.file:
                raise ShardError(f"{name}: shard file name {s.file!r} is not a plain name in the directory")
        return m


def manifest_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / MANIFEST_NAME


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The published manifest of a checkpoint directory."""
    p = manifest_path(directory)
    try:
        data = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(f"{p}: no manifest (not a sharded checkpoint, or its save never completed)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ShardError(f"{p}: cannot read manifest: {err}") from None
    return Manifest.from_json(data, str(p))


def new_save_id() -> str:
    """16 random hex digits naming one save's shards."""
    return secrets.token_hex(8)


def shard_name(save_id: str, start: int, stop: int) -> str:
    """``<save_id>.L<first>-<last>.dsvl`` (inclusive layer numbers)."""
    return f"{save_id}.L{start}-{stop - 1}.dsvl"


def publish_manifest(directory: str | os.PathLike, manifest: Manifest, durable: bool = False) -> Path:
    """Write the manifest to a temp name and rename it over ``manifest.json`` (atomic)."""
    d = Path(directory)
    final = manifest_path(d)
    try:
        with atomic_write(final, durable) as f:
            write_all(f, manifest.to_json().encode("utf-8"))
    except OSError as err:
        raise ShardError(f"{final}: cannot publish manifest: {err.strerror or err}") from None
    return final


# ---- writing shards -------------------------------------------------------------------------------
class _CRCWriter:
    """Writes bytes in cache-sized pieces, feeding the whole-file CRC and a section CRC."""

    def __init__(self, f: BinaryIO, total: int, progress: Progress | None) -> None:
        self.f, self.total, self.progress = f, total, progress
        self.crc = 0
        self.n = 0

    def put(self, data: bytes | memoryview, section: int) -> int:
        mv = memoryview(data).cast("B")
        for at in range(0, len(mv), PIECE):
            piece = mv[at:at + PIECE]
            self.crc = zlib.crc32(piece, self.crc)
            section = zlib.crc32(piece, section)
            self.n += write_all(self.f, piece)
            if self.progress is not None:
                self.progress(self.n, self.total)
        return section


def _f32(arr: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(arr, dtype=np.float32))


def write_shard(f: BinaryIO, shard: SessionState, file_name: str, progress: Progress | None = None) -> ShardEntry:
    """Stream ``shard``'s DSVL payload (plus logits when it holds the last layer) into ``f``.

    Returns the manifest entry for it, named ``file_name``. Raises ShardError when the
    state is inconsistent (before writing) or when the bytes written differ from the size
    the layout predicts.
    """
    problems = shard.problems()
    T = shard.n_tokens
    if T == 0:
        problems.append("no tokens (a checkpoint needs at least one)")
    elif T >= shard.ctx:
        problems.append(f"{T} tokens do not fit context {shard.ctx} (need T < ctx)")
    if problems:
        raise ShardError(f"{file_name}: cannot serialize layers {shard.start}..{shard.stop - 1}: "
                         + "; ".join(problems[:5]))
    lay = shard.layout
    total = shard_file_bytes(lay, T, shard.ctx, shard.start, shard.stop)
    w = _CRCWriter(f, total, progress)
    h = DSVLHeader.for_shard(shard)
    Ls = range(shard.start, shard.stop)
    prefix = h.pack() + struct.pack(f"<{2 * len(Ls)}I", *(lay.n_comp(L, T) for L in Ls), *(lay.n_idx(L, T) for L in Ls))
    header_crc = w.put(prefix, 0)
    layer_crcs = []
    for ls in shard.layers:
        crc = 0
        for _, arr in ls.tensors():
            data = _f32(arr)
            if data.size:
                crc = w.put(memoryview(data).cast("B"), crc)
        layer_crcs.append(crc)
    payload = w.n
    logits_crc = w.put(memoryview(_f32(shard.logits)).cast("B"), 0) if shard.has_last_layer else None
    if w.n != total:
        raise ShardError(f"{file_name}: wrote {w.n} bytes, the layout predicts {total}")
    return ShardEntry(file_name, shard.start, shard.stop, w.n, w.crc, payload, header_crc, tuple(layer_crcs),
                      logits_crc)


def write_shard_file(directory: str | os.PathLike, shard: SessionState, save_id: str, durable: bool = False,
                     progress: Progress | None = None) -> ShardEntry:
    """Write ``shard`` into ``<dir>/<name>.tmp.<pid>`` and rename it to its final name.

    The final name is unique to the save, so no published checkpoint is touched. On any
    failure the temp file is removed and ShardError raised. ``durable`` fsyncs the file.
    """
    d = Path(directory)
    name = shard_name(save_id, shard.start, shard.stop)
    try:
        with atomic_write(d / name, durable) as f:
            entry = write_shard(f, shard, name, progress)
    except OSError as err:
        raise ShardError(f"{d / name}: cannot write shard: {err.strerror or err}") from None
    return entry


def make_manifest(state_like: SessionState, shards: Sequence[ShardEntry], save_id: str, text: bytes, *,
                  quant_bits: int = 2, reason: SaveReason = SaveReason.UNKNOWN, ext_flags: int = 0,
                  created_at: int | None = None, last_used: int | None = None, hits: int = 0) -> Manifest:
    """The manifest for shards written from ``state_like`` (tokens, context, layout)."""
    if quant_bits not in (2, 4):
        raise ShardError(f"quant bits {quant_bits}, expected 2 or 4")
    now = int(time.time()) if created_at is None else created_at
    m = Manifest(save_id=save_id, layout=state_like.layout, ctx=state_like.ctx,
                 prefill_chunk=state_like.prefill_chunk, tokens=tuple(int(t) for t in state_like.tokens),
                 text=bytes(text), shards=tuple(sorted(shards, key=lambda s: s.start)), quant_bits=quant_bits,
                 reason=SaveReason(reason), ext_flags=int(ext_flags) & ~int(ExtFlag.CHECKSUM) & 0xFF,
                 created_at=now, last_used=now if last_used is None else last_used, hits=hits)
    check_ranges(m.ranges, m.layout.n_layer, "shard ranges")
    return m


def remove_unreferenced(directory: str | os.PathLike, old: Manifest | None, new: Manifest) -> list[Path]:
    """Delete the shard files of ``old`` that ``new`` does not list (missing files are fine)."""
    if old is None:
        return []
    keep = {s.file for s in new.shards}
    gone = []
    for s in old.shards:
        if s.file not in keep:
            p = Path(directory) / s.file
            try:
                p.unlink()
                gone.append(p)
            except FileNotFoundError:
                pass
    return gone


def write_checkpoint(directory: str | os.PathLike, parts: Sequence[SessionState], text: str | bytes = b"", *,
                     quant_bits: int = 2, reason: SaveReason = SaveReason.UNKNOWN, ext_flags: int = 0,
                     durable: bool = False, created_at: int | None = None, last_used: int | None = None,
                     hits: int = 0, progress: Progress | None = None) -> Manifest:
    """Write a whole sharded checkpoint from one process (every part, then the manifest).

    Replaces an existing checkpoint in ``directory`` atomically (its shards are removed
    once the new manifest is published).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    parts = sorted(parts, key=lambda p: p.start)
    if not parts:
        raise ShardError(f"{d}: no shard states to write")
    check_ranges([(p.start, p.stop) for p in parts], parts[0].layout.n_layer, f"{d}: shard ranges")
    try:
        old = read_manifest(d)
    except ShardError:
        old = None
    save_id = new_save_id()
    entries: list[ShardEntry] = []
    try:
        for p in parts:
            if p.tokens != parts[0].tokens:
                raise ShardError(f"{d}: layers {p.start}..{p.stop - 1} hold other tokens than layers "
                                 f"{parts[0].start}..{parts[0].stop - 1}")
            entries.append(write_shard_file(d, p, save_id, durable, progress))
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        m = make_manifest(parts[0], entries, save_id, raw, quant_bits=quant_bits, reason=reason, ext_flags=ext_flags,
                          created_at=created_at, last_used=last_used, hits=hits)
        publish_manifest(d, m, durable)
    except BaseException:
        for e in entries:
            (d / e.file).unlink(missing_ok=True)
        raise
    remove_unreferenced(d, old, m)
    return m


# ---- reading shards ---------------------------------------------------------------------------------
def _read_exact(f: BinaryIO, n: int, name: str, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise ShardError(f"{name}: file ends inside {what} ({len(buf)} of {n} bytes)")
    return buf


def _read_into(f: BinaryIO, out: memoryview, name: str, what: str) -> int:
    """Fill ``out`` from ``f`` in pieces; return the CRC-32 of the bytes."""
    crc, pos = 0, 0
    while pos < len(out):
        piece = out[pos:pos + PIECE]
        got = 0
        while got < len(piece):
            n = f.readinto(piece[got:])
            if not n:
                raise ShardError(f"{name}: file ends inside {what} ({pos + got} of {len(out)} bytes)")
            got += n
        crc = zlib.crc32(piece, crc)
        pos += len(piece)
    return crc


def check_dsvl_header(h: DSVLHeader, layout: StateLayout, entry: ShardEntry, n_tokens: int, ctx: int,
                      prefill_chunk: int, name: str) -> None:
    """ds4's layer-payload checks against the manifest and the runtime context."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ShardError(f"{name}: {message}")

    need(h.magic == DSVL_MAGIC and h.version == DSVL_VERSION,
         f"unsupported layer payload: magic {h.magic:#010x} version {h.version}, expected {DSVL_MAGIC:#010x} "
         f"('DSVL') version {DSVL_VERSION}")
    need((h.layer_start, h.layer_end) == (entry.start, entry.stop - 1),
         f"shard holds layers {h.layer_start}..{h.layer_end}, the manifest says {entry.start}..{entry.stop - 1}")
    need((h.n_layer, h.head_dim, h.idx_dim) == (layout.n_layer, layout.head_dim, layout.idx_dim),
         f"shard written for a different layout: layers/head_dim/idx_dim {(h.n_layer, h.head_dim, h.idx_dim)}, "
         f"expected {(layout.n_layer, layout.head_dim, layout.idx_dim)}")
    need(h.tokens == n_tokens and 0 < h.tokens < ctx and h.ctx <= ctx,
         f"shard does not fit: saved ctx {h.ctx}, tokens {h.tokens} (manifest {n_tokens}), current ctx {ctx}")
    need(h.raw_window == raw_window(layout, ctx),
         f"raw window {h.raw_window} does not match the current runtime's {raw_window(layout, ctx)}")
    cur_raw_cap = raw_cap(layout, ctx, prefill_chunk)
    need(h.raw_cap > 0 and h.raw_live == min(h.tokens, h.raw_window) and h.raw_live <= h.raw_cap
         and h.raw_live <= cur_raw_cap,
         f"raw ring layout does not fit: raw_cap {h.raw_cap}, raw_live {h.raw_live}, tokens {h.tokens}, "
         f"current raw_cap {cur_raw_cap}")
    need(h.comp_cap <= comp_cap(ctx), f"compressed cache capacity {h.comp_cap} > current {comp_cap(ctx)}")


def _shard_prefix(f: BinaryIO, entry: ShardEntry, layout: StateLayout, n_tokens: int, ctx: int, prefill_chunk: int,
                  name: str, verify: bool) -> DSVLHeader:
    raw = _read_exact(f, DSVL_HEADER_BYTES, name, "the DSVL header")
    h = DSVLHeader(*_DSVL_HEADER.unpack(raw))
    n = entry.stop - entry.start
    counts_raw = _read_exact(f, 8 * n, name, "the row counts") if h.n_range == n else b""
    if verify and zlib.crc32(counts_raw, zlib.crc32(raw)) != entry.header_crc32:
        raise ShardError(f"{name}: header checksum mismatch (header or row counts corrupt)")
    check_dsvl_header(h, layout, entry, n_tokens, ctx, prefill_chunk, name)
    counts = struct.unpack(f"<{2 * n}I", counts_raw)
    n_comp, n_idx = list(counts[:n]), list(counts[n:])
    for i, L in enumerate(range(entry.start, entry.stop)):
        want = (layout.n_comp(L, h.tokens), layout.n_idx(L, h.tokens))
        if (n_comp[i], n_idx[i]) != want:
            raise ShardError(f"{name}: invalid compressed/indexer row count at layer {L} (ratio {layout.ratios[L]}): "
                             f"{n_comp[i]}/{n_idx[i]}, expected {want[0]}/{want[1]} for {h.tokens} tokens")
    return h


def read_shard_layers(directory: str | os.PathLike, manifest: Manifest, entry: ShardEntry, start: int, stop: int,
                      ctx: int, prefill_chunk: int, logits: bool, verify: bool = True
                      ) -> tuple[list[LayerState], np.ndarray | None]:
    """Layers ``max(start, entry.start)..min(stop, entry.stop)-1`` of one shard (NumPy
    float32 views into one buffer) and, when asked and present, its logits.

    Checks the file size, the header against the manifest and the runtime ``ctx``, the
    row counts, and (``verify``) the CRC of every section read.
    """
    p = Path(directory) / entry.file
    name = str(p)
    lay = manifest.layout
    a, b = max(start, entry.start), min(stop, entry.stop)
    try:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise ShardError(f"{name}: {size} bytes, the manifest says {entry.bytes} (truncated or replaced)")
            h = _shard_prefix(f, entry, lay, manifest.n_tokens, ctx, prefill_chunk, name, verify)
            spans = layer_spans(lay, h)
            if spans[-1].offset + spans[-1].nbytes != entry.payload_bytes:
                raise ShardError(f"{name}: layers end at byte {spans[-1].offset + spans[-1].nbytes}, "
                                 f"the manifest's payload is {entry.payload_bytes} bytes")
            wanted = [s for s in spans if a <= s.layer < b]
            layers: list[LayerState] = []
            if wanted:
                lo = wanted[0].offset
                buf = np.empty((wanted[-1].offset + wanted[-1].nbytes - lo) // F32, dtype="<f4")
                mv = memoryview(buf).cast("B")
                f.seek(lo)
                for s in wanted:
                    crc = _read_into(f, mv[s.offset - lo:s.offset - lo + s.nbytes], name, f"layer {s.layer}")
                    if verify and crc != entry.layer_crc32[s.layer - entry.start]:
                        raise ShardError(f"{name}: checksum mismatch in layer {s.layer} "
                                         f"(bytes {s.offset}..{s.offset + s.nbytes - 1})")
                    ls, at = LayerState(raw=None), (s.offset - lo) // F32
                    for fname, (r, c) in s.fields:
                        setattr(ls, fname, buf[at:at + r * c].reshape(r, c))
                        at += r * c
                    layers.append(ls)
            out_logits = None
            if logits and entry.logits_crc32 is not None:
                out_logits = np.empty(lay.n_vocab, dtype="<f4")
                f.seek(entry.payload_bytes)
                crc = _read_into(f, memoryview(out_logits).cast("B"), name, "the logits")
                if verify and crc != entry.logits_crc32:
                    raise ShardError(f"{name}: checksum mismatch in the logits")
    except FileNotFoundError:
        raise ShardError(f"{name}: shard file missing (the checkpoint lists it)") from None
    except OSError as err:
        raise ShardError(f"{name}: cannot read shard: {err.strerror or err}") from None
    return layers, out_logits


def load_range(directory: str | os.PathLike, start: int, stop: int, ctx: int | None = None, *,
               prefill_chunk: int | None = None, logits: bool = True, verify: bool = True,
               manifest: Manifest | None = None) -> SessionState:
    """Layers ``start..stop-1`` of a checkpoint, read from whichever shards hold them.

    ``ctx`` is the runtime context (None: the saved one); ``prefill_chunk`` defaults to
    the saved one when ``ctx`` is None, else to ds4's ``min(ctx, 2048)``. The logits are
    read only when ``logits`` is set and ``stop`` is the last layer.
    """
    m = read_manifest(directory) if manifest is None else manifest
    lay = m.layout
    if not 0 <= start < stop <= lay.n_layer:
        raise ShardError(f"{directory}: layer range {start}..{stop - 1} outside 0..{lay.n_layer - 1}")
    cur_ctx = m.ctx if ctx is None else ctx
    chunk = prefill_chunk if prefill_chunk is not None else (m.prefill_chunk if ctx is None
                                                             else default_prefill_chunk(cur_ctx))
    layers: list[LayerState] = []
    out_logits = None
    for e in m.shards:
        if e.stop <= start or e.start >= stop:
            continue
        want_logits = logits and stop == lay.n_layer and e.stop == lay.n_layer
        got, lg = read_shard_layers(directory, m, e, start, stop, cur_ctx, chunk, want_logits, verify)
        layers.extend(got)
        if lg is not None:
            out_logits = lg
    return SessionState(layout=lay, ctx=cur_ctx, prefill_chunk=chunk, tokens=list(m.tokens), logits=out_logits,
                        layers=layers, start=start, stop=stop)


def load_checkpoint(directory: str | os.PathLike, ctx: int | None = None, *, prefill_chunk: int | None = None,
                    verify: bool = True) -> tuple[SessionState, Manifest]:
    """The whole state of a checkpoint (any layout of shards) and its manifest."""
    m = read_manifest(directory)
    part = load_range(directory, 0, m.layout.n_layer, ctx, prefill_chunk=prefill_chunk, verify=verify, manifest=m)
    return join([part]), m


def verify_checkpoint(directory: str | os.PathLike) -> list[str]:
    """Every problem found reading every byte of every shard (empty list: intact)."""
    try:
        m = read_manifest(directory)
    except ShardError as err:
        return [str(err)]
    out = []
    for e in m.shards:
        p = Path(directory) / e.file
        try:
            with open(p, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(PIECE)
                crc, n = 0, 0
                while True:
                    k = f.readinto(buf)
                    if not k:
                        break
                    crc = zlib.crc32(memoryview(buf)[:k], crc)
                    n += k
            if size != e.bytes or n != e.bytes:
                out.append(f"{p}: {n} bytes, the manifest says {e.bytes}")
            elif crc != e.crc32:
                out.append(f"{p}: file checksum mismatch")
        except OSError as err:
            out.append(f"{p}: {err.strerror or err}")
    if not out:
        try:
            for e in m.shards:
                read_shard_layers(directory, m, e, e.start, e.stop, m.ctx, m.prefill_chunk, True)
        except ShardError as err:
            out.append(str(err))
    return out


# ---- conversion to and from .kv files ---------------------------------------------------------------------
def kv_to_checkpoint(kv_path: str | os.PathLike, directory: str | os.PathLike,
                     ranges: Sequence[tuple[int, int]] | int = 2, layout: StateLayout | None = None,
                     durable: bool = False) -> Manifest:
    """Split a ``.kv`` file into a sharded checkpoint (``ranges``: a count or explicit ranges).

    ``layout`` None infers it from the payload (``workbench.kv.format.infer_layout``).
    Tokens, logits, text, every KV tensor and the KVC header fields carry over exactly.
    """
    name = os.fspath(kv_path)
    try:
        with open(name, "rb") as f:
            header, text, state, _ = read_kv_file(f, layout, name=name)
    except OSError as err:
        raise ShardError(f"{name}: cannot read: {err.strerror or err}") from None
    assert state is not None
    rs = split_layers(state.layout.n_layer, ranges) if isinstance(ranges, int) else list(ranges)
    check_ranges(rs, state.layout.n_layer)
    parts = [state.layer_slice(a, b) for a, b in rs]
    return write_checkpoint(directory, parts, text, quant_bits=header.quant_bits, reason=header.reason,
                            ext_flags=header.ext_flags, durable=durable, created_at=header.created_at,
                            last_used=header.last_used, hits=header.hits)


def checkpoint_to_kv(directory: str | os.PathLike, out: str | os.PathLike, checksum: bool = True,
                     durable: bool = False) -> Path:
    """Join a sharded checkpoint into one ``.kv`` file (ds4-server readable).

    ``out`` is a file path, or an existing directory (then ``<sha1(text)>.kv`` inside it,
    the KV store's name). Written to a temp name and renamed; header times and hits come
    from the manifest, so a checkpoint made by :func:`kv_to_checkpoint` converts back to
    the identical file (same ``checksum`` setting).
    """
    state, m = load_checkpoint(directory)
    dest = Path(out)
    if dest.is_dir():
        dest = dest / f"{text_sha(m.text)}.kv"
    try:
        with atomic_write(dest, durable) as f:
            _, n = write_kv_file(f, state, m.text, quant_bits=m.quant_bits, reason=m.reason, ext_flags=m.ext_flags,
                                 checksum=checksum, now=m.created_at, hits=m.hits)
            if n != kv_file_bytes(state, len(m.text), checksum):
                raise ShardError(f"{dest}: wrote {n} bytes, expected {kv_file_bytes(state, len(m.text), checksum)}")
            f.seek(OFF_LAST_USED)  # outside the header checksum, as a store touch rewrites it
            write_all(f, struct.pack("<Q", m.last_used))
    except OSError as err:
        raise ShardError(f"{dest}: cannot write: {err.strerror or err}") from None
    return dest


__all__ = [
    "ShardError", "ShardEntry", "Manifest", "DSVLHeader", "LayerSpan", "DSVL_MAGIC", "DSVL_VERSION",
    "MANIFEST_NAME", "split_layers", "check_ranges", "parse_ranges", "layer_spans", "shard_payload_bytes",
    "shard_file_bytes", "shard_name", "new_save_id", "manifest_path", "read_manifest", "publish_manifest",
    "write_shard", "write_shard_file", "make_manifest", "remove_unreferenced", "write_checkpoint",
    "read_shard_layers", "load_range", "load_checkpoint", "verify_checkpoint", "kv_to_checkpoint",
    "checkpoint_to_kv",
]
