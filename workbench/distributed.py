"""Pipeline parallelism over ``mx.distributed``: one session's layers spread over ranks.

Under ``mlx.launch`` every rank calls :func:`load` with the same arguments. Each rank
builds only its range of layers (rank 0 also the token embedding, the last rank the
output head) and gets an ordinary :class:`~workbench.session.Session` whose layer stage
is a :class:`PipelineStage`. Rank 0 *drives*: its program (``workbench run``, an
:class:`~workbench.engine.Engine` with its :class:`~workbench.kv.store.KVStore`, a
notebook) calls the session exactly as in one process. The other ranks *serve*:
:meth:`PipelineStage.serve` follows rank 0's calls until rank 0 closes its session::

    s = distributed.load("model.gguf", ctx=32768)     # every rank; one process: a plain Session
    if s.stage.drives:                                # rank 0
        s.prefill(tokens); out = s.decode(64)         # as in one process
        state = s.snapshot()                          # the whole state, gathered to rank 0
    else:
        s.stage.serve(s)                              # until rank 0's s.close()
    s.close()

What crosses the links. Every call of rank 0 sends a command (6 int64) down the pipeline;
rank r takes it from rank r-1 and passes it to rank r+1 before working on it. Per chunk of
T tokens the command carries the T token ids (int32); rank 0 embeds them into the
hyper-connection streams ``[T, n_hc, n_embd]`` float32, runs its layers, sends the command
and the streams to rank 1, which runs its layers and passes them on; the last rank applies the
output head and, when the chunk ends a call, sends the ``n_vocab`` float32 logits back to
rank 0 (its ring neighbour). So a rank boundary carries ``T * n_hc * n_embd * 4`` bytes per
chunk (64 KiB per token for DeepSeek V4 Flash: 4 streams x 4096 x 4 B), plus 517 KB of
logits per call. Rank 0 does not wait between prefill chunks, so rank 0 runs chunk k+1
while rank 1 runs chunk k; decoding passes through the ranks one after the other.

Interrupted calls. A call of rank 0 that raises (a progress callback, Ctrl-C between
chunks) leaves its state as it was, while the serving ranks may hold a few more chunks of
it; the next call tells them where it continues and they go back to the state after rank
0's last completed call. Commands carry a sequence number, so a transfer cut in the middle
is caught at the next command (DistributedError, "out of step") instead of being read as data.

Checkpoints: each rank holds only its layers' KV (a :class:`~workbench.state.SessionState`
with the rank's layer range). ``snapshot()`` gathers the whole state to rank 0 (the KV of
the later ranks travels back hop by hop, last -> ... -> 0, each rank putting its layers in
front, as raw float32 bits);
``restore()`` scatters one down the same way. The ``.kv`` files of an ``Engine`` are
therefore written on rank 0 by the one-process writer from the gathered state: the same
bytes as one process, on rank 0's disk, with no directory shared between hosts. (Each rank
streaming its section into one shared file would spare the transfer but needs a file every
host can write; the gather costs one copy of the later ranks' KV over the links per save.)

Failures raise :class:`DistributedError`: disagreeing ranks at startup (model, context,
layer ranges: on every rank), a lost peer (the ring reports "connection to a peer was
lost"), and on the serving ranks the error that ended rank 0's program
(``session.close(error)``).
"""

from __future__ import annotations

import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import mlx.core as mx
import numpy as np

from workbench.errors import WorkbenchError
from workbench.kv.shards import check_ranges, parse_ranges, split_layers
from workbench.model.model import Model
from workbench.session import DEFAULT_CTX, ProgressFn, Session
from workbench.session import load as load_session
from workbench.spec.args import ModelArgs
from workbench.spec.statelayout import StateLayout
from workbench.stage import OnLayer
from workbench.state import LayerState, SessionState

# commands rank 0 sends down the pipeline: [op, a, b, c, sequence number, COMMAND_MAGIC] int64
ADVANCE = 1  # a = T tokens, b = first position; c = 1: the chunk ends a call (logits to rank 0)
RESET = 2
GATHER = 3  # a = T: every rank's layers back to rank 0
SCATTER = 4  # a = T, b = 1 when logits follow: a whole state's layers down to their ranks
STOP = 5  # a = length of the UTF-8 error that ended rank 0's program (0: a normal end)
COMMAND_LEN = 6
COMMAND_MAGIC = 0x50345344  # "DS4P": with the sequence number, a serving rank notices a pipeline out of step
OP_NAMES = {ADVANCE: "advance", RESET: "reset", GATHER: "gather", SCATTER: "scatter", STOP: "stop"}


class DistributedError(WorkbenchError):
    """A pipeline step failed on some rank, or the ranks disagree."""


@dataclass
class Traffic:
    """Bytes this rank sent and received: hyper-connection streams (and their messages),
    logits, gathered/scattered KV state, and commands with their token ids.

    Plain counters (their field list matches other dataclasses' in shape only)."""

    hc_sent_bytes: int = 0
    hc_received_bytes: int = 0
    hc_messages: int = 0
    logits_bytes: int = 0
    state_bytes: int = 0
    command_bytes: int = 0


def init_group(backend: str = "any") -> mx.distributed.Group | None:
    """The process group of this launch, or None for a process running alone.

    ``mlx.launch`` sets the group up; ``backend`` is "any" (whatever the launch set up; a
    plain process, or an MLX build without distributed support, runs alone), or "ring",
    "jaccl", "mpi", "nccl" (required)."""
    if not mx.distributed.is_available():
        if backend == "any":
            return None
        raise DistributedError("this MLX build has no distributed support (mx.distributed.is_available() is False)")
    try:
        g = mx.distributed.init(strict=backend != "any", backend=backend)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"cannot start the {backend!r} distributed backend: {err}") from None
    return g if g.size() > 1 else None


def _flat_size(layout: StateLayout, start: int, stop: int, n_tokens: int) -> int:
    """float32 elements of layers ``start..stop-1``'s KV at ``n_tokens`` tokens."""
    return sum(rows * cols for L in range(start, stop) for _, (rows, cols) in layout.layer_shapes(L, n_tokens))


def _flatten(layers: Sequence[LayerState]) -> mx.array:
    """Every tensor of ``layers``, in payload order, as one float32 vector (bits kept)."""
    parts = [mx.reshape(t, (-1,)) for ls in layers for _, t in ls.tensors()]
    return mx.concatenate(parts) if parts else mx.zeros((0,), mx.float32)


def _unflatten(flat: mx.array, layout: StateLayout, start: int, stop: int, n_tokens: int) -> list[LayerState]:
    """Inverse of :func:`_flatten` for layers ``start..stop-1`` at ``n_tokens`` tokens."""
    out, at = [], 0
    for L in range(start, stop):
        fields = {}
        for name, (rows, cols) in layout.layer_shapes(L, n_tokens):
            fields[name] = mx.reshape(flat[at:at + rows * cols], (rows, cols))
            at += rows * cols
        out.append(LayerState(**fields))
    return out


class PipelineStage:
    """One rank of a pipeline: layers ``ranges[rank]`` of the model, the
    :class:`~workbench.stage.LayerStage` of that rank's session.

    Creating it is collective: every rank checks that all ranks run the same model
    dimensions, context, prefill chunk and layer ranges (DistributedError on every rank
    otherwise). Rank 0's stage drives (sends each call down the pipeline); the others run
    calls only inside :meth:`serve`.
    """

    def __init__(self, group: mx.distributed.Group, ranges: Sequence[tuple[int, int]], args: ModelArgs, ctx: int,
                 prefill_chunk: int) -> None:
        check_ranges(ranges, args.n_layer)
        if len(ranges) != group.size():
            raise DistributedError(f"{len(ranges)} layer ranges for {group.size()} ranks")
        self.group, self.rank, self.ranks = group, group.rank(), group.size()
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self.start, self.stop = self.ranges[self.rank]
        self.args, self.layout = args, StateLayout.from_args(args)
        self.drives = self.rank == 0
        self.is_last = self.rank == self.ranks - 1
        self.traffic = Traffic()
        self._serving = False
        self._closed = False
        self._sequence = 0  # commands sent (rank 0) or received (the others)
        self._check_agreement(ctx, prefill_chunk)

    # ---- messages -----------------------------------------------------------------------------
    @contextmanager
    def _comm(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:
            raise DistributedError(f"rank {self.rank}: {what} failed: {err}") from None

    def _send(self, x: mx.array, dst: int, what: str) -> None:
        with self._comm(f"{what} to rank {dst}"):
            mx.eval(mx.distributed.send(x, dst, group=self.group, stream=mx.cpu))

    def _recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int, what: str) -> mx.array:
        with self._comm(f"{what} from rank {src}"):
            x = mx.distributed.recv(shape, dtype, src, group=self.group, stream=mx.cpu)
            mx.eval(x)
        return x

    def _command(self, op: int, a: int = 0, b: int = 0, c: int = 0, payload: mx.array | None = None) -> None:
        """Rank 0: send a command (and its payload) down the pipeline."""
        if self._closed:
            raise DistributedError("the pipeline is closed")
        self._sequence += 1
        self._send(mx.array([op, a, b, c, self._sequence, COMMAND_MAGIC], dtype=mx.int64), 1, OP_NAMES[op])
        if payload is not None and payload.size:
            self._send(payload, 1, f"{OP_NAMES[op]} data")
            self.traffic.command_bytes += payload.nbytes
        self.traffic.command_bytes += 8 * COMMAND_LEN

    def _forward(self, x: mx.array, what: str) -> None:
        """A serving rank: pass a command (part) on to the next rank."""
        if not self.is_last:
            self._send(x, self.rank + 1, what)

    def _next_command(self) -> tuple[list[int], mx.array | None]:
        """A serving rank: the next command and its payload, forwarded down the pipeline."""
        head = self._recv((COMMAND_LEN,), mx.int64, self.rank - 1, "command")
        op, a, b, c, seq, magic = (int(v) for v in head.tolist())
        if magic != COMMAND_MAGIC or seq != self._sequence + 1:
            raise DistributedError(f"rank {self.rank}: the pipeline is out of step (command {seq}, magic {magic:#x}; "
                                   f"expected command {self._sequence + 1}): a transfer was interrupted")
        self._sequence = seq
        self._forward(head, "command")
        payload = None
        size, dtype = {ADVANCE: (a, mx.int32), SCATTER: (a, mx.int32), STOP: (a, mx.uint8)}.get(op, (0, mx.int32))
        if size:
            payload = self._recv((size,), dtype, self.rank - 1, f"{OP_NAMES.get(op, op)} data")
            self._forward(payload, f"{OP_NAMES[op]} data")
        return [op, a, b, c], payload

    def _check_agreement(self, ctx: int, prefill_chunk: int) -> None:
        """All ranks must run the same model dimensions, context, chunk and layer ranges."""
        a = self.args
        row = [a.n_layer, a.n_embd, a.n_hc, a.n_vocab, ctx, prefill_chunk, zlib.crc32(repr(self.ranges).encode()),
               self.start, self.stop]
        with self._comm("startup check"):
            rows = mx.distributed.all_gather(mx.array([row], dtype=mx.int64), group=self.group, stream=mx.cpu)
            mx.eval(rows)
        rows = np.array(rows)
        if not (rows[:, :7] == rows[0, :7]).all():
            raise DistributedError("ranks disagree on the model (layers, widths, vocab), ctx, prefill chunk or "
                                   f"layer ranges: {rows[:, :7].tolist()}")
        if [tuple(r) for r in rows[:, 7:].tolist()] != self.ranges:
            raise DistributedError(f"ranks hold layers {rows[:, 7:].tolist()}, expected {self.ranges}")

    # ---- the stage --------------------------------------------------------------------------------
    def empty(self, layout: StateLayout, ctx: int, prefill_chunk: int) -> SessionState:
        return SessionState.empty(layout, ctx, prefill_chunk, self.start, self.stop)

    def advance(self, model: Model, tokens: list[int], p0: int, layers: list[LayerState], on_layer: OnLayer | None,
                logits: bool) -> tuple[mx.array | None, list[LayerState]]:
        """Receive (or embed) the streams of one chunk, run this rank's layers, send them on
        (or apply the head). Rank 0 sends the command just before its streams (so an
        exception in ``on_layer`` leaves the other ranks untouched); it gets the logits back."""
        if not self.drives and not self._serving:
            raise DistributedError(f"rank {self.rank} runs rank 0's calls only: call session.stage.serve(session)")
        T = len(tokens)
        if self.drives:
            x = model.embed(tokens)
        else:
            x = self._recv((T, self.args.n_hc, self.args.n_embd), mx.float32, self.rank - 1,
                           f"streams of positions {p0}..{p0 + T - 1}")
            self.traffic.hc_received_bytes += x.nbytes
            self.traffic.hc_messages += 1
        x, layers = model.run_layers(x, tokens, p0, layers, on_layer)
        if self.drives:
            self._command(ADVANCE, T, p0, int(logits), mx.array(np.asarray(tokens, dtype=np.int32)))
        out = None
        if not self.is_last:
            self._send(x, self.rank + 1, f"streams of positions {p0}..{p0 + T - 1}")
            self.traffic.hc_sent_bytes += x.nbytes
            self.traffic.hc_messages += 1
        elif logits:
            out = model.logits(x[-1:])[0]
            mx.eval(out)
            self._send(out, 0, "logits")
            self.traffic.logits_bytes += out.nbytes
        if self.drives and logits:
            out = self._recv((self.args.n_vocab,), mx.float32, self.ranks - 1, "logits")
            self.traffic.logits_bytes += out.nbytes
        return out, layers

    def gather(self, state: SessionState) -> SessionState:
        """Rank 0: the whole state, its own layers joined with every other rank's."""
        self._require_driver("snapshot")
        T = state.n_tokens
        self._command(GATHER, T)
        rest = self._recv((_flat_size(self.layout, self.stop, self.layout.n_layer, T),), mx.float32, 1, "KV state")
        self.traffic.state_bytes += rest.nbytes
        layers = [replace(ls) for ls in state.layers]
        layers += _unflatten(rest, self.layout, self.stop, self.layout.n_layer, T)
        return SessionState(layout=state.layout, ctx=state.ctx, prefill_chunk=state.prefill_chunk,
                            tokens=list(state.tokens), logits=state.logits, layers=layers)

    def scatter(self, state: SessionState) -> SessionState:
        """Rank 0: send every other rank its layers of ``state`` (and the last its logits);
        return rank 0's part."""
        self._require_driver("restore")
        T, has_logits = state.n_tokens, state.logits is not None
        self._command(SCATTER, T, int(has_logits), payload=mx.array(np.asarray(state.tokens, dtype=np.int32)))
        data = _flatten(state.layers[self.stop:])
        if has_logits:
            data = mx.concatenate([data, state.logits.astype(mx.float32)])
        self._send(data, 1, "KV state")
        self.traffic.state_bytes += data.nbytes
        return replace(state.layer_slice(self.start, self.stop), logits=state.logits)  # rank 0 keeps the logits

    def reset(self) -> None:
        if self.drives:
            self._command(RESET)

    def close(self, error: str = "") -> None:
        """Rank 0: end :meth:`serve` on the other ranks (they raise ``error`` when given).
        When rank 0 stops on an error and the pipeline is broken too, that error is kept
        (no second one is raised)."""
        if self.drives and not self._closed:
            msg = error.encode("utf-8", errors="replace")
            try:
                self._command(STOP, len(msg), payload=mx.array(np.frombuffer(msg, dtype=np.uint8)) if msg else None)
            except DistributedError:
                if not error:
                    raise
            finally:
                self._closed = True
        self._closed = True

    def _require_driver(self, what: str) -> None:
        if not self.drives:
            raise DistributedError(f"{what} is called on rank 0 only (rank {self.rank} serves)")

    # ---- serving ------------------------------------------------------------------------------------
    def serve(self, session: Session) -> None:
        """A rank other than 0: run rank 0's calls on this rank's part of ``session`` until
        rank 0 closes its session. Raises DistributedError when rank 0 ended on an error
        or a peer is lost."""
        self._require_server()
        done = session.state  # the state after rank 0's last completed call
        self._serving = True
        try:
            while True:
                (op, a, b, c), payload = self._next_command()
                if op == ADVANCE:
                    st = session.state
                    if b != st.n_tokens and b == done.n_tokens:
                        st = done  # rank 0 dropped an interrupted call: continue from before it
                    if b != st.n_tokens:
                        raise DistributedError(f"rank {self.rank}: asked to continue at position {b}, "
                                               f"but holds {st.n_tokens} tokens")
                    assert payload is not None
                    session.state = session.advanced(st, payload.tolist(), logits=bool(c))
                    if c:
                        done = session.state
                elif op == RESET:
                    session.reset()
                    done = session.state
                elif op == GATHER:
                    self._serve_gather(session.state)
                elif op == SCATTER:
                    session.state = done = self._serve_scatter(session.state, [] if payload is None else
                                                               payload.tolist(), bool(b))
                elif op == STOP:
                    self._closed = True
                    if a:
                        raise DistributedError("rank 0 stopped on an error: "
                                               + bytes(np.array(payload)).decode("utf-8", errors="replace"))
                    return
                else:
                    raise DistributedError(f"rank {self.rank}: unknown command {op} from rank {self.rank - 1}")
        finally:
            self._serving = False

    def _require_server(self) -> None:
        if self.drives:
            raise DistributedError("rank 0 drives the pipeline; the other ranks serve")

    def _serve_gather(self, state: SessionState) -> None:
        mine = _flatten(state.layers)
        if not self.is_last:
            n = _flat_size(self.layout, self.ranges[self.rank + 1][0], self.layout.n_layer, state.n_tokens)
            rest = self._recv((n,), mx.float32, self.rank + 1, "KV state")
            mine = mx.concatenate([mine, rest])
        self._send(mine, self.rank - 1, "KV state")
        self.traffic.state_bytes += mine.nbytes

    def _serve_scatter(self, state: SessionState, tokens: list[int], has_logits: bool) -> SessionState:
        T, lay = len(tokens), self.layout
        n = _flat_size(lay, self.start, lay.n_layer, T) + (lay.n_vocab if has_logits else 0)
        data = self._recv((n,), mx.float32, self.rank - 1, "KV state")
        self.traffic.state_bytes += data.nbytes
        own = _flat_size(lay, self.start, self.stop, T)
        if not self.is_last:
            self._send(data[own:], self.rank + 1, "KV state")
        logits = data[-lay.n_vocab:] if has_logits and self.is_last else None
        return SessionState(layout=lay, ctx=state.ctx, prefill_chunk=state.prefill_chunk, tokens=tokens, logits=logits,
                            layers=_unflatten(data[:own], lay, self.start, self.stop, T), start=self.start,
                            stop=self.stop)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the layer range of every rank (inclusive) and this rank's traffic."""
        return {"layers": [[a, b - 1] for a, b in self.ranges], "traffic": vars(self.traffic)}


def rank_weight_bytes(tensor_bytes: Mapping[str, int], n_layer: int,
                      ranges: Sequence[tuple[int, int]]) -> list[int]:
    """GGUF bytes each rank maps, from ``{tensor name: bytes}``: its layers' ``blk.L.*``
    tensors, plus ``token_embd.*`` on the first rank and the other top-level tensors (the
    output head, its norm and hyper-connection mixer) on the last."""
    check_ranges(ranges, n_layer)
    owner = {L: r for r, (a, b) in enumerate(ranges) for L in range(a, b)}
    out = [0] * len(ranges)
    for name, nbytes in tensor_bytes.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            out[owner[int(m.group(1))]] += nbytes
        else:
            out[0 if name.startswith("token_embd.") else -1] += nbytes
    return out


def load(path: str, ctx: int = DEFAULT_CTX, *, group: mx.distributed.Group | None = None,
         ranges: Sequence[tuple[int, int]] | str | None = None, backend: str = "any",
         progress: ProgressFn | None = None) -> Session:
    """Open a ds4 GGUF on this rank (every rank calls it) and return this rank's session.

    ``group`` defaults to :func:`init_group` (``backend``); a process running alone gets
    the plain one-process session of :func:`workbench.session.load`. ``ranges`` (half-open,
    one per rank, or inclusive as text: "0-21,22-42") default to
    :func:`~workbench.kv.shards.split_layers`. ``progress``
    receives ``Progress("load", layers_done, layers_of_this_rank, elapsed_s)``.
    """
    g = init_group(backend) if group is None else group
    if g is None or g.size() == 1:
        return load_session(path, ctx, progress)

    def stage(args: ModelArgs, ctx: int, prefill_chunk: int) -> PipelineStage:
        if ranges is None:
            rs = split_layers(args.n_layer, g.size())
        else:
            rs = parse_ranges(ranges, args.n_layer) if isinstance(ranges, str) else [tuple(r) for r in ranges]
        return PipelineStage(g, rs, args, ctx, prefill_chunk)

    return load_session(path, ctx, progress, stage=stage)


__all__ = ["PipelineStage", "DistributedError", "Traffic", "init_group", "load", "rank_weight_bytes"]
