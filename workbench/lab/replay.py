"""Replay a trace under any policy and budget, without the model.

The replay follows :class:`workbench.engine.Engine` step by step (live text prefix, evict
save, disk lookup, restore, cold and continued saves at ``policy.plan_saves``' points,
decode) over *simulated* checkpoints: a checkpoint is its text (or its prefix hash), its
token count and its exact file size from the layout formula
(``workbench.kv.dsv4.payload_size``), with no tensors. Lookup (``kv.lookup.decide``,
for traces that keep their texts), admission and eviction (``kv.eviction``) are the
store's own pure functions, so with the policy and budget a
trace was recorded under, the replay reproduces every request's source, cached tokens,
saves and evictions.

``kv_layout`` (default: the trace header's) accounts the bytes of either store layout:
``flat`` (ds4's ``.kv`` files: every save writes the whole state) or ``chain`` (a save
extending a stored checkpoint of the same token prefix writes only its delta over it,
``workbench.kv.chain.chain_size``; re-based past ``max_depth``; a checkpoint another
one extends is spared by eviction until that one is gone, as ``KVStore`` does). A chained
restore is counted as reading the whole state (the bytes it reads, spread over the chain).

``clairvoyant=True`` replaces the eviction order by one that knows the future (Belady by
size: checkpoints never needed again go first, then the largest next-use distance × bytes)
at the same save points; ``workbench.lab.optimum`` builds the optimum from it.

Times are Unix seconds (the trace's arrival times); sizes bytes; rates tokens/s and bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from workbench.kv.chain import chain_size
from workbench.kv.chainstore import LAYOUTS, MAX_DEPTH
from workbench.kv.eviction import Candidate, keep_value, plan_eviction
from workbench.kv.checksum import footer_bytes
from workbench.kv.dsv4 import payload_size
from workbench.kv.header import TEXT_OFFSET, SaveReason
from workbench.kv.lookup import LookupRules, decide
from workbench.kv.policy import ContinuedSchedule, KVPolicy, plan_saves
from workbench.lab.misses import Checkpoint, explain_losses, plain_words
from workbench.lab.trace import Trace, TraceRequest

MiB = 1024 * 1024
GiB = 1024 * MiB
USER, ASSISTANT = 1, 2  # stand-in ids of the chat markers in a replay's token list


@dataclass(frozen=True)
class Rates:
    """Throughputs that turn tokens and bytes into seconds."""

    prefill_tps: float  # prompt tokens per second
    write_bps: float  # checkpoint bytes written per second
    read_bps: float  # checkpoint bytes restored per second


# ds4's published figures (ds4-kvcache.md §7): README prefill rates, ~5.3 GiB/s save/load
RATE_PRESETS: dict[str, Rates] = {
    "m3-max": Rates(250.0, 5.3 * GiB, 5.3 * GiB),
    "m3-ultra": Rates(468.0, 5.3 * GiB, 5.3 * GiB),
    "gb10": Rates(344.0, 5.3 * GiB, 5.3 * GiB),
}


@dataclass
class SimEntry:
    """A simulated checkpoint in the simulated directory."""

    key: str  # SHA-1 hex of its text (hashed traces: the 16-digit prefix hash)
    text: TraceRequest  # the request whose text it is a prefix of
    text_bytes: int
    ends: list[int]  # byte end of each of its tokens
    size: int
    reason: SaveReason
    created_at: int
    last_used: int
    hits: int = 0
    request: int = -1  # the request that saved it
    parent: str | None = None  # chain layout: the key of the checkpoint it extends
    depth: int = 0  # chain layout: links above its base

    @property
    def tokens(self) -> int:
        return len(self.ends)

    # kv.lookup.CheckpointMeta: a file of the trace's own model, saved at the replay's ctx
    @property
    def sha(self) -> str:
        return self.key

    @property
    def ctx(self) -> int:
        return 0

    @property
    def quant_bits(self) -> int:
        return 2

    @property
    def model_id(self) -> int:
        return 0


@dataclass
class RequestResult:
    """What the replay did with one request."""

    request: int
    conversation: str
    source: str  # live | disk | none
    prompt_tokens: int
    cached_tokens: int
    miss_reason: str  # the cause that lost the most tokens ('' on a full hit)
    losses: dict[str, int]  # tokens not reused, by cause (see workbench.lab.misses)
    explanation: str  # the same in plain words
    ttft_s: float
    prefill_s: float
    restore_s: float
    save_s: float
    bytes_written: int
    bytes_read: int
    saves: list[dict] = field(default_factory=list)  # reason, key, tokens, bytes, status
    evictions: list[dict] = field(default_factory=list)  # key, tokens, bytes, reason, by
    recorded: dict = field(default_factory=dict)  # what the trace says happened
    disk_bytes: int = 0  # bytes of the simulated directory after the request


@dataclass
class ReplayResult:
    """Per-request results and the totals of one replay."""

    policy: str
    budget_mb: float | None
    requests: list[RequestResult]
    schedule: str = ""  # optimal: the run whose schedule it is (clairvoyant or a preset)
    kv_layout: str = "flat"
    peak_disk_bytes: int = 0  # the simulated directory's largest size (right after a save)

    def summary(self) -> dict:
        """Totals: tokens, cached tokens and their share, TTFT, bytes written and read, disk
        used at the end and at its peak, losses by cause."""
        reqs = self.requests
        prompt = sum(r.prompt_tokens for r in reqs)
        cached = sum(r.cached_tokens for r in reqs)
        losses: dict[str, int] = {}
        for r in reqs:
            for k, v in r.losses.items():
                losses[k] = losses.get(k, 0) + v
        return {
            "policy": self.policy, "budget_mb": self.budget_mb, "schedule": self.schedule or self.policy,
            "requests": len(reqs),
            "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_ratio": cached / prompt if prompt else 0.0,
            "disk_hits": sum(r.source == "disk" for r in reqs), "live_hits": sum(r.source == "live" for r in reqs),
            "ttft_s": sum(r.ttft_s for r in reqs), "bytes_written": sum(r.bytes_written for r in reqs),
            "bytes_read": sum(r.bytes_read for r in reqs), "kv_layout": self.kv_layout,
            "disk_bytes": reqs[-1].disk_bytes if reqs else 0, "peak_disk_bytes": self.peak_disk_bytes,
            "saves": sum(sum(s["status"] == "saved" for s in r.saves) for r in reqs),
            "evictions": sum(len(r.evictions) for r in reqs), "losses": losses,
        }

    def rows(self) -> list[dict]:
        """One flat dict per request (for a DataFrame or --json)."""
        return [{k: v for k, v in r.__dict__.items()} for r in self.requests]


class Replay:
    """The engine's request loop over a simulated checkpoint directory."""

    def __init__(self, trace: Trace, policy: KVPolicy, rates: Rates, clairvoyant: bool = False,
                 name: str | None = None, kv_layout: str | None = None, max_depth: int = MAX_DEPTH) -> None:
        self.kv_layout = kv_layout or trace.header.kv_layout
        if self.kv_layout not in LAYOUTS:
            raise ValueError(f"kv layout {self.kv_layout!r}, expected one of {', '.join(LAYOUTS)}")
        self.max_depth = max_depth
        self.peak_disk = 0
        self.trace = trace
        self.policy = policy
        self.rules = policy.eviction_rules()
        self.rates = rates
        self.clairvoyant = clairvoyant
        self.name = name or ("optimal" if clairvoyant else policy.eviction)
        self.layout = trace.header.state_layout()
        self.ctx = int(trace.header.ctx)
        self.checksum = bool(trace.header.checksum)
        self.budget = None if policy.budget_mb is None else int(policy.budget_mb * MiB)
        self.entries: dict[str, SimEntry] = {}
        self.schedule = ContinuedSchedule(policy)
        self.history: list[Checkpoint] = []  # every checkpoint ever written or attempted
        self._live: tuple[TraceRequest, int, list[int]] | None = None  # text, bytes, token ends
        self._saved_len = -1
        self._uses: dict[str, list[int]] = {}
        self._index = 0
        reqs = trace.requests
        # the live state before request i is request i-1's text: live hits do not depend on the disk
        self._live_ok = [i > 0 and r.matches(reqs[i - 1].text_bytes, reqs[i - 1].key(reqs[i - 1].text_bytes) or "")
                         and r.char_boundary(reqs[i - 1].text_bytes) for i, r in enumerate(reqs)]

    # ---- sizes and times --------------------------------------------------------------------
    def file_size(self, tokens: int, text_bytes: int) -> int:
        """Exact bytes of the .kv file a save of ``tokens`` tokens with this text writes."""
        p = payload_size(self.layout, tokens, self.ctx)
        return TEXT_OFFSET + text_bytes + p + (footer_bytes(p) if self.checksum else 0)

    def chain_parent(self, text: TraceRequest, nbytes: int, ends: list[int]) -> SimEntry | None:
        """The checkpoint a chain save of ``text[:nbytes]`` (token ends ``ends``) extends, as
        ``KVStore`` chooses it: the longest stored text that prefixes it with a prefix of its
        tokens; None for a base (none, or that one is ``max_depth`` links deep)."""
        best = None
        for e in self.entries.values():
            if (e.text_bytes < nbytes and e.tokens < len(ends) and (best is None or e.text_bytes > best.text_bytes)
                    and e.ends == ends[:e.tokens] and text.matches(e.text_bytes, e.key)):
                best = e
        return None if best is None or best.depth + 1 > self.max_depth else best

    def _pinned(self) -> set[str]:
        """Keys of the checkpoints another one extends (never evicted while it stays)."""
        return {e.parent for e in self.entries.values() if e.parent is not None}

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> ReplayResult:
        out = []
        for i, req in enumerate(self.trace.requests):
            self._index = i
            out.append(self._request(req))
            out[-1].disk_bytes = self._total()
        return ReplayResult(self.name, self.policy.budget_mb, out, kv_layout=self.kv_layout,
                            peak_disk_bytes=self.peak_disk)

    def _request(self, req: TraceRequest) -> RequestResult:
        now = req.time
        saves: list[dict] = []
        evictions: list[dict] = []
        restore_bytes = 0
        rejected_cut = 0  # tokens of a text-prefix match lost because the cut splits a character
        ends, source = None, "none"
        live = self._live
        if live is not None and req.matches(live[1], live[0].key(live[1]) or ""):
            if req.char_boundary(live[1]):
                ends, source = live[2] + [e for e in req.token_ends if e > live[1]], "live"
            else:
                rejected_cut = len(live[2])
        if ends is None:
            live_n = len(live[2]) if live is not None else 0
            protect = self.policy.protect_hit
            hit = self._lookup(req) if protect else None
            if live is not None and self.policy.evict_due(live_n) and live_n != self._saved_len:
                self._save("evict", live[0], live[1], live[2], now, saves, evictions,
                           keep={hit.key} if hit is not None else set())
            elif live is not None and live_n != self._saved_len:
                self.history.append(Checkpoint(live[0], live[1], live[0].key(live[1]) or "", live_n,
                                               "dropped-live", self._index))
            if not protect:
                hit = self._lookup(req)
            if hit is not None:
                self._load(hit, now)
                restore_bytes = self.file_size(hit.tokens, hit.text_bytes)
                if req.char_boundary(hit.text_bytes):
                    ends, source = hit.ends + [e for e in req.token_ends if e > hit.text_bytes], "disk"
                    self._live = (hit.text, hit.text_bytes, hit.ends)
                    self._saved_len = hit.tokens
                    self.schedule.loaded(hit.tokens)
                else:
                    rejected_cut = max(rejected_cut, hit.tokens)
            if ends is None:
                ends = list(req.token_ends)
                self._live = None
                self._saved_len = -1
        cached = 0 if source == "none" else (len(self._live[2]) if self._live else 0)
        if source == "none":
            self.schedule.reset()
        plan = plan_saves(self.policy, self.schedule, self._marker_tokens(req, ends), cached, source, USER, ASSISTANT)
        pos = cached
        for end, reason in sorted(plan.stops.items()) + [(len(ends), None)]:
            pos = max(pos, end)
            if reason is not None and end == pos:
                self._save(reason, req, ends[end - 1], ends[:end], now, saves, evictions, keep=set())
        # decode: the live state is this request's whole text
        self._live = (req, req.text_bytes, ends + [req.prompt_bytes + g for g in req.generated_ends])
        written = sum(s["bytes"] for s in saves if s["status"] == "saved")
        prefill_s = (len(ends) - cached) / self.rates.prefill_tps
        restore_s = restore_bytes / self.rates.read_bps
        save_s = written / self.rates.write_bps
        losses = explain_losses(req, self.trace.requests[: self._index], self.history, cached, len(ends),
                                self.policy.min_tokens, rejected_cut)
        lost = {k: v for k, v in losses.items() if k != "first-seen" and v}
        main = max(lost, key=lost.get) if lost else ("first-seen" if losses.get("first-seen") else "")
        return RequestResult(req.request, req.conversation, source, len(ends), cached, main, losses,
                             plain_words(losses, source, self.history, req), restore_s + prefill_s + save_s,
                             prefill_s, restore_s, save_s, written, restore_bytes, saves, evictions,
                             dict(req.recorded))

    # ---- store operations ---------------------------------------------------------------------
    def _lookup(self, req: TraceRequest) -> SimEntry | None:
        """The longest stored text that prefixes the prompt, with at least min_tokens tokens:
        the store's own decision (``kv.lookup.decide``) when the trace keeps its texts."""
        data = req.data()
        if data is not None:
            return decide(data[: req.prompt_bytes], self.entries, self.ctx, LookupRules(self.policy.min_tokens),
                          lambda e: req.matches(e.text_bytes, e.key)).hit
        best = None
        for e in self.entries.values():
            if e.text_bytes > req.prompt_bytes or e.tokens < self.policy.min_tokens:
                continue
            if (best is None or e.text_bytes > best.text_bytes) and req.matches(e.text_bytes, e.key):
                best = e
        return best

    def _load(self, e: SimEntry, now: float) -> None:
        e.hits += 1
        e.last_used = int(now)
        if self.policy.consume_on_load(e.tokens) and e.key not in self._pinned():  # a parent stays
            del self.entries[e.key]
            self._mark(e.key, "consumed", self._index, "restore")

    def _save(self, reason: str, text: TraceRequest, nbytes: int, ends: list[int], now: float, saves: list[dict],
              evictions: list[dict], keep: set[str]) -> None:
        key = text.key(nbytes) or f"{text.request}:{nbytes}"
        tokens = len(ends)
        record = {"reason": reason, "key": key, "tokens": tokens, "bytes": 0, "status": "saved"}
        saves.append(record)
        if key in self.entries:
            self.entries[key].last_used = int(now)
            record["status"] = "exists"
            self._stored(reason, tokens)
            return
        parent = self.chain_parent(text, nbytes, ends) if self.kv_layout == "chain" else None
        size = self.file_size(tokens, nbytes) if self.kv_layout == "flat" else \
            chain_size(self.layout, tokens, parent.tokens if parent else 0, self.ctx, nbytes, self.checksum)
        spared = {key} | (keep if self.rules.protect_hit else set()) | ({parent.key} if parent else set())
        if not self.rules.admits(size, self.budget):
            record["status"] = "skipped"
            self.history.append(Checkpoint(text, nbytes, key, tokens, "not-saved", self._index, reason))
            return
        if self.budget is not None and self.rules.pre_write:
            self._evict(size, spared, now, evictions, reason, text, nbytes)
            if self._total() + size > self.budget:
                record["status"] = "skipped"
                self.history.append(Checkpoint(text, nbytes, key, tokens, "not-saved", self._index, reason))
                return
        self.entries[key] = SimEntry(key, text, nbytes, list(ends), size, SaveReason[reason.upper()], int(now),
                                     int(now), 0, self._index, parent.key if parent else None,
                                     parent.depth + 1 if parent else 0)
        self.peak_disk = max(self.peak_disk, self._total())
        self.history.append(Checkpoint(text, nbytes, key, tokens, "stored", self._index, reason))
        record["bytes"] = size
        if self.budget is not None and self.rules.post_write:
            self._evict(0, spared, now, evictions, reason, None, 0)
        self._stored(reason, tokens)

    def _stored(self, reason: str, tokens: int) -> None:
        self._saved_len = tokens
        if reason in ("cold", "continued"):
            self.schedule.stored(tokens)

    def _total(self) -> int:
        return sum(e.size for e in self.entries.values())

    def _evict(self, incoming: int, spared: set[str], now: float, evictions: list[dict], by: str,
               text: TraceRequest | None, nbytes: int) -> None:
        """Evict as the store does: flat, the whole plan; chain, the plan's first victim
        among the checkpoints nothing extends, then plan again (a parent may follow)."""
        while True:
            pinned = self._pinned() if self.kv_layout == "chain" else set()
            cands = [Candidate(e.key, e.tokens, e.size, e.hits, e.last_used, e.created_at, e.reason,
                               text is not None and e.reason == SaveReason.CONTINUED and e.text_bytes < nbytes
                               and text.matches(e.text_bytes, e.key))
                     for e in self.entries.values() if e.key not in pinned]
            if self.clairvoyant:
                victims = self._belady(cands, incoming, spared)
            else:
                victims = plan_eviction(cands, self._total(), self.budget, self.rules, now, incoming, spared)
            if not victims:
                return
            self._drop(victims if self.kv_layout == "flat" else victims[:1], now, evictions, by)
            if self.kv_layout == "flat":
                return

    def _drop(self, victims: list[Candidate], now: float, evictions: list[dict], by: str) -> None:
        for c in victims:
            e = self.entries.pop(c.key)
            evictions.append({"key": e.key, "tokens": e.tokens, "bytes": e.size, "reason": e.reason.name.lower(),
                              "by": by, "score": keep_value(c, now, self.rules)[0]})
            self._mark(e.key, "evicted", self._index, by)

    def _mark(self, key: str, status: str, request: int, by: str) -> None:
        for cp in reversed(self.history):
            if cp.key == key and cp.status == "stored":
                cp.status, cp.by_request, cp.by = status, request, by
                return

    # ---- clairvoyance ------------------------------------------------------------------------
    def _next_use(self, key: str) -> int | None:
        """The first request, from the current one on, that would load this checkpoint from
        disk (its text prefixes the prompt and the live state cannot serve it)."""
        if key not in self._uses:
            e = self.entries[key]
            reqs = self.trace.requests
            self._uses[key] = [i for i in range(e.request, len(reqs))
                               if not self._live_ok[i] and reqs[i].matches(e.text_bytes, e.key)]
        for i in self._uses[key]:
            if i >= self._index:
                return i
        return None

    def _belady(self, cands: list[Candidate], incoming: int, spared: set[str]) -> list[Candidate]:
        def order(c: Candidate) -> tuple:
            nxt = self._next_use(c.key)
            if nxt is None:
                return (0, -c.size)
            return (1, -(nxt - self._index + 1) * c.size)

        pool = sorted((c for c in cands if not (c.key in spared and c.size <= (self.budget or 0))), key=order)
        over, out = self._total() + incoming, []
        for c in pool:
            if over <= (self.budget or 0):
                break
            out.append(c)
            over -= c.size
        return out

    @staticmethod
    def _marker_tokens(req: TraceRequest, ends: list[int]) -> list[int]:
        """A token list with the chat markers at their positions (for ds4's chat anchor)."""
        at = {e: i for i, e in enumerate(ends)}
        toks = [0] * len(ends)
        for u in req.user_ends:
            if u in at:
                toks[at[u]] = USER
        if req.assistant_end is not None and req.assistant_end in at:
            toks[at[req.assistant_end]] = ASSISTANT
        return toks


def replay(trace: Trace, policy: KVPolicy, rates: Rates, clairvoyant: bool = False,
           name: str | None = None, kv_layout: str | None = None) -> ReplayResult:
    """Run one replay (see :class:`Replay`)."""
    return Replay(trace, policy, rates, clairvoyant, name, kv_layout).run()


def recorded_policy(trace: Trace) -> KVPolicy:
    """The save and eviction policy the trace was recorded under (its header), ds4's
    defaults for anything it does not say."""
    names = set(KVPolicy.__dataclass_fields__)
    return KVPolicy(**{k: v for k, v in (trace.header.policy or {}).items() if k in names and k != "reason_weights"})


def trace_rates(trace: Trace, fallback: str = "m3-max") -> Rates:
    """The rates measured when the trace was recorded, else ds4's published ``fallback``."""
    r = trace.header.rates or {}
    base = RATE_PRESETS[fallback]
    return Rates(float(r.get("prefill_tps") or base.prefill_tps), float(r.get("write_bps") or base.write_bps),
                 float(r.get("read_bps") or base.read_bps))

