"""Chained checkpoints: a conversation's checkpoints stored as a base plus deltas.

A chain entry is ``<dir>/chain/<sha1(text)>.kvd`` (the same SHA-1 a flat ``.kv`` file
would have). ds4-server lists only ``<40 hex>.kv`` files at the top of its directory,
so it never sees these files (its own budget does not count them; this workbench's
store counts every file, the ``chain/`` tree included). File layout::

    0            52 + text   KVC header and text (``workbench.kv.header``), exactly as a
                             flat file's, except payload_bytes = the chain section's bytes
                             and no trailer flags (tool map, title)
    chain ref    36 B        "DSVC", u32 version 2, 20 B parent SHA-1 (zeros: a base),
                             u32 parent tokens (0 for a base), u32 depth (0 for a base)
    grown        ...         the DSV4 payload header of the whole state (52 B), its
                             compressed/indexer row counts (u32 [2 * n_layer]), tokens
                             [parent:T] (u32), then per layer: comp rows [parent rows:],
                             idx rows [parent rows:] (float32; what descendants need)
    changed      ...         logits (f32 [vocab]), then per layer in DSV4 order: raw window,
                             comp frontiers, idx frontiers (float32; read from the leaf only)
    footer       optional    the workbench's footer (``workbench.kv.checksum``), as a flat
                             file's: header and text CRCs, checksums of the chain section
                             (reference + grown + changed) in chunks of ``CHAIN_CHUNK``
                             bytes, the writer's model fingerprint

Compressed and indexer rows and tokens only grow by appending, so the parent's rows are
exactly the first rows of the child's; what changes (raw window, frontiers, logits) is
stored whole in every entry, after the grown part. Restoring walks the chain from the
base: each file is opened once, its grown rows read straight into the whole state's
buffers, the changed part read from the leaf only. A verified restore checks every chunk
it reads: an ancestor's chunks up to the end of its grown part, so it reads at most one
chunk (``CHAIN_CHUNK``, 64 KiB) of its changed part, and its header checksum (its text,
which the restore does not use, is checked when it is itself restored); the leaf's every
chunk, header and text.
``model_check`` lets the store refuse a piece written by another model (its footer's
fingerprint) before any payload byte is read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import mlx.core as mx
import numpy as np

from workbench.kv.checksum import ChunkCRC, Checksums, footer_bytes, header_crc, text_crc
from workbench.kv.dsv4 import (
    _PAYLOAD_HEADER, PAYLOAD_HEADER_BYTES, PayloadHeader, PayloadSummary, check_payload_header, check_row_counts,
    check_usable, raw_rows, runtime_chunk, serializable_problems,
)
from workbench.kv.errors import KVFormatError, check
from workbench.kv.header import (
    MODEL_FLASH, TEXT_OFFSET, KVHeader, SaveReason, new_header, parse_header, read_text, text_sha,
)
from workbench.kv.stream import Sink, f32_bytes, write_all
from workbench.kv.trailers import Trailer, read_trailer
from workbench.safeopen import open_regular
from workbench.spec.statelayout import F32, StateLayout
from workbench.state import LayerState, SessionState

CHAIN_DIR = "chain"
CHAIN_SUFFIX = ".kvd"
CHAIN_MAGIC = b"DSVC"
CHAIN_VERSION = 2
CHAIN_CHUNK = 64 * 1024  # footer chunk of chain files: a verified ancestor reads <= one past its grown part
_REF = struct.Struct("<4sI20sII")
REF_BYTES = _REF.size  # 36
GROWING = ("comp", "idx")  # the fields that only grow by appending rows


@dataclass(frozen=True)
class ChainRef:
    """What a chain entry says about its parent."""

    parent: str | None  # SHA-1 hex of the parent entry; None for a base
    parent_tokens: int
    depth: int  # 0 for a base, parent's depth + 1 otherwise

    def pack(self) -> bytes:
        raw = bytes.fromhex(self.parent) if self.parent else bytes(20)
        return _REF.pack(CHAIN_MAGIC, CHAIN_VERSION, raw, self.parent_tokens, self.depth)


def chain_path(directory: Path, sha: str) -> Path:
    """Where the chain entry of ``sha`` lives in cache directory ``directory``."""
    return directory / CHAIN_DIR / f"{sha}{CHAIN_SUFFIX}"


def read_ref(f: BinaryIO, header: KVHeader, name: str) -> ChainRef:
    """The chain reference after the text of an open chain file."""
    f.seek(header.payload_offset)
    raw = f.read(REF_BYTES)
    check(len(raw) == REF_BYTES and header.payload_bytes >= REF_BYTES, name, "truncated chain reference")
    magic, version, parent, ptok, depth = _REF.unpack(raw)
    check(magic == CHAIN_MAGIC and version == CHAIN_VERSION, name,
          f"chain reference magic {magic!r} version {version}, expected {CHAIN_MAGIC!r} version {CHAIN_VERSION}")
    is_base = parent == bytes(20)
    check(is_base == (ptok == 0) == (depth == 0), name,
          f"chain reference: parent {parent.hex()}, parent tokens {ptok}, depth {depth} disagree")
    check(ptok < header.tokens, name, f"chain reference: parent tokens {ptok} >= entry tokens {header.tokens}")
    return ChainRef(None if is_base else parent.hex(), ptok, depth)


def read_chain_header(path: Path) -> tuple[KVHeader, ChainRef]:
    """Header and chain reference of a chain file (no text, no payload)."""
    link = read_link(path, trailer=False)
    return link.header, link.ref


def read_link(path: Path, trailer: bool = True) -> "Link":
    """Header, raw header bytes, chain reference and (``trailer``) footer of one chain file."""
    name = str(path)
    try:
        with open_regular(path, follow=False) as f:  # a FIFO or link in chain/ is foreign: never blocks
            head = f.read(TEXT_OFFSET)
            header = parse_header(head, name, os.fstat(f.fileno()).st_size)
            ref = read_ref(f, header, name)
            return Link(path, header, ref, head[:TEXT_OFFSET], read_trailer(f, header, name) if trailer else None)
    except OSError as err:
        raise KVFormatError(f"{name}: cannot read chain entry: {err.strerror or err}") from err


# ---- writing --------------------------------------------------------------------------------
def delta_shapes(layout: StateLayout, layer: int, n_raw: int, tokens: int, parent_tokens: int
                 ) -> list[tuple[str, tuple[int, int], int]]:
    """(field, [rows, cols] stored, first row) of one layer's delta tensors, in order."""
    out = []
    for fname, (rows, cols) in layout.layer_shapes(layer, tokens, n_raw):
        first = 0
        if fname == "comp":
            first = layout.n_comp(layer, parent_tokens)
        elif fname == "idx":
            first = layout.n_idx(layer, parent_tokens)
        out.append((fname, (rows - first, cols), first))
    return out


def delta_size(layout: StateLayout, tokens: int, parent_tokens: int, ctx: int) -> int:
    """Bytes of the chain section (reference + delta) of a ``tokens``-token state saved at
    ``ctx`` over a parent of ``parent_tokens`` tokens (0: a base)."""
    raw = raw_rows(layout, tokens, ctx)
    body = sum(rows * cols * F32 for L in range(layout.n_layer)
               for _, (rows, cols), _ in delta_shapes(layout, L, raw, tokens, parent_tokens))
    return (REF_BYTES + PAYLOAD_HEADER_BYTES + 4 * (tokens - parent_tokens) + F32 * layout.n_vocab
            + 8 * layout.n_layer + body)


def chain_size(layout: StateLayout, tokens: int, parent_tokens: int, ctx: int, text_len: int,
               checksum: bool = True) -> int:
    """Exact bytes of a chain file (``checksum``: with the footer); no state needed (the cache
    lab's replays account chains with it)."""
    delta = delta_size(layout, tokens, parent_tokens, ctx)
    return TEXT_OFFSET + text_len + delta + (footer_bytes(delta, CHAIN_CHUNK) if checksum else 0)


def delta_bytes(state: SessionState, parent_tokens: int) -> int:
    """Bytes of the chain section (reference + delta) for ``state`` over a parent of
    ``parent_tokens`` tokens (0: a base)."""
    return delta_size(state.layout, state.n_tokens, parent_tokens, state.ctx)


def chain_file_bytes(state: SessionState, text_len: int, parent_tokens: int, checksum: bool = True) -> int:
    """Exact bytes of the chain file ``write_chain_file`` writes (``checksum``: with the footer)."""
    return chain_size(state.layout, state.n_tokens, parent_tokens, state.ctx, text_len, checksum)


def write_chain_file(f: BinaryIO, state: SessionState, text: bytes, ref: ChainRef, *, quant_bits: int,
                     reason: SaveReason, ext_flags: int = 0, now: int, hits: int = 0,
                     model_id: int = MODEL_FLASH, checksum: bool = True,
                     fingerprint: bytes | None = None) -> tuple[KVHeader, int]:
    """Write the chain file of ``state`` over the parent ``ref`` names, then (``checksum``)
    the workbench's footer with the model ``fingerprint``; returns (header, bytes)."""
    problems = serializable_problems(state)
    if not state.is_whole:
        problems.insert(0, "holds a layer range only (a chain entry holds every layer)")
    if problems:
        raise KVFormatError("cannot serialize session state: " + "; ".join(problems[:5]))
    lay, T, P = state.layout, state.n_tokens, ref.parent_tokens
    header = new_header(text, tokens=T, ctx=state.ctx, payload_bytes=delta_bytes(state, P), quant_bits=quant_bits,
                        reason=reason, ext_flags=ext_flags, now=now, hits=hits, model_id=model_id)
    head = header.pack()
    crc = ChunkCRC(CHAIN_CHUNK) if checksum else None
    n = write_all(f, head) + write_all(f, text)
    out = Sink(f, () if crc is None else (crc,))  # the chain section: what the chunk checksums cover
    out.put(ref.pack())
    ph = PayloadHeader.for_state(state)
    out.put(ph.pack())
    out.put(struct.pack(f"<{lay.n_layer}I", *(lay.n_comp(L, T) for L in range(lay.n_layer))))
    out.put(struct.pack(f"<{lay.n_layer}I", *(lay.n_idx(L, T) for L in range(lay.n_layer))))
    out.put(np.asarray(state.tokens[P:], dtype="<u4").tobytes())
    fields = [(L, f) for L in range(lay.n_layer) for f in delta_shapes(lay, L, ph.raw_live, T, P)]
    for L, (fname, (rows, _), first) in fields:
        if fname in GROWING and rows:
            arr = getattr(state.layers[L], fname)
            out.put(f32_bytes(arr[first:] if first else arr))
    out.put(f32_bytes(state.logits))
    for L, (fname, (rows, _), _) in fields:
        if fname not in GROWING and rows:
            out.put(f32_bytes(getattr(state.layers[L], fname)))
    n += out.n
    if crc is not None:
        n += write_all(f, Checksums.of(head, text, crc, fingerprint).pack())
    return header, n


# ---- reading --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One file of a chain, as found walking from the leaf."""

    path: Path
    header: KVHeader
    ref: ChainRef
    head: bytes = b""  # the 48 header bytes as stored (what the footer's header CRC covers)
    trailer: Trailer | None = None  # what follows the chain section (None: not read)


def walk(leaf: Path) -> list[Link]:
    """The chain of ``leaf``, base first. Raises KVFormatError naming the first file whose
    parent is missing or disagrees (tokens, depth, context, text)."""
    links: list[Link] = []
    path = leaf
    while True:
        link = read_link(path)
        header, ref = link.header, link.ref
        if links:
            child = links[-1]
            check(header.tokens == child.ref.parent_tokens and ref.depth == child.ref.depth - 1
                  and header.ctx == child.header.ctx and header.text_bytes <= child.header.text_bytes, str(child.path),
                  f"parent {path.name} does not match: tokens {header.tokens} (expected {child.ref.parent_tokens}), "
                  f"depth {ref.depth} (expected {child.ref.depth - 1}), ctx {header.ctx}")
        links.append(link)
        if ref.parent is None:
            return links[::-1]
        parent = path.parent / f"{ref.parent}{CHAIN_SUFFIX}"
        if not parent.exists():
            raise KVFormatError(f"{path}: chain parent {parent.name} is missing (broken chain)")
        path = parent


def chain_tokens(leaf: Path) -> list[int]:
    """The whole token list of a chain entry (reads only the token pieces)."""
    tokens: list[int] = []
    for link in walk(leaf):
        with open_regular(link.path, follow=False) as f:
            f.seek(link.header.payload_offset + REF_BYTES)
            raw = f.read(PAYLOAD_HEADER_BYTES)
            check(len(raw) == PAYLOAD_HEADER_BYTES, str(link.path), "truncated chain payload header")
            f.seek(8 * PayloadHeader(*_PAYLOAD_HEADER.unpack(raw)).n_layer, os.SEEK_CUR)  # past the row counts
            n = link.header.tokens - link.ref.parent_tokens
            raw = f.read(4 * n)
            check(len(raw) == 4 * n, str(link.path), "file ends inside the token ids")
            tokens.extend(np.frombuffer(raw, dtype="<u4").tolist())
    return tokens


IOV_MAX = 512  # buffers per preadv call (POSIX guarantees at least 16; Linux and macOS allow 1024)


class _Plan:
    """The reads of one chain file: runs of adjacent destination buffers, each run one
    ``preadv`` at its offset. Skipped ranges split runs and cost no I/O, except their
    part before ``scratch_until`` (a file offset), read into scratch buffers so that the
    chunks up to there can be checked; ``views`` lists every buffer in file order."""

    def __init__(self, at: int, scratch_until: int = 0) -> None:
        self.at = at  # file offset of the next field
        self.scratch_until = scratch_until
        self.runs: list[tuple[int, list[memoryview]]] = []
        self.views: list[memoryview] = []
        self._open = False

    def add(self, view: memoryview | None, nbytes: int) -> None:
        """The next ``nbytes`` of the file go into ``view`` (None: skipped)."""
        if view is None:
            extra = max(0, min(nbytes, self.scratch_until - self.at))
            if extra:
                self._append(memoryview(bytearray(extra)))
            if extra < nbytes:
                self._open = False
        elif nbytes:
            self._append(view)
        self.at += nbytes

    def _append(self, view: memoryview) -> None:
        if not self._open:
            self.runs.append((self.at, []))
            self._open = True
        self.runs[-1][1].append(view)
        self.views.append(view)

    def read(self, fd: int, name: str) -> None:
        """Fill every buffer (short reads continue where they stopped)."""
        for offset, views in self.runs:
            while views:
                n = os.preadv(fd, views[:IOV_MAX], offset)
                if n <= 0:
                    raise KVFormatError(f"{name}: file ends at byte {offset} inside the chain delta")
                offset += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]


ModelCheck = Callable[["Link"], None]  # raises when a piece must not restore into this model


def read_chain(leaf: Path, layout: StateLayout, ctx: int | None = None, *, prefill_chunk: int | None = None,
               verify: bool = True, model_check: ModelCheck | None = None
               ) -> tuple[SessionState, bytes, KVHeader, list[Link]]:
    """Restore a chain entry: (state, its text, its header, the chain base first).

    Every file is opened and read once; the growing rows of each go straight into the
    whole state's buffers at their row offset; the leaf's raw window, frontiers and logits
    are read, the ancestors' seeked past. Runs ds4's payload checks on the leaf's payload
    header and row counts and checks the text against the file name. ``model_check`` is
    called with every piece (leaf first) before any payload is read. With ``verify``, a
    piece with a footer has its header, text and every chunk checksum checked (its
    skipped fields are read too); a piece without one gets the structural checks only.
    """
    links = walk(leaf)
    if model_check is not None:
        for link in reversed(links):
            model_check(link)
    name = str(leaf)
    last = links[-1]
    with open_regular(leaf, follow=False) as f:
        text = read_text(f, last.header, name)
        f.seek(last.header.payload_offset + REF_BYTES)
        ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(f.read(PAYLOAD_HEADER_BYTES)))
    check(text_sha(text) == leaf.name[:40].lower(), name, "cached text hash mismatch: SHA-1(text) != file name")
    check_payload_header(ph, layout, name, ctx, prefill_chunk)
    T = ph.tokens
    check(T == last.header.tokens, name, f"payload holds {T} tokens, header {last.header.tokens}")
    tokens = np.zeros(T, dtype="<u4")
    shapes = [layout.layer_shapes(L, T, ph.raw_live) for L in range(layout.n_layer)]
    # every MLX tensor copied from one zero buffer (its pages faulted in once), as read_payload does
    zeros = np.zeros(max([layout.n_vocab] + [r * c for fs in shapes for _, (r, c) in fs]), dtype=np.float32)
    logits = mx.array(zeros[: layout.n_vocab])
    layers = []
    for fs in shapes:
        ls = LayerState(raw=None)
        for fname, (rows, cols) in fs:
            setattr(ls, fname, mx.array(zeros[: rows * cols].reshape(rows, cols)))
        layers.append(ls)
    del zeros
    counts = bytearray(8 * layout.n_layer)
    for link in links:
        leafmost = link is last
        P, Ti = link.ref.parent_tokens, link.header.tokens
        lname = str(link.path)
        with open_regular(link.path, follow=False) as f:
            fd = f.fileno()
            crc = _checker(link, text if leafmost else None) if verify else None
            at = link.header.payload_offset + REF_BYTES
            raw = os.pread(fd, PAYLOAD_HEADER_BYTES, at)
            check(len(raw) == PAYLOAD_HEADER_BYTES, lname, "truncated chain payload header")
            pph = PayloadHeader(*_PAYLOAD_HEADER.unpack(raw))
            check(pph.tokens == Ti and pph.ctx == ph.ctx and pph.n_layer == ph.n_layer, lname,
                  f"chain payload header: tokens {pph.tokens} ctx {pph.ctx}, expected {Ti} ctx {ph.ctx}")
            fields = [(L, f) for L in range(layout.n_layer) for f in delta_shapes(layout, L, pph.raw_live, Ti, P)]
            grown = len(counts) + 4 * (Ti - P) + sum(rows * cols * F32 for _, (fname, (rows, cols), _) in fields
                                       if fname in GROWING)
            start, end = link.header.payload_offset, link.header.payload_offset + link.header.payload_bytes
            # an ancestor's checked chunks end at the first chunk boundary past its grown part
            covered = REF_BYTES + PAYLOAD_HEADER_BYTES + grown
            until = end if leafmost else min(end, start + -(-covered // crc.chunk_bytes) * crc.chunk_bytes) \
                if crc is not None else 0
            plan = _Plan(at + PAYLOAD_HEADER_BYTES, until)
            plan.add(memoryview(counts) if leafmost else None, len(counts))
            plan.add(memoryview(tokens[P:Ti]).cast("B"), 4 * (Ti - P))
            for L, (fname, (rows, cols), first) in fields:
                if fname in GROWING and rows:
                    view = memoryview(getattr(layers[L], fname)).cast("B")
                    plan.add(view[first * cols * F32:(first + rows) * cols * F32], rows * cols * F32)
            plan.add(memoryview(logits).cast("B") if leafmost else None, F32 * layout.n_vocab)
            for L, (fname, (rows, cols), _) in fields:
                if fname not in GROWING:
                    plan.add(memoryview(getattr(layers[L], fname)).cast("B") if leafmost else None, rows * cols * F32)
            check(plan.at == end, lname, f"chain delta ends at byte {plan.at}, header says {end}")
            plan.read(fd, lname)
            if crc is not None:
                for piece in [memoryview(link.ref.pack()), memoryview(raw)] + plan.views:
                    crc.update(piece, "the chain delta")
                if until == end:
                    crc.finish()
        if leafmost:
            c = struct.unpack(f"<{2 * layout.n_layer}I", counts)
            check_row_counts(ph, layout, list(c[:layout.n_layer]), list(c[layout.n_layer:]), lname, ctx)
    check_usable(tokens, np.asarray(logits), layout.n_vocab, name)
    state = SessionState(layout=layout, ctx=ph.ctx if ctx is None else ctx,
                         prefill_chunk=runtime_chunk(ph.prefill_chunk, ctx, prefill_chunk),
                         tokens=tokens.tolist(), logits=logits, layers=layers)
    return state, text, last.header, links


def _checker(link: Link, text: bytes | None) -> ChunkCRC | None:
    """The chunk checker of one piece's chain section after its header checksum and (when
    ``text`` is given: the leaf's) its text checksum passed; None when it has no footer."""
    cs = link.trailer.checksums if link.trailer is not None else None
    if cs is None:
        return None
    name = str(link.path)
    check(header_crc(link.head) == cs.header, name, "header checksum mismatch (bytes 0..47 outside hits/last_used)")
    check(text is None or text_crc(text) == cs.text, name, "text checksum mismatch")
    return ChunkCRC(cs.chunk_bytes, cs.chunks, name, cs.algorithm)


def chain_summary(leaf: Path) -> PayloadSummary:
    """The whole state's payload header and row counts of a chain entry (no tensors)."""
    header, ref = read_chain_header(leaf)
    name = str(leaf)
    with open_regular(leaf, follow=False) as f:
        f.seek(header.payload_offset + REF_BYTES)
        raw = f.read(PAYLOAD_HEADER_BYTES)
        check(len(raw) == PAYLOAD_HEADER_BYTES, name, "truncated chain payload header")
        ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(raw))
        raw = f.read(8 * ph.n_layer)
        check(len(raw) == 8 * ph.n_layer, name, "file ends inside the row counts")
    counts = struct.unpack(f"<{2 * ph.n_layer}I", raw)
    return PayloadSummary(ph, list(counts[: ph.n_layer]), list(counts[ph.n_layer:]))
