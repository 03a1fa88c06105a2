"""Pipeline-parallel inference over ``mx.distributed``: each rank runs a range of layers.

Every rank runs the same program (SPMD, started by ``mlx.launch``) with the same calls::

    s = load("model.gguf", ctx=32768)              # rank r maps only layers ranges[r]
    s.prefill(tokens)                              # same tokens on every rank
    out = s.decode(64, Sampler(temperature=0))     # same output on every rank
    s.save_checkpoint("ckpt/", text)               # one DSVL shard per rank + manifest
    s.restore_checkpoint("ckpt/")                  # any earlier layout of ranks

Per chunk of T tokens, rank 0 embeds them into the hyper-connection streams
``[T, n_hc, n_embd]`` float32, runs its layers and sends the streams to rank 1
(``mx.distributed.send``/``recv``), which runs its layers and passes them on; the last
rank applies the output head. So every layer boundary between ranks carries
``T * n_hc * n_embd * 4`` bytes per chunk (64 KiB per token for DeepSeek V4 Flash:
4 streams x 4096 x 4 B; 128 MiB per 2048-token prefill chunk), plus, per call, a
``n_vocab * 4``-byte logits broadcast when ``logits_on="all"`` and a 4-byte token
broadcast per decoded token. Ranks overlap on consecutive prefill chunks (rank 0 starts
chunk k+1 while rank 1 runs chunk k); decoding is sequential through the ranks.

A rank builds only its own layers from the GGUF (plus the token embedding on the first
rank and the output head on the last) and holds only those layers' KV state (a
:class:`~workbench.state.SessionState` with this rank's layer range). Collective steps
(checkpoint barriers, token and logits broadcasts, consistency checks) raise :class:`DistributedError` on every rank
together, so no rank continues alone; a lost peer raises it too (the ring backend reports
"connection to a peer was lost").
"""

from __future__ import annotations

import os
import re
import secrets
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import mlx.core as mx
import numpy as np

from workbench.errors import WorkbenchError
from workbench.gguf.layout import routed_quant_bits, validate_ds4
from workbench.gguf.reader import GGUFFile
from workbench.kv.format import SaveReason
from workbench.kv.shards import (
    Manifest, ShardEntry, ShardError, check_ranges, load_range, make_manifest, publish_manifest,
    read_manifest, remove_unreferenced, shard_name, split_layers, write_shard_file,
)
from workbench.model.config import ModelArgs
from workbench.model.model import HCWeights, Model
from workbench.model.weights import Tensors, build_block
from workbench.sampling import greedy
from workbench.session import (
    DEFAULT_CTX, MAX_PREFILL_CHUNK, ModelFileError, PrefillStats, Progress, ProgressFn, SessionError, chunk_schedule,
)
from workbench.state import SessionState, StateLayout

LogitsOn = Literal["all", "last"]
TMP_RE = re.compile(r"\.tmp\.(\d+)$")


class DistributedError(WorkbenchError):
    """A collective step failed on some rank, or the ranks disagree (raised on every rank)."""


@dataclass
class Traffic:
    """What this rank exchanged: hyper-connection streams (point to point) and the
    payload it put into collectives (broadcasts, barriers, checks)."""

    hc_sent_bytes: int = 0
    hc_received_bytes: int = 0
    hc_messages: int = 0
    collective_bytes: int = 0


@dataclass(frozen=True)
class CheckpointSaved:
    """One collective checkpoint save, as seen by one rank."""

    manifest: Path
    save_id: str
    bytes: int  # all shards
    shard_bytes: int  # this rank's shard
    seconds: float


def init_group(backend: str = "any") -> mx.distributed.Group:
    """The process group of this launch (``mlx.launch`` sets it up; a plain process gets a
    group of one). ``backend``: "any", "ring", "jaccl", "mpi" or "nccl"."""
    if not mx.distributed.is_available():
        raise DistributedError("this MLX build has no distributed support (mx.distributed.is_available() is False)")
    try:
        return mx.distributed.init(strict=backend != "any", backend=backend)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"cannot start the {backend!r} distributed backend: {err}") from None


def _crc_tokens(tokens: Sequence[int]) -> int:
    return zlib.crc32(np.asarray(tokens, dtype="<u4").tobytes())


def _sweep_dead_tmp(directory: Path) -> None:
    """Remove ``*.tmp.<pid>`` files of processes no longer alive on this host."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for n in names:
        m = TMP_RE.search(n)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            (directory / n).unlink(missing_ok=True)
        except (PermissionError, OverflowError, OSError):
            pass


class DistributedSession:
    """One rank's part of a pipeline-parallel session (mirrors :class:`~workbench.session.Session`).

    ``model`` holds only this rank's blocks (layers ``ranges[rank]``); its ``embedding``
    is set on the first rank and its output head on the last (None elsewhere). ``state``
    is this rank's :class:`SessionState` (layers ``ranges[rank]``), replaced (never mutated) by each call.
    ``logits_on="all"`` broadcasts next-token logits to every rank; ``"last"`` keeps them on
    the last rank only (``logits`` is None elsewhere; decoding still works, the sampled
    token is broadcast).
    """

    def __init__(self, model: Model, group: mx.distributed.Group, ranges: Sequence[tuple[int, int]], ctx: int,
                 logits_on: LogitsOn = "all", path: str | None = None, file: GGUFFile | None = None,
                 quant_bits: int = 2) -> None:
        args = model.args
        if logits_on not in ("all", "last"):
            raise DistributedError(f"logits_on must be 'all' or 'last', got {logits_on!r}")
        if not 1 <= ctx <= args.context_length:
            raise SessionError(f"ctx {ctx} outside 1..{args.context_length} (the model's context length)")
        check_ranges(ranges, args.n_layer)
        if len(ranges) != group.size():
            raise DistributedError(f"{len(ranges)} layer ranges for {group.size()} ranks")
        self.model, self.args, self.group, self.ctx = model, args, group, ctx
        self.rank, self.size = group.rank(), group.size()
        self.ranges = [tuple(r) for r in ranges]
        self.start, self.stop = self.ranges[self.rank]
        if len(model.blocks) != self.stop - self.start:
            raise DistributedError(f"rank {self.rank}: {len(model.blocks)} blocks for layers "
                                   f"{self.start}..{self.stop - 1}")
        self.logits_on, self.path, self._file, self.quant_bits = logits_on, path, file, quant_bits
        self.layout = StateLayout.from_args(args)
        self.traffic = Traffic()
        self.state = SessionState.empty(self.layout, ctx, min(ctx, MAX_PREFILL_CHUNK), self.start, self.stop)
        self._check_agreement()

    # ---- roles and state -----------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.args.n_layer

    @property
    def last_rank(self) -> int:
        return self.size - 1

    @property
    def tokens(self) -> list[int]:
        return list(self.state.tokens)

    @property
    def n_tokens(self) -> int:
        return self.state.n_tokens

    @property
    def logits(self) -> mx.array | None:
        """Next-token logits ``[n_vocab]`` float32 (None before any token, and on all but
        the last rank when ``logits_on="last"``)."""
        return self.state.logits

    @property
    def file(self) -> GGUFFile | None:
        return self._file

    def hc_bytes_per_token(self) -> int:
        """Bytes of hyper-connection state one token carries across one rank boundary."""
        return self.args.n_hc * self.args.n_embd * 4

    def reset(self) -> None:
        """Forget every token (local; every rank calls it)."""
        self.state = SessionState.empty(self.layout, self.ctx, self.state.prefill_chunk, self.start, self.stop)

    def snapshot(self) -> SessionState:
        """An independent in-memory copy of this rank's state."""
        return self.state.copy()

    def restore(self, state: SessionState) -> None:
        """Continue from this rank's ``state`` (a :meth:`snapshot`); every rank calls it, and
        all ranks must restore the same tokens (checked collectively)."""
        err = ""
        if state.layout != self.layout or (state.start, state.stop) != (self.start, self.stop):
            err = (f"rank {self.rank}: state of layers {state.start}..{state.stop - 1} does not fit this rank's "
                   f"layers {self.start}..{self.stop - 1} of this model")
        elif state.n_tokens > self.ctx:
            err = f"rank {self.rank}: state holds {state.n_tokens} tokens, more than ctx {self.ctx}"
        elif state.problems():
            err = f"rank {self.rank}: inconsistent state: " + "; ".join(state.problems()[:5])
        self._agree(err, "restore", state.tokens)
        self.state = state.to_mlx()

    def close(self) -> None:
        """Release the GGUF mapping (the session is unusable afterwards)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- collectives ----------------------------------------------------------------------
    @contextmanager
    def _comm(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:
            raise DistributedError(f"rank {self.rank}: {what} failed: {err}") from None

    def _gather(self, row: Sequence[int], what: str) -> np.ndarray:
        """Every rank's int64 ``row`` → ``[size, len(row)]`` (identical on every rank)."""
        local = mx.array(np.asarray([row], dtype=np.int64))
        if self.size == 1:
            return np.array(local)
        with self._comm(what):
            out = mx.distributed.all_gather(local, group=self.group, stream=mx.cpu)
            mx.eval(out)
        self.traffic.collective_bytes += 8 * len(row)
        return np.array(out)

    def _broadcast(self, value: mx.array | None, shape: tuple[int, ...], dtype: mx.Dtype, root: int,
                   what: str) -> mx.array:
        """``value`` of rank ``root`` on every rank (an all-sum with zeros elsewhere: exact)."""
        if self.size == 1:
            return value
        x = value if self.rank == root else mx.zeros(shape, dtype)
        with self._comm(what):
            out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
            mx.eval(out)
        self.traffic.collective_bytes += int(np.prod(shape)) * dtype.size
        return out

    def _broadcast_logits(self, logits: mx.array | None) -> mx.array:
        return self._broadcast(logits, (self.args.n_vocab,), mx.float32, self.last_rank, "logits broadcast")

    def _agree(self, error: str | WorkbenchError | None, what: str, tokens: Sequence[int] | None = None) -> None:
        """Barrier: raise on every rank when any rank reports an ``error`` (a rank re-raises
        its own exception, the others DistributedError) or the ranks' token lists (length and
        CRC) differ."""
        toks = [] if tokens is None else list(tokens)
        rows = self._gather([0 if error else 1, len(toks), _crc_tokens(toks)], what)
        failed = [r for r in range(self.size) if rows[r, 0] == 0]
        if isinstance(error, WorkbenchError):
            raise error
        if failed:
            raise DistributedError(f"{what} failed on rank(s) {failed}" + (f": {error}" if error else ""))
        if tokens is not None and not (rows[:, 1:] == rows[0, 1:]).all():
            raise DistributedError(f"{what}: ranks hold different tokens (counts {rows[:, 1].tolist()})")

    def _check_agreement(self) -> None:
        """All ranks must run the same model dimensions, context and layer ranges."""
        a = self.args
        row = [a.n_layer, a.n_embd, a.n_hc, a.n_vocab, self.ctx, self.state.prefill_chunk,
               zlib.crc32(repr(self.ranges).encode()), self.start, self.stop]
        rows = self._gather(row, "startup check")
        if not (rows[:, :7] == rows[0, :7]).all():
            raise DistributedError("ranks disagree on the model (layers, widths, vocab), ctx, prefill chunk or "
                                   f"layer ranges: {rows[:, :7].tolist()}")
        if [tuple(r) for r in rows[:, 7:].tolist()] != self.ranges:
            raise DistributedError(f"ranks hold layers {rows[:, 7:].tolist()}, expected {self.ranges}")

    # ---- running ------------------------------------------------------------------------------
    def _token_problem(self, tokens: list[int]) -> SessionError | None:
        """Why ``tokens`` cannot be appended (None when they can)."""
        bad = [t for t in tokens if not 0 <= t < self.args.n_vocab]
        if bad:
            return SessionError(f"token ids outside the vocabulary of {self.args.n_vocab}: {bad[:5]}")
        if self.n_tokens + len(tokens) > self.ctx:
            return SessionError(f"context full: {self.n_tokens} tokens + {len(tokens)} new > ctx {self.ctx}")
        return None

    def _advance(self, st: SessionState, tokens: list[int], want_logits: bool,
                 on_layer: Callable[[int], None] | None = None) -> SessionState:
        """``st`` extended by one chunk: receive (or embed) the streams, run this rank's
        layers, send them on (or apply the head when ``want_logits``)."""
        T, p0 = len(tokens), st.n_tokens
        shape = (T, self.args.n_hc, self.args.n_embd)
        if self.is_first:
            x = self.model.embed(tokens)
        else:
            with self._comm(f"receiving streams for positions {p0}..{p0 + T - 1} from rank {self.rank - 1}"):
                x = mx.distributed.recv(shape, mx.float32, self.rank - 1, group=self.group, stream=mx.cpu)
                mx.eval(x)
            self.traffic.hc_received_bytes += x.nbytes
            self.traffic.hc_messages += 1
        x, layers = self.model.run_layers(x, tokens, p0, st.layers, on_layer)
        logits = None
        if not self.is_last:
            with self._comm(f"sending streams for positions {p0}..{p0 + T - 1} to rank {self.rank + 1}"):
                mx.eval(mx.distributed.send(x, self.rank + 1, group=self.group, stream=mx.cpu))
            self.traffic.hc_sent_bytes += x.nbytes
            self.traffic.hc_messages += 1
        elif want_logits:
            logits = self.model.logits(x[-1:])[0]
            mx.eval(logits)
        return SessionState(layout=self.layout, ctx=st.ctx, prefill_chunk=st.prefill_chunk,
                            tokens=st.tokens + list(tokens), logits=logits, layers=layers, start=self.start, stop=self.stop)

    def prefill(self, tokens: Iterable[int], chunk: int | None = None, progress: ProgressFn | None = None
                ) -> PrefillStats:
        """Append ``tokens`` (the same on every rank: checked), in chunks ending on absolute
        multiples of ``chunk`` (default ``state.prefill_chunk``), as ``Session.prefill``.

        ``progress`` gets a :class:`Progress` after each of this rank's layers of each chunk
        (done counts this rank's share). The state changes only when the whole call succeeds.
        """
        tokens = [int(t) for t in tokens]
        chunk = self.state.prefill_chunk if chunk is None else int(chunk)
        if chunk < 1:
            raise SessionError(f"chunk must be >= 1, got {chunk}")
        self._agree(self._token_problem(tokens), "prefill", self.state.tokens + tokens)  # lines the ranks up
        t0 = time.perf_counter()
        start, n = self.n_tokens, len(tokens)
        sched = chunk_schedule(start, n, chunk)
        n_local = len(self.model.blocks)
        st = self.state
        for a, b in sched:
            on_layer = None
            if progress is not None:
                def on_layer(i: int, a: int = a, b: int = b) -> None:
                    progress(Progress("prefill", a - start + (b - a) * (i + 1) // n_local, n, time.perf_counter() - t0))
            st = self._advance(st, tokens[a - start:b - start], b == start + n, on_layer)
        if sched and self.logits_on == "all":
            st.logits = self._broadcast_logits(st.logits)
        self.state = st
        return PrefillStats(n, time.perf_counter() - t0, len(sched))

    def _step(self, token: int) -> mx.array | None:
        st = self._advance(self.state, [token], True)
        if self.logits_on == "all":
            st.logits = self._broadcast_logits(st.logits)
        self.state = st
        return st.logits

    def step(self, token: int) -> mx.array | None:
        """Feed one token (the same on every rank: checked); return the new logits."""
        self._agree(self._token_problem([int(token)]), "step", self.state.tokens + [int(token)])
        return self._step(int(token))

    def decode(self, max_tokens: int, sampler: Callable[[mx.array], int] | None = None,
               stop: Iterable[int] | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
        """Generate up to ``max_tokens`` tokens, as ``Session.decode``; the last rank samples
        and broadcasts each token, so every rank returns the same list."""
        if self.n_tokens == 0:
            raise SessionError("decode needs a prefilled session (no logits yet)")
        if self.n_tokens + max_tokens > self.ctx:
            raise SessionError(f"context full: {self.n_tokens} tokens + {max_tokens} to generate > ctx {self.ctx}")
        pick = sampler if sampler is not None else greedy
        stops = set(stop or ())
        out: list[int] = []
        for _ in range(max_tokens):
            mine = mx.array([int(pick(self.state.logits)) if self.is_last else 0], dtype=mx.int32)
            tok = int(self._broadcast(mine, (1,), mx.int32, self.last_rank, "token broadcast").item())
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stops:
                break
            self._step(tok)
        return out

    # ---- checkpoints ------------------------------------------------------------------------------
    def _entries(self, entry: ShardEntry | None, error: str, save_id: str) -> list[ShardEntry]:
        """Barrier of a save: every rank's shard entry, or DistributedError on every rank."""
        n = self.args.n_layer
        row = [0] * (8 + n)
        if entry is not None and not error:
            crcs = list(entry.layer_crc32) + [-1] * (n - len(entry.layer_crc32))
            row = [1, entry.start, entry.stop, entry.bytes, entry.crc32, entry.payload_bytes, entry.header_crc32,
                   -1 if entry.logits_crc32 is None else entry.logits_crc32] + crcs
        rows = self._gather(row, "checkpoint barrier")
        failed = [r for r in range(self.size) if rows[r, 0] == 0]
        if failed:
            raise DistributedError(f"checkpoint save failed on rank(s) {failed}" + (f": {error}" if error else ""))
        out = []
        for r in rows.tolist():
            _, a, b, nbytes, crc, payload, hcrc, lcrc = r[:8]
            out.append(ShardEntry(shard_name(save_id, a, b), a, b, nbytes, crc, payload, hcrc, tuple(r[8:8 + b - a]),
                                  None if lcrc < 0 else lcrc))
        return out

    def save_checkpoint(self, directory: str | os.PathLike, text: str | bytes = b"", *,
                        reason: SaveReason = SaveReason.UNKNOWN, ext_flags: int = 0, durable: bool = False,
                        shared_dir: bool = True, progress: Callable[[int, int], None] | None = None
                        ) -> CheckpointSaved:
        """Collectively save the session into ``directory`` (every rank calls it).

        Each rank writes its layers' DSVL shard directly into a temp name (``durable``:
        fsync) and renames it to its save-unique final name; a barrier gathers every
        shard's byte count and checksums; then the manifest is written to a temp name
        and renamed over ``manifest.json`` by rank 0 (``shared_dir``, one directory all
        ranks see) or by every rank into its own directory (not shared: each host then
        holds the manifest and its own shards). A rank that fails or dies before the
        barrier leaves no new manifest: the previous checkpoint there, if any, stays
        intact, and this call raises DistributedError on the surviving ranks.
        ``progress(done, total)`` reports this rank's shard bytes.
        """
        if self.n_tokens == 0:
            raise SessionError("nothing to save: the session holds no tokens")
        t0 = time.perf_counter()
        d = Path(directory)
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        error, old = "", None
        try:
            d.mkdir(parents=True, exist_ok=True)
            _sweep_dead_tmp(d)
            old = read_manifest(d) if (d / "manifest.json").exists() else None
        except (OSError, WorkbenchError) as err:
            error = f"rank {self.rank}: {d}: {err}"
        # rank 0's random id and clock name this save on every rank (also a barrier after the sweep)
        ident = self._broadcast(mx.array([secrets.randbits(62), int(time.time())], dtype=mx.int64), (2,), mx.int64, 0,
                                "checkpoint start")
        save_id, created = f"{int(ident[0].item()):016x}", int(ident[1].item())
        entry = None
        if not error:
            try:
                entry = write_shard_file(d, self.state, save_id, durable, progress)
            except (OSError, WorkbenchError) as err:
                error = f"rank {self.rank}: {err}"
        try:
            entries = self._entries(entry, error, save_id)
        except DistributedError:
            if entry is not None:
                (d / entry.file).unlink(missing_ok=True)
            raise
        manifest = make_manifest(self.state, entries, save_id, raw, quant_bits=self.quant_bits, reason=reason,
                                 ext_flags=ext_flags, created_at=created)
        error = ""
        if self.rank == 0 or not shared_dir:
            try:
                publish_manifest(d, manifest, durable)
            except ShardError as err:
                error = str(err)
        self._agree(error, "manifest publish")
        remove_unreferenced(d, old, manifest)
        return CheckpointSaved(d / "manifest.json", save_id, manifest.total_bytes, entry.bytes if entry else 0,
                               time.perf_counter() - t0)

    def restore_checkpoint(self, directory: str | os.PathLike, verify: bool = True) -> Manifest:
        """Collectively restore a sharded checkpoint written by any layout of ranks: each rank
        reads its layers from whichever shards hold them (and the last rank the logits).
        The state changes on no rank unless every rank succeeded."""
        error, part, m = "", None, None
        try:
            m = read_manifest(directory)
            if m.layout != self.layout:
                raise ShardError(f"{directory}: checkpoint written for a different model layout")
            part = load_range(directory, self.start, self.stop, self.ctx, prefill_chunk=self.state.prefill_chunk,
                              logits=self.is_last, verify=verify, manifest=m).to_mlx()
        except WorkbenchError as err:
            error = f"rank {self.rank}: {err}"
        self._agree(error, "checkpoint restore", None if part is None else part.tokens)
        assert part is not None and m is not None
        if self.logits_on == "all":
            part.logits = self._broadcast_logits(part.logits)
        self.state = part
        return m


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


def build_range_model(f: GGUFFile, args: ModelArgs, start: int, stop: int,
                      on_layer: Callable[[int], None] | None = None) -> Model:
    """A :class:`Model` holding only blocks ``start..stop-1``, the token embedding when
    ``start == 0`` and the output head when ``stop == n_layer`` (None otherwise); the other
    layers' tensors are never touched. ``on_layer(L)`` is called after each block."""
    t = Tensors(f)
    blocks = []
    for L in range(start, stop):
        blocks.append(build_block(args, t, L))
        if on_layer is not None:
            on_layer(L)
    embedding = t.embedding("token_embd.weight") if start == 0 else None
    out_hc = out_norm = head = None
    if stop == args.n_layer:
        out_hc = HCWeights(t.float("output_hc_fn.weight"), t.float("output_hc_scale.weight"),
                           t.float("output_hc_base.weight"))
        out_norm, head = t.float("output_norm.weight"), t.matrix("output.weight")
    return Model(args, embedding, blocks, out_hc, out_norm, head)


def load(path: str | os.PathLike, ctx: int = DEFAULT_CTX, *, group: mx.distributed.Group | None = None,
         ranges: Sequence[tuple[int, int]] | None = None, logits_on: LogitsOn = "all", backend: str = "any",
         progress: ProgressFn | None = None) -> DistributedSession:
    """Open a ds4 GGUF on this rank and build this rank's layers (every rank calls it).

    ``group`` defaults to :func:`init_group` (``backend``); ``ranges`` (half-open, one per
    rank) default to :func:`~workbench.kv.shards.split_layers`. ``progress`` receives
    ``Progress("load", layers_done, layers_of_this_rank, elapsed_s)``.
    """
    t0 = time.perf_counter()
    g = init_group(backend) if group is None else group
    f = GGUFFile(path)
    try:
        problems = validate_ds4(f)
        if problems:
            raise ModelFileError(f"{f.path}: not a usable ds4 model: " + "; ".join(problems))
        args = ModelArgs.from_metadata(f.metadata)
        rs = split_layers(args.n_layer, g.size()) if ranges is None else [tuple(r) for r in ranges]
        check_ranges(rs, args.n_layer)
        if len(rs) != g.size():
            raise DistributedError(f"{len(rs)} layer ranges for {g.size()} ranks")
        a, b = rs[g.rank()]
        on_layer = None
        if progress is not None:
            def on_layer(L: int) -> None:
                progress(Progress("load", L - a + 1, b - a, time.perf_counter() - t0))
        model = build_range_model(f, args, a, b, on_layer)
        return DistributedSession(model, g, rs, ctx, logits_on, path=f.path, file=f, quant_bits=routed_quant_bits(f))
    except BaseException:
        f.close()
        raise


__all__ = ["DistributedSession", "DistributedError", "Traffic", "CheckpointSaved", "LogitsOn", "init_group", "load",
           "build_range_model", "rank_weight_bytes"]
