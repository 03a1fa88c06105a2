"""The DSV4 session payload: a whole session state, as ds4-server writes it.

Version 2 (today's ds4, KVC ABI 2) is written; version 1 (May 2026, ABI 0) has the same
fields and body and is read as well. The payload header is 13 u32: magic 0x34565344,
version, ctx, prefill chunk, raw_cap,
raw_window, comp_cap, T, n_layer, head_dim, idx_dim, vocab, raw_live. The body is
u32[T] tokens, f32[vocab] next-token logits, u32[n_layer] compressed row counts,
u32[n_layer] indexer row counts, then per layer the tensors of ``LayerState.tensors()``
in that order (raw window rows in logical position order). Layer count and widths come
from the state's ``StateLayout``; with ``StateLayout.ds4()`` the bytes are exactly what
ds4-server writes (23,995,788 + 13,764*T bytes for T a multiple of 128).

Loaded states hold MLX float32 arrays, one per tensor, allocated first and filled by
``readinto`` straight from the file (so ``SessionState.to_mlx`` and ``Session.restore``
copy nothing). Writers accept MLX or NumPy arrays and stream each tensor from its own
memory (no payload-sized buffer). Both go through ``workbench.kv.stream``.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import astuple, dataclass
from typing import BinaryIO, Iterator

import mlx.core as mx
import numpy as np

from workbench.kv.checksum import ChunkCRC
from workbench.kv.errors import KVFormatError, check
from workbench.kv.header import KVHeader
from workbench.kv.stream import Progress, Sink, Source, f32_bytes
from workbench.spec.statelayout import F32, StateLayout
from workbench.state import LayerState, SessionState

DSV4_MAGIC = 0x34565344  # "DSV4" as little-endian bytes
DSV4_VERSION = 2  # written (today's ds4 requires it)
DSV4_VERSIONS = (1, 2)  # read: May 2026 and today, same layout
_PAYLOAD_HEADER = struct.Struct("<13I")
PAYLOAD_HEADER_BYTES = _PAYLOAD_HEADER.size  # 52
RAW_CAP_MAX = 8192
RAW_CAP_ALIGN = 256


# ---- ds4's runtime geometry (shared with the layer-range payload) --------------------------
def default_prefill_chunk(ctx: int) -> int:
    """ds4's prefill chunk: min(ctx, 2048)."""
    return min(ctx, 2048)


def raw_window(layout: StateLayout, ctx: int) -> int:
    """Raw sliding-window rows kept: min(n_swa, ctx)."""
    return min(layout.n_swa, ctx)


def raw_cap(layout: StateLayout, ctx: int, prefill_chunk: int) -> int:
    """ds4's GPU raw ring capacity: min(8192, align_up(min(ctx, n_swa + chunk), 256)), >= raw window."""
    want = min(ctx, layout.n_swa + prefill_chunk)
    aligned = -(-want // RAW_CAP_ALIGN) * RAW_CAP_ALIGN
    return max(min(RAW_CAP_MAX, aligned), raw_window(layout, ctx))


def comp_cap(ctx: int) -> int:
    """Compressed-row capacity ds4 allocates for ratio-4 layers: ctx/4 + 2."""
    return ctx // 4 + 2


def runtime_chunk(saved_chunk: int, ctx: int | None, prefill_chunk: int | None) -> int:
    """The prefill chunk a restored state gets: the one asked for, else the saved one when
    the runtime context is the saved one (``ctx`` None), else ds4's for ``ctx``."""
    if prefill_chunk is not None:
        return prefill_chunk
    return saved_chunk if ctx is None else default_prefill_chunk(ctx)


def raw_rows(layout: StateLayout, n_tokens: int, ctx: int | None) -> int:
    """Raw window rows a payload stores: min(T, window), the window at ``ctx`` (None: n_swa)."""
    return min(n_tokens, layout.n_swa if ctx is None else raw_window(layout, ctx))


def payload_size(layout: StateLayout, n_tokens: int, ctx: int | None = None) -> int:
    """Exact DSV4 payload bytes for ``n_tokens`` tokens (row counts floor(T/ratio); tensor
    shapes from ``StateLayout.layer_shapes``)."""
    return (PAYLOAD_HEADER_BYTES + 4 * n_tokens + F32 * layout.n_vocab + 8 * layout.n_layer
            + layout.kv_bytes(n_tokens, raw_rows(layout, n_tokens, ctx)))


def payload_bytes(state: SessionState) -> int:
    """Exact bytes ``write_payload`` will write for this state."""
    return payload_size(state.layout, state.n_tokens, state.ctx)


@dataclass(frozen=True)
class PayloadGeometry:
    """The u32 fields both payload headers (DSV4 and the layer-range DSVL) start with."""

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

    @staticmethod
    def of(state: SessionState, magic: int, version: int) -> tuple[int, ...]:
        """These fields' values for ``state`` (ds4's capacities at its ctx and prefill chunk)."""
        lay, ctx = state.layout, state.ctx
        return (magic, version, ctx, state.prefill_chunk, raw_cap(lay, ctx, state.prefill_chunk),
                raw_window(lay, ctx), comp_cap(ctx), state.n_tokens, lay.n_layer, lay.head_dim, lay.idx_dim)


@dataclass(frozen=True)
class PayloadHeader(PayloadGeometry):
    """The 13 u32 at the start of a DSV4 payload."""

    vocab: int
    raw_live: int

    def pack(self) -> bytes:
        return _PAYLOAD_HEADER.pack(*astuple(self))

    @classmethod
    def for_state(cls, state: SessionState) -> "PayloadHeader":
        return cls(*cls.of(state, DSV4_MAGIC, DSV4_VERSION), state.layout.n_vocab,
                   min(state.n_tokens, raw_window(state.layout, state.ctx)))


# ---- writing --------------------------------------------------------------------------------
def serializable_problems(state: SessionState) -> list[str]:
    """Why ``state`` cannot be written as a checkpoint (empty when it can): its shape
    problems, no tokens, tokens that do not fit its context, no prefill chunk."""
    out = state.problems()
    T = state.n_tokens
    if T == 0:
        out.append("no tokens (a .kv checkpoint needs at least one)")
    elif T >= state.ctx:
        out.append(f"{T} tokens do not fit context {state.ctx} (need T < ctx)")
    if state.prefill_chunk <= 0:
        out.append(f"prefill chunk {state.prefill_chunk}")
    return out


def write_payload(f: BinaryIO, state: SessionState, crc: ChunkCRC | None = None,
                  progress: Progress | None = None) -> int:
    """Stream the DSV4 payload of ``state`` into ``f``, tensor by tensor, with no
    payload-sized buffer; feed every byte to ``crc`` if given. Returns bytes written;
    ``progress`` gets (bytes written, payload bytes) after each layer."""
    problems = serializable_problems(state)
    if not state.is_whole:
        problems.insert(0, f"holds layers {state.start}..{state.stop - 1} only (a DSV4 payload holds every layer)")
    if problems:
        raise KVFormatError("cannot serialize session state: " + "; ".join(problems[:5]))
    lay, T = state.layout, state.n_tokens
    out = Sink(f, [crc] if crc is not None else [])
    total = payload_bytes(state)

    def fields() -> Iterator[bytes | memoryview]:
        """The payload's fields in file order (one pipelined write); progress after each layer."""
        yield (PayloadHeader.for_state(state).pack() + np.asarray(state.tokens, dtype="<u4").tobytes())
        yield f32_bytes(state.logits)
        yield struct.pack(f"<{2 * lay.n_layer}I", *(lay.n_comp(L, T) for L in range(lay.n_layer)),
                          *(lay.n_idx(L, T) for L in range(lay.n_layer)))
        for ls in state.layers:
            yield from (f32_bytes(arr) for _, arr in ls.tensors() if arr.size)  # e.g. no ratio-128 rows < 128 tok
            if progress is not None:
                progress(out.n, total)

    out.put_many(fields())
    return out.n


# ---- reading --------------------------------------------------------------------------------
def check_payload_header(ph: PayloadHeader, layout: StateLayout, name: str, ctx: int | None = None,
                         prefill_chunk: int | None = None) -> None:
    """ds4's payload header checks against the runtime (``ctx`` None: the saved context)."""
    check(ph.magic == DSV4_MAGIC and ph.version in DSV4_VERSIONS, name,
          f"unsupported session payload: magic {ph.magic:#010x} version {ph.version}, expected "
          f"{DSV4_MAGIC:#010x} ('DSV4') version 2 (or 1, May 2026)")
    want = (layout.n_layer, layout.head_dim, layout.idx_dim, layout.n_vocab)
    got = (ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab)
    check(got == want, name, "payload written for a different layout: layers/head_dim/idx_dim/vocab "
          f"{got}, runtime {want}")
    cur_ctx = ph.ctx if ctx is None else ctx
    cur_chunk = runtime_chunk(ph.prefill_chunk, ctx, prefill_chunk)
    check(ph.ctx <= cur_ctx and ph.tokens < cur_ctx, name,
          f"KV checkpoint does not fit current context: saved ctx {ph.ctx}, tokens {ph.tokens}, current ctx {cur_ctx}")
    check(ph.prefill_chunk == cur_chunk and ph.raw_window == raw_window(layout, cur_ctx), name,
          f"graph chunk layout does not match current runtime: prefill chunk {ph.prefill_chunk} (current "
          f"{cur_chunk}), raw window {ph.raw_window} (current {raw_window(layout, cur_ctx)})")
    cur_raw_cap = raw_cap(layout, cur_ctx, cur_chunk)
    check(ph.raw_cap > 0 and ph.raw_live == min(ph.tokens, ph.raw_window) and ph.raw_live <= ph.raw_cap
          and ph.raw_live <= cur_raw_cap, name,
          f"raw ring layout does not match current context: raw_cap {ph.raw_cap}, raw_live {ph.raw_live}, "
          f"tokens {ph.tokens}, raw window {ph.raw_window}, current raw_cap {cur_raw_cap}")
    check(ph.comp_cap <= comp_cap(cur_ctx), name,
          f"compressed cache is larger than current context: comp_cap {ph.comp_cap} > {comp_cap(cur_ctx)}")
    check(ph.tokens > 0, name, "payload token count is 0")


def check_row_counts(ph: PayloadHeader, layout: StateLayout, n_comp: list[int], n_idx: list[int],
                     name: str, ctx: int | None = None) -> None:
    """Every layer's compressed/indexer row count must be floor(T/ratio) (0 where absent)."""
    cap = min(ph.comp_cap, comp_cap(ph.ctx if ctx is None else ctx))
    for L in range(layout.n_layer):
        want_c, want_i = layout.n_comp(L, ph.tokens), layout.n_idx(L, ph.tokens)
        check(n_comp[L] <= cap and n_idx[L] <= cap, name,
              f"invalid compressed/indexer row count at layer {L}: {n_comp[L]}/{n_idx[L]} > cap {cap}")
        check(n_comp[L] == want_c and n_idx[L] == want_i, name,
              f"invalid compressed/indexer row count at layer {L} (ratio {layout.ratios[L]}): "
              f"{n_comp[L]}/{n_idx[L]}, expected {want_c}/{want_i} for {ph.tokens} tokens")


def payload_tokens(head: bytes) -> int | None:
    """The token count in a DSV4 payload header's first bytes (None: fewer bytes than a
    header, or not a DSV4 header; ``read_payload`` then says what is wrong)."""
    if len(head) < PAYLOAD_HEADER_BYTES:
        return None
    ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(head[:PAYLOAD_HEADER_BYTES]))
    return ph.tokens if ph.magic == DSV4_MAGIC else None


def check_usable(tokens: np.ndarray, logits: np.ndarray, n_vocab: int, name: str) -> None:
    """Refuse a payload no model can continue from: a token id (``tokens``, u32 ``[T]``)
    outside the vocabulary, or next-token ``logits`` (f32 ``[n_vocab]``) that are not all
    finite (a restore would sample garbage, e.g. token 0 from all-NaN logits)."""
    top = int(tokens.max(initial=0))
    check(top < n_vocab, name, f"token ids: id {top} is outside the vocabulary of {n_vocab}: unusable")
    check(bool(np.isfinite(logits).all()), name, "logits: next-token logits are not finite (NaN or inf): unusable")


def read_payload(f: BinaryIO, budget: int, layout: StateLayout, ctx: int | None = None, *,
                 prefill_chunk: int | None = None, name: str = "<payload>", crc: ChunkCRC | None = None,
                 keep: bool = True, progress: Progress | None = None) -> SessionState | None:
    """Read a DSV4 payload of exactly ``budget`` bytes from ``f`` into a new SessionState.

    ``ctx``/``prefill_chunk`` describe the runtime it must fit (None: the saved values);
    the returned state carries the runtime's. ``crc`` (with expected chunks) verifies the
    bytes as they stream. ``keep=False`` validates and reads every byte but keeps no
    tensors (returns None). Raises KVFormatError naming ``name`` and the field.
    """
    src = Source(f, budget, name, [crc] if crc is not None else [], progress)
    ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(src.bytes(PAYLOAD_HEADER_BYTES, "payload header")))
    check_payload_header(ph, layout, name, ctx, prefill_chunk)
    T = ph.tokens
    tokens = src.array((T,), "<u4", "token ids")
    logits = mx.array(np.zeros(layout.n_vocab, dtype=np.float32))
    src.reserve(logits.nbytes, "logits")
    src.fill(memoryview(logits).cast("B"), lambda _: "logits")
    check_usable(tokens, np.asarray(logits), layout.n_vocab, name)
    n_comp = list(struct.unpack(f"<{layout.n_layer}I", src.bytes(4 * layout.n_layer, "compressed row counts")))
    n_idx = list(struct.unpack(f"<{layout.n_layer}I", src.bytes(4 * layout.n_layer, "indexer row counts")))
    check_row_counts(ph, layout, n_comp, n_idx, name, ctx)
    # the layer tensors in file order (row counts checked: floor(T/ratio)), and their offsets in the body
    fields = [(L, fname, shape) for L in range(layout.n_layer)
              for fname, shape in layout.layer_shapes(L, T, ph.raw_live)]
    starts = [0]
    for _, _, (rows, cols) in fields:
        starts.append(starts[-1] + rows * cols * F32)

    def locate(offset: int) -> str:
        i = min(bisect.bisect_right(starts, offset) - 1, len(fields) - 1)
        return f"layer {fields[i][0]} {fields[i][1]}"

    body = starts[-1]
    if body > src.left:
        i = bisect.bisect_right(starts, src.left) - 1  # the first tensor that does not fit
        raise KVFormatError(f"{name}: truncated session payload: {locate(starts[i])} needs "
                            f"{starts[i + 1] - starts[i]} bytes, {src.left - starts[i]} left of payload_bytes")
    check(body == src.left, name, f"KV checkpoint has trailing payload bytes: {src.left - body} after the last tensor")
    src.reserve(body, "layer tensors")
    if not keep:
        src.skip(body, locate)
        return None
    # one MLX float32 array per tensor (mx.array copies, so each owns writable contiguous
    # memory, allocated on this thread: measured 10x cheaper than evaluating mx.zeros on
    # MLX's stream thread), all copied from one zero buffer (its pages faulted in once, not
    # once per tensor: ~40% cheaper than a fresh np.zeros each), then filled in place from
    # the file: no to_mlx copy afterwards
    zeros = np.zeros(max((rows * cols for _, _, (rows, cols) in fields), default=0), dtype=np.float32)
    arrays = [mx.array(zeros[: rows * cols].reshape(rows, cols)) for _, _, (rows, cols) in fields]
    del zeros
    layers = []
    for (L, fname, _), start, arr in zip(fields, starts, arrays):
        if arr.size:
            src.fill(memoryview(arr).cast("B"), lambda o, at=start: locate(at + o))
        if fname == "raw":
            layers.append(LayerState(raw=None))
        setattr(layers[-1], fname, arr)
    return SessionState(layout=layout, ctx=ph.ctx if ctx is None else ctx,
                        prefill_chunk=runtime_chunk(ph.prefill_chunk, ctx, prefill_chunk), tokens=tokens.tolist(),
                        logits=logits, layers=layers)


@dataclass(frozen=True)
class PayloadSummary:
    """The payload header and row counts, read without the tensors."""

    header: PayloadHeader
    n_comp: list[int]
    n_idx: list[int]


def read_payload_summary(f: BinaryIO, header: KVHeader, name: str) -> PayloadSummary:
    """Seek-read the payload header and per-layer row counts of a .kv file."""
    f.seek(header.payload_offset)
    raw = f.read(PAYLOAD_HEADER_BYTES)
    check(len(raw) == PAYLOAD_HEADER_BYTES and header.payload_bytes >= PAYLOAD_HEADER_BYTES, name,
          "truncated session payload: payload header")
    ph = PayloadHeader(*_PAYLOAD_HEADER.unpack(raw))
    check(ph.magic == DSV4_MAGIC and ph.version in DSV4_VERSIONS, name,
          f"unsupported session payload: magic {ph.magic:#010x} version {ph.version}, expected 2 (or 1, May 2026)")
    check(min(ph.n_layer, ph.head_dim, ph.vocab) > 0, name,
          f"payload header: n_layer {ph.n_layer}, head_dim {ph.head_dim}, vocab {ph.vocab}: none may be 0")
    counts_at = PAYLOAD_HEADER_BYTES + 4 * ph.tokens + F32 * ph.vocab
    check(counts_at + 8 * ph.n_layer <= header.payload_bytes, name, "truncated session payload: row counts")
    f.seek(header.payload_offset + counts_at)
    raw = f.read(8 * ph.n_layer)
    check(len(raw) == 8 * ph.n_layer, name, "file ends inside the row counts")
    counts = struct.unpack(f"<{2 * ph.n_layer}I", raw)
    return PayloadSummary(ph, list(counts[: ph.n_layer]), list(counts[ph.n_layer:]))
