"""A live session: a loaded model, one :class:`~workbench.state.SessionState` and the layer stage.

    s = load("data/tiny.gguf", ctx=4096)
    stats = s.prefill(tokens)            # chunked, layer-major within a chunk
    out = s.decode(16, Sampler(temperature=0))
    snap = s.snapshot(); ...; s.restore(snap)

Prefill chunks end on absolute multiples of the chunk size (ds4's schedule), so a prefill
resumed from any length follows the cold schedule; chunking changes only float rounding,
never the math (every token sees exactly what token-by-token decoding would show it).
``state.logits`` always holds the next-token logits after the last token.

Where the layers run is the session's :class:`~workbench.stage.LayerStage`: all of them
in this process (:class:`~workbench.stage.LocalStage`, the default), or one rank's range
of a pipeline (``workbench.distributed.load``). The loops below are the same for both;
on a pipeline ``state`` holds this rank's layers and ``snapshot()`` gathers the whole state.

Long calls can be stopped from another thread (a notebook's Stop button):
``session.stop.set()`` makes a running prefill raise :class:`Cancelled` at the next layer
or chunk boundary (the state stays as it was) and a running decode return the tokens it
has; each call clears the flag when it starts. Between chunks and tokens the model file
is checked for truncation (see :meth:`GGUFFile.check_unchanged`), and logits that are not
finite stop a decode with an error instead of sampling token 0.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np

from workbench.errors import WorkbenchError
from workbench.gguf.layout import validate_ds4
from workbench.gguf.reader import GGUFFile
from workbench.spec.args import ModelArgs
from workbench.model.model import Model
from workbench.model.weights import load_model
from workbench.sampling import Sampler, greedy, top_tokens
from workbench.spec.statelayout import StateLayout
from workbench.stage import LayerStage, LocalStage, StageFactory
from workbench.state import SessionState

DEFAULT_CTX = 32768
MAX_PREFILL_CHUNK = 2048  # ds4's prefill cap
# MLX buffer cache on the CPU (bytes), set process-wide by load(): prefill frees and
# reallocates equal-sized temporaries (dequantized expert batches, matmul outputs, the
# streams) every layer; when they do not fit the cache each new one is fresh memory,
# page-faulted in, which costs more than the dequantization itself. Measured at the real
# widths (real-dims-1, 512-token prefill): 1 GiB left 3.9 M page faults and 19 s of system
# time, 2 GiB 0.38 M and 3.5 s; the cache stays a small part of a real model's resident set.
CPU_CACHE_LIMIT = 2 << 30


class SessionError(WorkbenchError):
    """A session operation that cannot be done (context full, bad state, bad tokens)."""


class Cancelled(SessionError):
    """A prefill stopped by ``session.stop`` (the state is unchanged)."""


class ModelFileError(WorkbenchError):
    """A GGUF file that is not a usable ds4 model."""


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives.

    ``stage`` is "load" (done/total in layers) or "prefill" (done/total in tokens of this
    call); ``elapsed_s`` counts from the start of the call. On a pipeline both count this
    process's layers only.
    """

    stage: str
    done: int
    total: int
    elapsed_s: float


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class PrefillStats:
    """One prefill call: tokens added, wall seconds, chunks run."""

    tokens: int
    seconds: float
    chunks: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def chunk_schedule(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """Chunks ``[a, b)`` covering positions start..start+n, each ending on an absolute
    multiple of ``chunk`` except possibly the last."""
    out, a, end = [], start, start + n
    while a < end:
        b = min(end, (a // chunk + 1) * chunk)
        out.append((a, b))
        a = b
    return out


def check_ctx(ctx: int, context_length: int) -> None:
    """Raise SessionError unless ``1 <= ctx <= context_length`` (the model's)."""
    if ctx < 1:
        raise SessionError(f"ctx must be >= 1, got {ctx}")
    if ctx > context_length:
        raise SessionError(f"ctx {ctx} exceeds the model's context length {context_length}")


class Session:
    """A model, its live state and the stage its layers run on. ``state`` (this stage's
    layers) is replaced, never mutated, by each call. ``stage`` defaults to every layer here;
    ``model`` holds the stage's blocks (and the embedding / head where the stage has them)."""

    def __init__(self, model: Model, ctx: int, path: str | None = None, file: GGUFFile | None = None,
                 stage: LayerStage | None = None) -> None:
        args = model.args
        check_ctx(ctx, args.context_length)
        self.model, self.args, self.ctx, self.path, self._file = model, args, ctx, path, file
        self.stage = LocalStage(args.n_layer) if stage is None else stage
        self.layout = StateLayout.from_args(args)
        self.state = self.stage.empty(self.layout, ctx, min(ctx, MAX_PREFILL_CHUNK))
        self.stop = threading.Event()  # set from another thread to stop a running prefill/decode

    # ---- state ---------------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        return list(self.state.tokens)

    @property
    def n_tokens(self) -> int:
        return self.state.n_tokens

    @property
    def logits(self) -> mx.array | None:
        """Next-token logits ``[n_vocab]`` float32 (None before any token)."""
        return self.state.logits

    def reset(self) -> None:
        """Forget every token."""
        self.stage.reset()
        self.state = self.stage.empty(self.layout, self.ctx, self.state.prefill_chunk)

    def snapshot(self) -> SessionState:
        """An independent in-memory copy of the whole state (on a pipeline: gathered from
        every rank)."""
        return self.stage.gather(self.state)

    def restore(self, state: SessionState) -> None:
        """Continue from ``state`` (copied); it must fit this model and context. The
        restored state takes this session's ctx and prefill chunk."""
        if state.layout != self.layout:
            raise SessionError("state layout does not match this model")
        if not state.is_whole:
            raise SessionError(f"state holds layers {state.start}..{state.stop - 1} only; restore takes a whole state")
        if state.n_tokens > self.ctx:
            raise SessionError(f"state holds {state.n_tokens} tokens, more than this session's ctx {self.ctx}")
        problems = state.problems()
        if problems:
            raise SessionError("inconsistent state: " + "; ".join(problems[:5]))
        self.state = self.stage.scatter(replace(state.to_mlx(), ctx=self.ctx, prefill_chunk=self.state.prefill_chunk))

    @property
    def file(self) -> GGUFFile | None:
        """The open GGUF file the model maps (None for a model built in memory)."""
        return self._file

    def close(self, error: str = "") -> None:
        """End the stage and release the GGUF mapping (the session is unusable afterwards).
        ``error``: why the program stops, when it stops on one (a pipeline's other ranks
        then raise it)."""
        self.stage.close(error)
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- running -------------------------------------------------------------------
    def _check_tokens(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.args.n_vocab]
        if bad:
            raise SessionError(f"token ids outside the vocabulary of {self.args.n_vocab}: {bad[:5]}")
        self._check_room(len(tokens), "new")

    def _check_room(self, n: int, what: str) -> None:
        if self.n_tokens + n > self.ctx:
            raise SessionError(f"context full: {self.n_tokens} tokens + {n} {what} > ctx {self.ctx}; raise ctx "
                               f"(load(..., ctx=N), `workbench run --ctx N`) up to the model's context length "
                               f"{self.args.context_length:,}")

    def _check_file(self) -> None:
        """Fail cleanly if the mapped model file was truncated or rewritten (SIGBUS ahead)."""
        if self._file is not None:
            self._file.check_unchanged()

    def _check_stop(self) -> None:
        # also on a pipeline's rank 0: its stage sends a chunk on only after the chunk's last layer,
        # and the serving ranks go back to the state of rank 0's last completed call
        if self.stop.is_set():
            raise Cancelled("stopped: the prefill was cancelled (the state is unchanged)")

    def advanced(self, st: SessionState, tokens: list[int], on_layer: Callable[[int], None] | None = None,
                 logits: bool = True) -> SessionState:
        """``st`` (a state of this stage) extended by one chunk of tokens through the stage,
        as given: no schedule, no checks (logits None unless ``logits``)."""
        out, layers = self.stage.advance(self.model, tokens, st.n_tokens, st.layers, on_layer, logits)
        return replace(st, tokens=st.tokens + list(tokens), logits=out, layers=layers)

    def prefill(self, tokens: Iterable[int], chunk: int | None = None,
                progress: ProgressFn | None = None) -> PrefillStats:
        """Append tokens, in chunks ending on absolute multiples of ``chunk`` (default
        ``state.prefill_chunk``). ``progress`` gets a :class:`Progress` after every layer
        of every chunk. Raises SessionError (before any work) when the context would
        overflow, :class:`Cancelled` when ``stop`` is set. The state
        changes only when the whole call succeeds (an interrupted prefill leaves it as it
        was); only the last chunk computes logits."""
        tokens = [int(t) for t in tokens]
        chunk = self.state.prefill_chunk if chunk is None else int(chunk)
        if chunk < 1:
            raise SessionError(f"chunk must be >= 1, got {chunk}")
        self._check_tokens(tokens)
        self.stop.clear()
        t0 = time.perf_counter()
        start, n = self.n_tokens, len(tokens)
        sched = chunk_schedule(start, n, chunk)
        n_local = self.stage.stop - self.stage.start
        st = self.state
        for a, b in sched:
            self._check_stop()
            self._check_file()

            def on_layer(L: int, a: int = a, b: int = b) -> None:
                self._check_stop()
                if progress is not None:
                    done = a - start + (b - a) * (L + 1) // n_local
                    progress(Progress("prefill", done, n, time.perf_counter() - t0))
            st = self.advanced(st, tokens[a - start : b - start], on_layer, logits=b == start + n)
        self.state = st
        return PrefillStats(n, time.perf_counter() - t0, len(sched))

    def step(self, token: int) -> mx.array:
        """Feed one token; return the new next-token logits ``[n_vocab]``."""
        self._check_tokens([int(token)])
        self._check_file()
        self.state = self.advanced(self.state, [int(token)])
        return self.state.logits

    def decode(self, max_tokens: int, sampler: Callable[[mx.array], int] | None = None,
               stop: Iterable[int] | None = None,
               on_token: Callable[[int], None] | None = None) -> list[int]:
        """Generate up to ``max_tokens`` tokens from the current logits.

        Each token is sampled (greedy by default) and fed back. A token in ``stop`` ends
        generation: it is returned but not fed, so the state ends before it.
        ``on_token(id)`` is called as each token is chosen (for streaming). Setting
        ``self.stop`` ends it early with the tokens so far. Raises SessionError when the
        logits are not finite (a broken model or state: no token is made up).
        """
        if self.state.logits is None:
            raise SessionError("decode needs a prefilled session (no logits yet)")
        self._check_room(max_tokens, "to generate")
        self.stop.clear()
        pick = sampler if sampler is not None else greedy
        stops = set(stop or ())
        out: list[int] = []
        for _ in range(max_tokens):
            if self.stop.is_set():
                break
            logits = self.state.logits
            if not bool(mx.all(mx.isfinite(logits)).item()):
                bad = int(np.count_nonzero(~np.isfinite(np.asarray(logits, dtype=np.float32))))
                raise SessionError(f"the next-token logits after {self.n_tokens} tokens hold {bad} values that are "
                                   f"not finite (nan/inf): the model or its state is broken")
            tok = int(pick(logits))
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stops:
                break
            self.step(tok)
        return out


@dataclass(frozen=True)
class Generation:
    """One prompt + completion: prefill stats, the distribution after the prompt, the output."""

    prompt_tokens: int
    prefill: PrefillStats
    top_next: list[tuple[int, float]]  # (id, probability) of the 5 likeliest next tokens
    tokens: list[int]  # generated ids (a final stop token included)
    decode_seconds: float

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate(session: Session, tokens: list[int], max_tokens: int, sampler: Callable[[mx.array], int] | None = None,
             stop: Iterable[int] | None = None, chunk: int | None = None, progress: ProgressFn | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Prefill ``tokens`` after the session's current ones, then decode up to
    ``max_tokens`` (fewer if the context fills up first)."""
    stats = session.prefill(tokens, chunk=chunk, progress=progress)
    top = top_tokens(session.logits, 5)
    t0 = time.perf_counter()
    room = min(max_tokens, session.ctx - session.n_tokens)
    out = session.decode(room, sampler, stop, on_token) if room > 0 else []
    return Generation(len(tokens), stats, top, out, time.perf_counter() - t0)


def load(path: str | os.PathLike[str], ctx: int = DEFAULT_CTX, progress: ProgressFn | None = None,
         stage: StageFactory | None = None) -> Session:
    """Open a ds4 GGUF, validate it, build the model and return an empty session.

    Raises ModelFileError listing every layout problem found by ``validate_ds4``.
    On the CPU device it raises MLX's process-wide buffer cache limit to
    ``CPU_CACHE_LIMIT`` (see there; a larger limit already set is kept).
    ``stage(args, ctx, prefill_chunk)`` makes the layer stage once the model's arguments
    are read (default: every layer here); only the stage's layers are built.
    ``progress`` receives ``Progress("load", layers_done, layers_of_the_stage, elapsed_s)``.
    """
    t0 = time.perf_counter()
    if mx.default_device() == mx.cpu:
        previous = mx.set_cache_limit(CPU_CACHE_LIMIT)
        if previous > CPU_CACHE_LIMIT:  # never lower a larger limit set by the user
            mx.set_cache_limit(previous)
    f = GGUFFile(path)
    try:
        problems = validate_ds4(f)
        if problems:
            raise ModelFileError(f"{f.path}: not a usable ds4 model: " + "; ".join(problems))
        args = ModelArgs.from_metadata(f.metadata)
        check_ctx(ctx, args.context_length)
        st = LocalStage(args.n_layer) if stage is None else stage(args, ctx, min(ctx, MAX_PREFILL_CHUNK))
        on_layer = None
        if progress is not None:
            def on_layer(L: int) -> None:
                progress(Progress("load", L + 1 - st.start, st.stop - st.start, time.perf_counter() - t0))
        model = load_model(f, args, on_layer, layers=(st.start, st.stop))
        return Session(model, ctx, path=f.path, file=f, stage=st)
    except BaseException:
        f.close()
        raise


__all__ = ["Progress", "PrefillStats", "Generation", "Session", "SessionError", "Cancelled", "ModelFileError", "Sampler",
           "load", "generate", "chunk_schedule"]
