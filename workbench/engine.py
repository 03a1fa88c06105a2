"""One request end to end: prefix reuse (live, then disk), suffix prefill, decode, saves.

    engine = Engine(session, KVStore("kv"), KVPolicy())
    out = engine.complete(messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
    out.usage.cached_tokens, out.usage.source, out.timings.ttft_s
    engine.records                      # a DataFrame, one row per request and cache event
    engine.close()                      # the shutdown save

The order follows ds4-server (``ds4-kvcache.md`` §2.1): the live state is reused when its
rendered text (the decode of its exact tokens) is a byte prefix of the new prompt; on a
miss the live state is saved as ``evict`` and the disk cache is searched for the longest
stored text prefix (with ``policy.protect_hit`` the lookup comes first and the save spares
the file about to be loaded), the hit is restored and only the remaining text is
tokenized (ds4's seven specials recognised) and prefilled. A
complete miss is prefilled from token 0 and saved ``cold`` at the policy's boundary;
``continued`` saves land on absolute multiples of the policy's step. Every save stops
the prefill at exactly the saved length, so a checkpoint never slices a longer state.
Continued saves are checked during prefill only, not between decoded tokens.

Telemetry: the engine records its requests and live-state hits and misses itself; what
the disk store does (saves, evictions, loads, lookup misses) reaches ``records`` only as
the store's own typed events, which the engine subscribes to and tags with the request
(and conversation) being served; store events outside the engine's calls are not its.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from workbench.chat import render_messages, render_single
from workbench.kv.errors import KVLoadError, KVSaveError
from workbench.kv.events import KVEvent
from workbench.kv.header import SaveReason
from workbench.kv.policy import ContinuedSchedule, KVPolicy, plan_saves
from workbench.kv.store import KVStore
from workbench.sampling import Sampler, greedy, top_tokens
from workbench.session import Progress, Session
from workbench.telemetry import Recorder
from workbench.tokenizer import Tokenizer

MIN_RATE_TOKENS = 64  # prefills shorter than this don't update the measured rate


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request, as ds4 reports it."""

    prompt_tokens: int  # effective prompt: reused + prefilled
    cached_tokens: int  # reused from the live state or a disk checkpoint
    cache_write_tokens: int  # prefilled into the live state (ds4's name)
    generated_tokens: int
    source: str  # live | disk | none


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each phase of one request."""

    lookup_s: float
    restore_s: float
    prefill_s: float
    save_s: float
    decode_s: float
    full_prefill_s: float  # estimate of a full prefill of the prompt at the measured rate

    @property
    def ttft_s(self) -> float:
        """Time to first token: everything before decoding starts."""
        return self.lookup_s + self.restore_s + self.prefill_s + self.save_s


@dataclass(frozen=True)
class SaveRecord:
    """A checkpoint write attempted while serving: why, where, and how it went."""

    reason: str  # cold | continued | evict | shutdown
    path: str
    status: str  # saved | exists | skipped | failed
    bytes: int
    seconds: float
    tokens: int
    detail: str = ""  # why it was skipped or failed (the store's words)


@dataclass(frozen=True)
class Completion:
    """The result of :meth:`Engine.complete`."""

    text: str
    tokens: list[int]
    usage: Usage
    timings: Timings
    saves: list[SaveRecord] = field(default_factory=list)
    note: str = ""  # why the prefix was (not) reused, why no cold save
    top_next: list[tuple[int, float]] = field(default_factory=list)  # 5 likeliest (id, prob) after the prompt

    @property
    def failed_saves(self) -> list[SaveRecord]:
        return [s for s in self.saves if s.status == "failed"]


def restrict(allowed: np.ndarray, sampler: Callable | None = None) -> Callable[[Any], int]:
    """A sampler that only picks tokens where ``allowed`` (bool ``[n_vocab]``) is True,
    e.g. ``Tokenizer.text_token_mask()`` so a synthetic model's replies replay exactly."""
    pick = sampler or greedy

    def sample(logits: Any) -> int:
        x = np.array(logits, dtype=np.float32, copy=True)
        x[~allowed] = -np.inf
        return int(pick(x))

    return sample


class Engine:
    """A session, an optional disk store and a save policy, serving chat requests.

    ``progress`` receives :class:`~workbench.session.Progress` during every prefill,
    counted over the whole prompt (it starts at the reused tokens, and the segments
    between save points continue one count). ``chunk`` is the prefill chunk in tokens
    (None: the session's). ``recorder`` collects telemetry (see :mod:`workbench.telemetry`).
    ``kv_layout`` (flat | chain, None: the store's own) sets how the store writes checkpoints.
    """

    def __init__(self, session: Session, store: KVStore | None = None, policy: KVPolicy | None = None,
                 tokenizer: Tokenizer | None = None, recorder: Recorder | None = None, durable: bool = False,
                 progress: Callable[[Progress], None] | None = None, chunk: int | None = None,
                 kv_layout: str | None = None) -> None:
        self.session = session
        self.store = store
        if kv_layout is not None and store is not None:  # flat | chain: how the store writes from now on
            store.use_layout(kv_layout)
        self.policy = policy or KVPolicy()
        if tokenizer is None:
            tokenizer = Tokenizer.from_gguf(session.file)
        self.tokenizer = tokenizer
        self.recorder = recorder or Recorder()
        self.durable = durable
        self.progress = progress
        self.chunk = chunk
        self.schedule = ContinuedSchedule(self.policy)
        self.requests = 0
        self._live_text = b""  # decode of session.tokens, kept in step with the session
        self._saved_len = -1  # live length of the last successful save (skip a duplicate shutdown save)
        self._rate_tokens = 0
        self._rate_seconds = 0.0
        self._context: dict[str, Any] | None = None  # the telemetry tags of the store call under way
        if store is not None:
            store.subscribe(self._on_store_event)

    # ---- public -------------------------------------------------------------------------
    @property
    def records(self) -> pd.DataFrame:
        return self.recorder.frame()

    @property
    def prefill_rate(self) -> float | None:
        """Measured prefill tokens/s over this engine's prefills (None before any)."""
        return self._rate_tokens / self._rate_seconds if self._rate_seconds > 0 else None

    def render(self, prompt: str | None = None, messages: Sequence[dict] | None = None,
               tools: Sequence[dict] | None = None, system: str = "", thinking: bool = False) -> str:
        """The rendered prompt text for a single prompt or a message list."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            return render_messages(list(messages), tools=tools, thinking=thinking, ctx=self.session.ctx)
        return render_single(prompt, system=system, thinking=thinking, ctx=self.session.ctx)

    def complete(self, prompt: str | None = None, messages: Sequence[dict] | None = None,
                 tools: Sequence[dict] | None = None, max_tokens: int = 16,
                 sampler: Sampler | Callable[[Any], int] | None = None,
                 system: str = "", thinking: bool = False, conversation: str = "",
                 on_token: Callable[[int], None] | None = None) -> Completion:
        """Serve one request: reuse a prefix, prefill the rest, decode ``max_tokens``
        (``on_token`` is called with each generated id, for streaming)."""
        req = self.requests
        self.requests += 1
        rendered = self.render(prompt, messages, tools, system, thinking).encode("utf-8")
        saves: list[SaveRecord] = []
        t0 = time.perf_counter()
        tokens, source, note, restore_s, save_s = self._reuse(rendered, req, saves)
        lookup_s = time.perf_counter() - t0 - restore_s - save_s
        cached = self.session.n_tokens
        if source == "none":
            self.schedule.reset()
        # the prompt is prefilled in segments that end at each save point
        self._progress_of = (req, len(tokens), cached, t0)
        self._record_progress(cached)
        t1 = time.perf_counter()
        stops = self._save_points(tokens, source, req)
        note = "; ".join(x for x in (note, stops.pop("note", "")) if x)
        prefill_s = 0.0
        for end, reason in sorted(stops.items()) + [(len(tokens), None)]:
            if end > self.session.n_tokens:
                prefill_s += self._prefill(tokens[self.session.n_tokens:end], len(tokens))
            if reason is not None and end == self.session.n_tokens:
                saves.append(self._save(reason, req, conversation))
        save_s += time.perf_counter() - t1 - prefill_s
        rate = self.prefill_rate
        full_est = len(tokens) / rate if rate else float("nan")
        top = top_tokens(self.session.logits, 5) if self.session.logits is not None else []
        # decode
        t2 = time.perf_counter()
        out = self.session.decode(min(max_tokens, self.session.ctx - self.session.n_tokens), sampler,
                                  stop=[self.tokenizer.eos], on_token=on_token)
        decode_s = time.perf_counter() - t2
        self._sync_live_text()
        text_ids = [t for t in out if t != self.tokenizer.eos]
        usage = Usage(len(tokens), cached, len(tokens) - cached, len(out), source)
        timings = Timings(lookup_s, restore_s, prefill_s, save_s, decode_s, full_est)
        self._record("request", request=req, conversation=conversation, source=source, reason=note, total=len(tokens),
                     cache=cached, processed=len(tokens), time_ms=timings.ttft_s * 1000,
                     prompt_tokens=usage.prompt_tokens, cached_tokens=cached, suffix_tokens=usage.cache_write_tokens,
                     generated_tokens=len(out), lookup_s=lookup_s, restore_s=restore_s, prefill_s=prefill_s,
                     decode_s=decode_s, ttft_s=timings.ttft_s, full_prefill_s=full_est, save_s=save_s)
        return Completion(self.tokenizer.decode_text(text_ids), out, usage, timings, saves, note, top)

    def close(self) -> SaveRecord | None:
        """Shutdown save of the live state (when the policy wants one and it is not saved)."""
        n = self.session.n_tokens
        if self.store is None or n == self._saved_len or not self.policy.shutdown_due(n):
            return None
        return self._save("shutdown", -1, "")

    # ---- steps --------------------------------------------------------------------------
    def _reuse(self, rendered: bytes, req: int, saves: list[SaveRecord]) -> tuple[list[int], str, str, float, float]:
        """Find the longest reusable prefix and put the session there.

        Returns (effective prompt tokens, source, note, restore seconds, save seconds)."""
        live_n = self.session.n_tokens
        live = self._live_text
        if live_n and rendered.startswith(live):
            suffix = self._suffix_tokens(rendered, len(live))
            if suffix is not None:
                self._record("hit", request=req, source="live", tokens=live_n, bytes=len(live))
                return self.session.tokens + suffix, "live", "live text prefix", 0.0, 0.0
        why = ("no-live-checkpoint" if not live_n else
               "incoming-prompt-shorter-than-live-checkpoint" if len(rendered) < len(live) else "text-mismatch")
        if live_n:
            self._record("miss", request=req, source="live", reason=why, tokens=live_n)
        protect = self.policy.protect_hit
        if self.store is not None and protect:
            with self._tagged(request=req):
                hit = self.store.lookup(rendered, self.session.ctx)
        else:
            hit = None
        save_s = 0.0
        if live_n and self.store is not None and self.policy.evict_due(live_n) and live_n != self._saved_len:
            t = time.perf_counter()
            saves.append(self._save("evict", req, "", protect=[hit] if hit is not None else []))
            save_s = time.perf_counter() - t
        if self.store is not None and not protect:  # ds4's order: the evict save, then the lookup
            with self._tagged(request=req):
                hit = self.store.lookup(rendered, self.session.ctx)
        suffix = None if hit is None else self._suffix_tokens(rendered, hit.text_bytes)
        if suffix is not None:  # a stored text ending inside a UTF-8 character is not loaded
            t = time.perf_counter()
            try:
                with self._tagged(request=req):
                    state, text = self.store.load(hit, self.session.layout, self.session.ctx, prompt=rendered,
                                                  prefill_chunk=self.session.state.prefill_chunk)
            except KVLoadError as err:  # unusable (recorded as load_failed by its event): say why, prefill cold
                why = f"{why}; disk checkpoint {hit.path.name} unusable ({err}), prefilled cold"
            else:
                self.session.restore(state)
                self._live_text = text
                self._saved_len = state.n_tokens
                self.schedule.loaded(state.n_tokens)
                restore_s = time.perf_counter() - t
                return state.tokens + suffix, "disk", f"live {why}; disk prefix", restore_s, save_s
        self.session.reset()
        self._live_text = b""
        self._saved_len = -1
        return self.tokenizer.encode_rendered(rendered.decode("utf-8")), "none", f"live {why}", 0.0, save_s

    def _suffix_tokens(self, rendered: bytes, cut: int) -> list[int] | None:
        """Tokens of ``rendered[cut:]`` (None when the cut splits a UTF-8 character)."""
        try:
            return self.tokenizer.encode_rendered(rendered[cut:].decode("utf-8"))
        except UnicodeDecodeError:
            return None

    def _save_points(self, tokens: list[int], source: str, req: int) -> dict:
        """{length: reason} of the saves this prefill should stop at, plus a 'note'."""
        if self.store is None:
            return {}
        plan = plan_saves(self.policy, self.schedule, tokens, self.session.n_tokens, source,
                          self.tokenizer.user, self.tokenizer.assistant)
        self._cold_claim = plan.cold_claim
        stops: dict[Any, Any] = dict(plan.stops)
        if plan.note:
            stops["note"] = plan.note
        return stops

    def _record_progress(self, processed: int) -> None:
        """A llama.cpp-style ``prompt_progress`` row: {total, cache, processed, time_ms}."""
        req, total, cache, t0 = self._progress_of
        self._record("progress", request=req, total=total, cache=cache, processed=processed,
                     time_ms=(time.perf_counter() - t0) * 1000)

    def _prefill(self, tokens: list[int], prompt_len: int) -> float:
        """Prefill ``tokens`` (one segment of a prompt of ``prompt_len`` tokens); seconds.
        A progress row is recorded per finished chunk."""
        t = time.perf_counter()
        before = self.session.n_tokens
        chunk = self.chunk or self.session.state.prefill_chunk
        last = [before]

        def progress(p: Progress) -> None:
            at = before + p.done
            if at > last[0] and (at % chunk == 0 or p.done == p.total):
                last[0] = at
                self._record_progress(at)
            if self.progress is not None:
                self.progress(Progress(p.stage, at, prompt_len, p.elapsed_s))

        self.session.prefill(tokens, chunk=self.chunk, progress=progress)
        dt = time.perf_counter() - t
        if len(tokens) >= MIN_RATE_TOKENS:
            self._rate_tokens += len(tokens)
            self._rate_seconds += dt
        self._sync_live_text()
        return dt

    def _sync_live_text(self) -> None:
        self._live_text = self.tokenizer.decode(self.session.tokens)

    def _save(self, reason: str, req: int, conversation: str, protect: Sequence = ()) -> SaveRecord:
        """Save the live state as it is now (the save and its evictions are recorded
        through the store's events)."""
        assert self.store is not None
        state = self.session.snapshot()
        try:
            with self._tagged(request=req, conversation=conversation):
                result = self.store.save(state, self._live_text, SaveReason[reason.upper()], durable=self.durable,
                                         protect=protect)
        except KVSaveError as err:  # reported, not raised: the request itself is served
            if reason == "cold":
                self.schedule.rollback(getattr(self, "_cold_claim", None))
            return SaveRecord(reason, "", "failed", 0, 0.0, state.n_tokens, str(err))
        if result.saved or result.status == "exists":
            self._saved_len = state.n_tokens
            if reason in ("cold", "continued"):
                self.schedule.stored(state.n_tokens)
        return SaveRecord(reason, str(result.path), result.status, result.bytes, result.seconds, state.n_tokens,
                          result.detail)

    @contextmanager
    def _tagged(self, **context: Any) -> Iterator[None]:
        """Store events during the block are this engine's, recorded with ``context``."""
        self._context = context
        try:
            yield
        finally:
            self._context = None

    def _on_store_event(self, event: KVEvent) -> None:
        if self._context is not None:
            self.recorder.record_event(event, self.store.budget_bytes, **self._context)

    def _record(self, event: str, **fields: Any) -> None:
        self.recorder.record(event, **fields)
