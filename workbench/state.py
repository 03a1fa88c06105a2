"""The plain per-session state: what a checkpoint holds.

No model code lives here, so ``workbench.kv`` can save, load, size and break down a
state without loading weights. Arrays are MLX arrays (float32 for KV rows and frontiers);
anything with the buffer protocol (NumPy) is accepted where a state is built from disk.
Which tensors each layer holds and their shapes at T tokens come from
:class:`~workbench.spec.statelayout.StateLayout` (see that module for ds4's terms and the
frontier slot rules below).

Frontier slot rules (ds4): ratio 128 puts token p in slot ``p % 128``; ratio 4 keeps the
previous complete window in slots 0..3 and the current partial one in slots 4..7 (token p
in slot ``4 + p % 4``), copying 4..7 to 0..3 when a window completes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from workbench.errors import WorkbenchError
from workbench.spec.statelayout import F32, KIND_OF, LAYER_FIELDS, SCORE_FIELDS, StateLayout

EMPTY_SCORE = -1e30  # score of an empty frontier slot (ds4's -inf stand-in)
ROW_STEP = 256  # a row buffer's capacity is a multiple of this many rows
ROW_GROWTH = 1.25  # a new row buffer holds this many times the rows it starts with (then rounds up)


class RowBuffer:
    """Append-only float32 rows ``[capacity, width]`` that successive states of one layer
    share, so that a token adds its compressed or indexer rows without copying the rows
    before it (as mlx-lm's KV caches grow).

    Rows ``0..filled-1`` are written once and never change afterwards, so every state
    holding a view ``data[:n]`` (n <= filled) keeps seeing its rows. Only the array last
    handed out by :meth:`append` (the view of all ``filled`` rows) extends in place; an
    older view (a snapshot continued, a prefill retried after a cancel) gets a new buffer
    holding a copy of its rows, as does any append that does not fit the capacity (which
    then grows by ``ROW_GROWTH``, rounded up to ``ROW_STEP`` rows: amortised O(1) per row).
    """

    def __init__(self, rows: mx.array, new: mx.array) -> None:
        n, k = rows.shape[0], new.shape[0]
        capacity = -(-int((n + k) * ROW_GROWTH) // ROW_STEP) * ROW_STEP
        pad = mx.zeros((capacity - n - k, rows.shape[1]), mx.float32)
        self.data = mx.concatenate([rows.astype(mx.float32), new.astype(mx.float32), pad])  # [capacity, width]
        mx.eval(self.data)
        self.filled = n + k
        self.tip = self.data[: self.filled]
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return int(self.data.shape[0])

    def _extend(self, rows: mx.array, new: mx.array) -> bool:
        """Write ``new`` after ``rows`` in place when ``rows`` is the tip and they fit."""
        n, k = rows.shape[0], new.shape[0]
        with self._lock:
            if rows is not self.tip or n + k > self.capacity:
                return False
            mx.eval(new)
            dst = np.frombuffer(memoryview(self.data), dtype=np.float32).reshape(self.data.shape)
            dst[n : n + k] = np.asarray(new, dtype=np.float32)  # rows 0..n-1 untouched: older views stay valid
            self.filled = n + k
            self.tip = self.data[: self.filled]
            return True

    @staticmethod
    def append(rows: mx.array, buffer: "RowBuffer | None", new: mx.array) -> tuple[mx.array, "RowBuffer | None"]:
        """``rows`` ``[n, width]`` followed by ``new`` ``[k, width]`` as ``([n + k, width],
        the buffer holding them)``; ``buffer`` is the one ``rows`` came from (None: none).
        Appending no rows returns the inputs unchanged (no copy)."""
        if new.shape[0] == 0:
            return rows, buffer
        if buffer is None or not buffer._extend(rows, new):
            buffer = RowBuffer(rows, new)
        return buffer.tip, buffer


@dataclass
class LayerState:
    """One layer's KV state; fields absent for the layer's ratio are None.

    ``comp_rows``/``idx_rows`` are the :class:`RowBuffer` behind ``comp``/``idx`` when
    the model grew them (None otherwise): memory management only, never serialised,
    shapes and values are those of ``comp``/``idx``.
    """

    raw: Any
    comp: Any = None
    comp_kv: Any = None
    comp_score: Any = None
    idx: Any = None
    idx_kv: Any = None
    idx_score: Any = None
    comp_rows: RowBuffer | None = field(default=None, repr=False, compare=False)
    idx_rows: RowBuffer | None = field(default=None, repr=False, compare=False)

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """(kind, array) in ds4's payload order, skipping absent fields."""
        for name in LAYER_FIELDS:
            value = getattr(self, name)
            if value is not None:
                yield name, value


def as_mlx(a: Any) -> Any:
    """``a`` as an MLX float32 array (None and MLX arrays pass through unchanged)."""
    return a if a is None or isinstance(a, mx.array) else mx.array(a, dtype=mx.float32)


def layers_to_mlx(layers: list[LayerState]) -> list[LayerState]:
    """New LayerStates whose arrays are all MLX float32 (row buffers kept)."""
    return [replace(ls, **{name: as_mlx(getattr(ls, name)) for name in LAYER_FIELDS}) for ls in layers]


class StateError(WorkbenchError):
    """A layer range or a set of layer-range states that cannot be taken or joined."""


@dataclass
class SessionState:
    """Everything needed to continue a session: tokens, next-token logits, per-layer KV.

    A state may hold only layers ``start..stop-1`` (a pipeline rank's range): ``layers``
    then has ``stop - start`` entries, shaped as the whole state's, and ``logits`` are
    required only when the range holds the last layer (optional, same shape, elsewhere).
    A whole state has ``start == 0`` and ``stop == layout.n_layer`` (the defaults).
    """

    layout: StateLayout
    ctx: int  # context limit the session was created with
    prefill_chunk: int  # chunk size of the prefill schedule (ds4: min(ctx, 2048))
    tokens: list[int] = field(default_factory=list)
    logits: Any = None  # [n_vocab] float32 after the last token, None when empty
    layers: list[LayerState] = field(default_factory=list)
    start: int = 0  # first layer held
    stop: int | None = None  # one past the last layer held (None: layout.n_layer; an int after init)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = self.layout.n_layer

    @classmethod
    def empty(cls, layout: StateLayout, ctx: int, prefill_chunk: int | None = None, start: int = 0,
              stop: int | None = None) -> "SessionState":
        """No tokens: empty rows, empty frontiers, for layers ``start..stop-1`` (default all)."""
        chunk = prefill_chunk if prefill_chunk is not None else min(ctx, 2048)
        stop = layout.n_layer if stop is None else stop
        _check_range(layout, start, stop)
        layers = []
        for L in range(start, stop):
            ls = LayerState(raw=None)
            for name, shape in layout.layer_shapes(L, 0):
                setattr(ls, name, mx.full(shape, EMPTY_SCORE, mx.float32) if name in SCORE_FIELDS
                        else mx.zeros(shape, mx.float32))
            layers.append(ls)
        return cls(layout=layout, ctx=ctx, prefill_chunk=chunk, layers=layers, start=start, stop=stop)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def is_whole(self) -> bool:
        """True when every layer of the model is held."""
        return self.start == 0 and self.stop == self.layout.n_layer

    @property
    def has_last_layer(self) -> bool:
        return self.stop == self.layout.n_layer

    def layer_slice(self, start: int, stop: int) -> "SessionState":
        """Layers ``start..stop-1`` (absolute numbers, within this state's range) as a
        state of their own; the logits go with the last layer only. Arrays are shared."""
        if not self.start <= start < stop <= self.stop:
            raise StateError(f"layer range {start}..{stop - 1} outside the state's layers "
                             f"{self.start}..{self.stop - 1}")
        return replace(self, tokens=list(self.tokens), logits=self.logits if stop == self.layout.n_layer else None,
                       layers=[replace(ls) for ls in self.layers[start - self.start:stop - self.start]],
                       start=start, stop=stop)

    def copy(self) -> "SessionState":
        """An independent copy (MLX arrays are immutable, so sharing them is safe)."""
        return replace(self, tokens=list(self.tokens), layers=[replace(ls) for ls in self.layers])

    def to_mlx(self) -> "SessionState":
        """A copy whose arrays are all MLX float32 (states read from disk hold NumPy views)."""
        return replace(self, tokens=list(self.tokens), logits=as_mlx(self.logits), layers=layers_to_mlx(self.layers))

    def problems(self) -> list[str]:
        """Shape inconsistencies against the layout, layer range and token count (empty when valid)."""
        lay, T, out = self.layout, self.n_tokens, []
        if not 0 <= self.start < self.stop <= lay.n_layer:
            return [f"layer range {self.start}..{self.stop - 1} outside 0..{lay.n_layer - 1}"]
        if len(self.layers) != self.stop - self.start:
            return [f"{len(self.layers)} layers, layout has {lay.n_layer}" if self.is_whole else
                    f"{len(self.layers)} layers for range {self.start}..{self.stop - 1}"]
        logits_shape = None if self.logits is None else tuple(self.logits.shape)
        if (T and self.has_last_layer and logits_shape is None) or logits_shape not in (None, (lay.n_vocab,)):
            out.append(f"logits shape {logits_shape}, expected ({lay.n_vocab},)")
        for L, ls in zip(range(self.start, self.stop), self.layers):
            want = dict(lay.layer_shapes(L, T))
            for name in LAYER_FIELDS:
                value = getattr(ls, name)
                if name not in want:
                    if value is not None:
                        out.append(f"layer {L}: unexpected {name} for ratio {lay.ratios[L]}")
                elif value is None or tuple(value.shape) != want[name]:
                    got = None if value is None else tuple(value.shape)
                    out.append(f"layer {L}: {name} shape {got}, expected {want[name]}")
        return out

    def layer_bytes(self) -> list[dict]:
        """Per-layer, per-kind float32 bytes of the KV payload (rows: layer, kind, bytes)."""
        rows = []
        for L, ls in zip(range(self.start, self.stop), self.layers):
            per: dict[str, int] = {}
            for name, arr in ls.tensors():
                kind = KIND_OF[name]
                per[kind] = per.get(kind, 0) + int(arr.size) * F32
            rows.extend({"layer": L, "ratio": self.layout.ratios[L], "kind": k, "bytes": b} for k, b in per.items())
        return rows


def _check_range(layout: StateLayout, start: int, stop: int) -> None:
    if not 0 <= start < stop <= layout.n_layer:
        raise StateError(f"layer range {start}..{stop - 1} outside 0..{layout.n_layer - 1}")


def join(parts: Sequence[SessionState]) -> SessionState:
    """One whole state from layer-range states covering every layer once (in any order);
    they must agree on layout, context, prefill chunk and tokens. Arrays are shared."""
    if not parts:
        raise StateError("no layer-range states to join")
    parts = sorted(parts, key=lambda p: p.start)
    first = parts[0]
    at = 0
    for p in parts:
        if p.start != at or p.stop <= p.start:
            raise StateError(f"layer ranges {[(q.start, q.stop) for q in parts]} must be non-empty, contiguous "
                             "and start at 0")
        at = p.stop
    if at != first.layout.n_layer:
        raise StateError(f"layer ranges cover layers 0..{at - 1}, the model has {first.layout.n_layer}")
    for p in parts[1:]:
        if (p.layout, p.ctx, p.prefill_chunk, p.tokens) != (first.layout, first.ctx, first.prefill_chunk, first.tokens):
            raise StateError(f"layer-range states disagree: layers {p.start}..{p.stop - 1} have a different layout, "
                             "context, prefill chunk or token list than layers "
                             f"{first.start}..{first.stop - 1}")
    return SessionState(layout=first.layout, ctx=first.ctx, prefill_chunk=first.prefill_chunk,
                        tokens=list(first.tokens), logits=parts[-1].logits,
                        layers=[ls for p in parts for ls in p.layers])


def random_state(layout: StateLayout, n_tokens: int, ctx: int, seed: int = 0,
                 prefill_chunk: int | None = None) -> SessionState:
    """A valid state of ``n_tokens`` random tokens with standard-normal float32 KV rows,
    frontiers and logits (NumPy arrays, shapes from ``layout.layer_shapes``), for
    benchmarks, tests and notebooks that exercise the KV format without a model."""
    rng = np.random.default_rng(seed)
    layers = []
    for L in range(layout.n_layer):
        ls = LayerState(raw=None)
        for name, shape in layout.layer_shapes(L, n_tokens):
            setattr(ls, name, rng.standard_normal(shape, dtype=np.float32))
        layers.append(ls)
    tokens = rng.integers(0, layout.n_vocab, n_tokens).tolist()
    chunk = min(ctx, 2048) if prefill_chunk is None else prefill_chunk
    logits = rng.standard_normal(layout.n_vocab, dtype=np.float32)
    return SessionState(layout=layout, ctx=ctx, prefill_chunk=chunk, tokens=tokens, logits=logits, layers=layers)
