"""Sharded KV checkpoints: one DSVL layer-range payload per pipeline rank plus a manifest.

A pipeline-parallel session (``workbench.distributed``) holds each layer range's KV state
(a ``SessionState`` with that layer range) on a different rank. Its checkpoint is a
directory::

    manifest.json                      published last (tmp + rename) when every shard is complete
    <save_id>.L<first>-<last>.dsvl     one per layer range, written directly by the rank holding it

Each shard file is a DSVL layer-range payload (``workbench.kv.dsvl``). The manifest
(JSON) holds what no shard holds: the token ids, the rendered text (the KVC lookup key),
the full :class:`StateLayout`, the KVC header fields a ``.kv`` file needs (quant bits,
save reason, extension flags, times, hits), and per shard its ``ShardEntry`` (file name,
layer range, byte count and CRC-32s of the file, header, each layer and the logits).

A ``.kv`` file (``workbench.kv.kvfile``) and a sharded checkpoint convert into each
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from workbench.atomic import atomic_write
from workbench.kv.dsv4 import runtime_chunk
from workbench.kv.dsvl import ShardEntry, file_crc_problem, read_shard, write_shard
from workbench.kv.errors import ShardError
from workbench.kv.header import OFF_LAST_USED, TEXT_OFFSET, ExtFlag, SaveReason, encode_text, parse_header, text_sha
from workbench.kv.inspection import file_layout
from workbench.kv.kvfile import kv_file_bytes, read_kv_file, write_kv_file
from workbench.kv.stream import Progress, write_all
from workbench.spec.statelayout import StateLayout
from workbench.state import LayerState, SessionState, join

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ds4-workbench sharded kv"
MANIFEST_VERSION = 1


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


# ---- manifest ---------------------------------------------------------------------------------
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
    ext_flags: int = 0  # KVC byte 6 without ds4's trailer bits (tool map, title)
    created_at: int = 0  # Unix seconds
    last_used: int = 0
    hits: int = 0
    fingerprint: bytes | None = None  # model fingerprint of a converted .kv's footer (32 bytes), kept for the way back

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
        extra = {} if self.fingerprint is None else {"fingerprint": self.fingerprint.hex()}  # absent: same bytes as before
        return json.dumps({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "save_id": self.save_id,
            "layout": {"n_layer": lay.n_layer, "head_dim": lay.head_dim, "idx_dim": lay.idx_dim,
                       "n_vocab": lay.n_vocab, "n_swa": lay.n_swa, "ratios": list(lay.ratios)},
            "ctx": self.ctx, "prefill_chunk": self.prefill_chunk, "n_tokens": self.n_tokens,
            "quant_bits": self.quant_bits, "reason": int(self.reason), "ext_flags": self.ext_flags,
            "created_at": self.created_at, "last_used": self.last_used, "hits": self.hits,
            "shards": [s.to_json() for s in self.shards],
            "text": _text_to_json(self.text), "tokens": list(self.tokens), **extra,
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
                    created_at=int(d["created_at"]), last_used=int(d["last_used"]), hits=int(d["hits"]),
                    fingerprint=None if d.get("fingerprint") is None else bytes.fromhex(str(d["fingerprint"])))
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


# ---- writing -------------------------------------------------------------------------------------
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
                  created_at: int | None = None, last_used: int | None = None, hits: int = 0,
                  fingerprint: bytes | None = None) -> Manifest:
    """The manifest for shards written from ``state_like`` (tokens, context, layout)."""
    if quant_bits not in (2, 4):
        raise ShardError(f"quant bits {quant_bits}, expected 2 or 4")
    now = int(time.time()) if created_at is None else created_at
    m = Manifest(save_id=save_id, layout=state_like.layout, ctx=state_like.ctx,
                 prefill_chunk=state_like.prefill_chunk, tokens=tuple(int(t) for t in state_like.tokens),
                 text=bytes(text), shards=tuple(sorted(shards, key=lambda s: s.start)), quant_bits=quant_bits,
                 reason=SaveReason(reason), ext_flags=int(ext_flags) & ~int(ExtFlag.TOOL_MAP | ExtFlag.TITLE) & 0xFF,
                 created_at=now, last_used=now if last_used is None else last_used, hits=hits,
                 fingerprint=fingerprint)
    if fingerprint is not None and len(fingerprint) != 32:
        raise ShardError(f"model fingerprint is {len(fingerprint)} bytes, expected 32")
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
                     hits: int = 0, fingerprint: bytes | None = None, progress: Progress | None = None) -> Manifest:
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
        raw = encode_text(text)
        m = make_manifest(parts[0], entries, save_id, raw, quant_bits=quant_bits, reason=reason, ext_flags=ext_flags,
                          created_at=created_at, last_used=last_used, hits=hits, fingerprint=fingerprint)
        publish_manifest(d, m, durable)
    except BaseException:
        for e in entries:
            (d / e.file).unlink(missing_ok=True)
        raise
    remove_unreferenced(d, old, m)
    return m


# ---- reading -------------------------------------------------------------------------------------
def read_shard_layers(directory: str | os.PathLike, manifest: Manifest, entry: ShardEntry, start: int, stop: int,
                      ctx: int, prefill_chunk: int, logits: bool, verify: bool = True
                      ) -> tuple[list[LayerState], np.ndarray | None]:
    """``dsvl.read_shard`` of one of the manifest's shards (layers clipped to ``start..stop-1``)."""
    return read_shard(Path(directory) / entry.file, entry, manifest.layout, manifest.n_tokens, start, stop, ctx,
                      prefill_chunk, logits, verify)


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
    chunk = runtime_chunk(m.prefill_chunk, ctx, prefill_chunk)
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
    out = [p for p in (file_crc_problem(Path(directory) / e.file, e) for e in m.shards) if p is not None]
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

    ``layout`` None infers it from the payload (``workbench.kv.inspection.infer_layout``).
    Tokens, logits, text, every KV tensor and the KVC header fields carry over exactly.
    """
    name = os.fspath(kv_path)
    try:
        with open(name, "rb") as f:
            if layout is None:
                layout, _ = file_layout(f, parse_header(f.read(TEXT_OFFSET), name, os.fstat(f.fileno()).st_size), name)
            header, text, state, trailer = read_kv_file(f, layout, name=name)
    except OSError as err:
        raise ShardError(f"{name}: cannot read: {err.strerror or err}") from None
    assert state is not None
    rs = split_layers(state.layout.n_layer, ranges) if isinstance(ranges, int) else list(ranges)
    check_ranges(rs, state.layout.n_layer)
    parts = [state.layer_slice(a, b) for a, b in rs]
    return write_checkpoint(directory, parts, text, quant_bits=header.quant_bits, reason=header.reason,
                            ext_flags=header.ext_flags, durable=durable, created_at=header.created_at,
                            last_used=header.last_used, hits=header.hits, fingerprint=trailer.fingerprint)


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
                                 checksum=checksum, now=m.created_at, hits=m.hits, fingerprint=m.fingerprint)
            if n != kv_file_bytes(state, len(m.text), checksum):
                raise ShardError(f"{dest}: wrote {n} bytes, expected {kv_file_bytes(state, len(m.text), checksum)}")
            f.seek(OFF_LAST_USED)  # outside the header checksum, as a store touch rewrites it
            write_all(f, struct.pack("<Q", m.last_used))
    except OSError as err:
        raise ShardError(f"{dest}: cannot write: {err.strerror or err}") from None
    return dest
