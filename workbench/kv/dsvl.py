"""The DSVL layer-range payload: the state of layers ``start..stop-1``, one file per range.

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

A written shard is described by a ``ShardEntry`` (what the manifest of
``workbench.kv.shards`` lists): its sizes and the CRC-32 of the whole file, of the
header, of each layer's bytes and of the logits, so that a restore reading only some
layers still verifies every byte it uses. Writes and reads go through
``workbench.kv.stream``; the runtime geometry is the DSV4 payload's.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from workbench.kv.checksum import CRC32
from workbench.kv.dsv4 import PayloadGeometry, comp_cap, raw_cap, raw_rows, raw_window, serializable_problems
from workbench.kv.errors import ShardError, check
from workbench.kv.stream import Progress, Sink, Source, f32_bytes
from workbench.spec.statelayout import F32, StateLayout
from workbench.state import LayerState, SessionState

DSVL_MAGIC = 0x4C565344  # "DSVL" as little-endian bytes
DSVL_VERSION = 1
_DSVL_HEADER = struct.Struct("<14I")
DSVL_HEADER_BYTES = _DSVL_HEADER.size  # 56


@dataclass(frozen=True)
class DSVLHeader(PayloadGeometry):
    """The 14 u32 at the start of a DSVL payload (``layer_end`` inclusive, as ds4 writes it).

    Shaped like ``PayloadHeader`` on purpose: both extend ``PayloadGeometry`` with their
    own trailing fields and pack in field order, so each wire format reads as one class."""

    layer_start: int
    layer_end: int
    raw_live: int

    def pack(self) -> bytes:
        return _DSVL_HEADER.pack(*astuple(self))

    @classmethod
    def for_shard(cls, s: SessionState) -> "DSVLHeader":
        return cls(*cls.of(s, DSVL_MAGIC, DSVL_VERSION), s.start, s.stop - 1,
                   min(s.n_tokens, raw_window(s.layout, s.ctx)))

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
    n_raw = raw_rows(layout, n_tokens, ctx)
    return DSVL_HEADER_BYTES + 8 * (stop - start) + sum(
        rows * cols * F32 for L in range(start, stop) for _, (rows, cols) in layout.layer_shapes(L, n_tokens, n_raw))


def shard_file_bytes(layout: StateLayout, n_tokens: int, ctx: int, start: int, stop: int) -> int:
    """Exact shard file bytes: the payload plus the logits in the last range's shard."""
    logits = F32 * layout.n_vocab if stop == layout.n_layer else 0
    return shard_payload_bytes(layout, n_tokens, ctx, start, stop) + logits


@dataclass(frozen=True)
class ShardEntry:
    """One written shard, as a manifest records it (``stop`` exclusive; CRCs are zlib CRC-32)."""

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


# ---- writing -------------------------------------------------------------------------------
def write_shard(f: BinaryIO, shard: SessionState, file_name: str, progress: Progress | None = None) -> ShardEntry:
    """Stream ``shard``'s DSVL payload (plus logits when it holds the last layer) into ``f``.

    Returns the manifest entry for it, named ``file_name``. Raises ShardError when the
    state is inconsistent (before writing) or when the bytes written differ from the size
    the layout predicts. ``progress`` gets (bytes written, file bytes) per 2 MiB.
    """
    problems = serializable_problems(shard)
    if problems:
        raise ShardError(f"{file_name}: cannot serialize layers {shard.start}..{shard.stop - 1}: "
                         + "; ".join(problems[:5]))
    lay, T = shard.layout, shard.n_tokens
    total = shard_file_bytes(lay, T, shard.ctx, shard.start, shard.stop)
    whole = CRC32()
    out = Sink(f, [whole], progress, total)
    Ls = range(shard.start, shard.stop)
    head = CRC32()
    out.put(DSVLHeader.for_shard(shard).pack()
            + struct.pack(f"<{2 * len(Ls)}I", *(lay.n_comp(L, T) for L in Ls), *(lay.n_idx(L, T) for L in Ls)), head)
    layer_crcs = []
    for ls in shard.layers:
        crc = CRC32()
        for _, arr in ls.tensors():
            if arr.size:
                out.put(f32_bytes(arr), crc)
        layer_crcs.append(crc.value)
    payload = out.n
    logits_crc = None
    if shard.has_last_layer:
        crc = CRC32()
        out.put(f32_bytes(shard.logits), crc)
        logits_crc = crc.value
    if out.n != total:
        raise ShardError(f"{file_name}: wrote {out.n} bytes, the layout predicts {total}")
    return ShardEntry(file_name, shard.start, shard.stop, out.n, whole.value, payload, head.value, tuple(layer_crcs),
                      logits_crc)


# ---- reading -------------------------------------------------------------------------------
def check_dsvl_header(h: DSVLHeader, layout: StateLayout, entry: ShardEntry, n_tokens: int, ctx: int,
                      prefill_chunk: int, name: str) -> None:
    """ds4's layer-payload checks against the manifest and the runtime context."""
    def need(cond: bool, message: str) -> None:
        check(cond, name, message, ShardError)

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


def _read_prefix(f: BinaryIO, entry: ShardEntry, layout: StateLayout, n_tokens: int, ctx: int, prefill_chunk: int,
                 name: str, verify: bool) -> DSVLHeader:
    """The header of a shard, checked with its row counts (and their CRC, with ``verify``)."""
    def exact(n: int, what: str) -> bytes:
        buf = f.read(n)
        check(len(buf) == n, name, f"file ends inside {what} ({len(buf)} of {n} bytes)", ShardError)
        return buf

    raw = exact(DSVL_HEADER_BYTES, "the DSVL header")
    h = DSVLHeader(*_DSVL_HEADER.unpack(raw))
    n = entry.stop - entry.start
    counts_raw = exact(8 * n, "the row counts") if h.n_range == n else b""
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


def read_shard(path: str | os.PathLike, entry: ShardEntry, layout: StateLayout, n_tokens: int, start: int, stop: int,
               ctx: int, prefill_chunk: int, logits: bool, verify: bool = True
               ) -> tuple[list[LayerState], np.ndarray | None]:
    """Layers ``max(start, entry.start)..min(stop, entry.stop)-1`` of one shard file (NumPy
    float32 views into one buffer) and, when asked and present, its logits ``[n_vocab]``.

    Checks the file size, the header against ``entry`` (and ``n_tokens``) and the runtime
    ``ctx``, the row counts, and (``verify``) the CRC of every section read.
    """
    p = Path(path)
    name = str(p)
    a, b = max(start, entry.start), min(stop, entry.stop)
    try:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise ShardError(f"{name}: {size} bytes, the manifest says {entry.bytes} (truncated or replaced)")
            h = _read_prefix(f, entry, layout, n_tokens, ctx, prefill_chunk, name, verify)
            spans = layer_spans(layout, h)
            if spans[-1].offset + spans[-1].nbytes != entry.payload_bytes:
                raise ShardError(f"{name}: layers end at byte {spans[-1].offset + spans[-1].nbytes}, "
                                 f"the manifest's payload is {entry.payload_bytes} bytes")
            f.seek(0)
            src = Source(f, size, name, kind="shard", error=ShardError, budget_name="the file")
            wanted = [s for s in spans if a <= s.layer < b]
            layers: list[LayerState] = []
            if wanted:
                lo = wanted[0].offset
                buf = np.empty((wanted[-1].offset + wanted[-1].nbytes - lo) // F32, dtype="<f4")
                mv = memoryview(buf).cast("B")
                src.seek(lo)
                for s in wanted:
                    crc = CRC32()
                    src.fill(mv[s.offset - lo:s.offset - lo + s.nbytes], lambda _, L=s.layer: f"layer {L}", crc)
                    if verify and crc.value != entry.layer_crc32[s.layer - entry.start]:
                        raise ShardError(f"{name}: checksum mismatch in layer {s.layer} "
                                         f"(bytes {s.offset}..{s.offset + s.nbytes - 1})")
                    ls, at = LayerState(raw=None), (s.offset - lo) // F32
                    for fname, (r, c) in s.fields:
                        setattr(ls, fname, buf[at:at + r * c].reshape(r, c))
                        at += r * c
                    layers.append(ls)
            out_logits = None
            if logits and entry.logits_crc32 is not None:
                out_logits = np.empty(layout.n_vocab, dtype="<f4")
                src.seek(entry.payload_bytes)
                crc = CRC32()
                src.fill(memoryview(out_logits).cast("B"), lambda _: "the logits", crc)
                if verify and crc.value != entry.logits_crc32:
                    raise ShardError(f"{name}: checksum mismatch in the logits")
    except FileNotFoundError:
        raise ShardError(f"{name}: shard file missing (the checkpoint lists it)") from None
    except OSError as err:
        raise ShardError(f"{name}: cannot read shard: {err.strerror or err}") from None
    return layers, out_logits


def file_crc_problem(path: str | os.PathLike, entry: ShardEntry) -> str | None:
    """Read every byte of a shard file: its size and whole-file CRC against ``entry``
    (None when both agree, else the problem, naming the file)."""
    p = Path(path)
    try:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                return f"{p}: {size} bytes, the manifest says {entry.bytes}"
            crc = CRC32()
            Source(f, size, str(p), [crc], kind="shard", error=ShardError, budget_name="the file").skip(
                size, lambda _: "the file")
    except ShardError as err:
        return str(err)
    except OSError as err:
        return f"{p}: {err.strerror or err}"
    return None if crc.value == entry.crc32 else f"{p}: file checksum mismatch"
