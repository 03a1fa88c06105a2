"""When and where to write KV checkpoints, and which to evict: ds4-server's rules, pure.

Defaults are ds4's (``ds4_kvstore_default_options``): min 512 tokens, cold saves up to
30,000 tokens, a continued save every 10,000 tokens rounded up to the 2,048 alignment
(so every 10,240), cold boundaries trimmed by 32 tokens and aligned down to 2,048, a
4,096 MiB disk budget, hit evidence halving every 6 h. Departures, all opt-in or
additive: ``cold_target`` says *why* there is no cold save (ds4 is silent above
cold_max, issue #392) and can save long prompts at a boundary below cold_max
(``cold_long_prompts``); eviction weights files by save reason (cold/evict/shutdown x2,
as later upstream ds4 does); consuming a restored file is a separate setting
(``consume_on_load_above``, issue #673) instead of being tied to cold_max.

Token counts are checkpoint lengths in tokens; times are Unix seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from workbench.errors import WorkbenchError
from workbench.kv.format import SaveReason

HIT_HALF_LIFE_S = 21600.0  # ds4: hits lose half their weight every 6 hours
MIN_EFFECTIVE_HITS = 0.01  # ds4: decayed hit evidence below this counts as none
DEFAULT_REASON_WEIGHTS: Mapping[SaveReason, float] = {
    SaveReason.COLD: 2.0, SaveReason.EVICT: 2.0, SaveReason.SHUTDOWN: 2.0,
}


class KVPolicyError(WorkbenchError):
    """Inconsistent cache policy settings."""


def chat_anchor(tokens: Sequence[int], user_id: int | None, assistant_id: int | None, min_tokens: int) -> int | None:
    """Position of the last ``<｜User｜>`` marker before the first ``<｜Assistant｜>`` one.

    That prefix is the system prompt, tools and stable scaffolding before the message
    carrying this request's task. None when there is no such marker, the position is
    below ``min_tokens``, or the marker ids are missing/negative.
    """
    if user_id is None or assistant_id is None or user_id < 0 or assistant_id < 0:
        return None
    last_user = None
    for i, tok in enumerate(tokens):
        if tok == assistant_id:
            break
        if tok == user_id:
            last_user = i
    return last_user if last_user is not None and last_user >= min_tokens else None


@dataclass(frozen=True)
class ColdTarget:
    """Where a cold save goes (``length`` tokens, None: no cold save) and why."""

    length: int | None
    reason: str  # anchor | aligned | whole-prompt | long-prompt-anchor | long-prompt-aligned
    # | disabled | below-min-tokens | above-cold-max


@dataclass(frozen=True)
class KVPolicy:
    """Disk-cache settings, ds4's defaults; every method is a pure function of them."""

    min_tokens: int = 512
    cold_max_tokens: int = 30000  # 0 disables cold saves
    continued_interval: int = 10000  # 0 disables continued saves
    boundary_trim: int = 32
    boundary_align: int = 2048  # 0: no alignment (also makes the continued step exact)
    budget_mb: float | None = 4096.0  # None: no limit
    half_life_s: float = HIT_HALF_LIFE_S
    reason_weights: Mapping[SaveReason, float] = field(default_factory=lambda: dict(DEFAULT_REASON_WEIGHTS), hash=False)
    cold_long_prompts: bool = False  # save prompts above cold_max at a boundary below it
    consume_on_load_above: int | None = None  # delete restored files deeper than this

    def __post_init__(self) -> None:
        if self.min_tokens <= 0:
            raise KVPolicyError(f"min_tokens must be > 0, got {self.min_tokens}")
        for name in ("cold_max_tokens", "continued_interval", "boundary_trim", "boundary_align"):
            if getattr(self, name) < 0:
                raise KVPolicyError(f"{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.cold_max_tokens < self.min_tokens:
            raise KVPolicyError(f"cold_max_tokens {self.cold_max_tokens} must be 0 or >= min_tokens {self.min_tokens}")
        if self.budget_mb is not None and not (0 < self.budget_mb and math.isfinite(self.budget_mb)):
            raise KVPolicyError(f"budget_mb must be a finite number > 0, or None, got {self.budget_mb}")
        if not (0 < self.half_life_s and math.isfinite(self.half_life_s)):
            raise KVPolicyError(f"half_life_s must be > 0, got {self.half_life_s}")
        if not all(0 < w and math.isfinite(w) for w in self.reason_weights.values()):
            raise KVPolicyError(f"reason weights must be > 0: {dict(self.reason_weights)}")

    # ---- where ----------------------------------------------------------------------
    def store_len(self, prompt_len: int) -> int:
        """Cold boundary without an anchor: trim the tail, align down, else the whole prompt."""
        if prompt_len > self.min_tokens + self.boundary_trim:
            stable = prompt_len - self.boundary_trim
            if self.boundary_align:
                stable -= stable % self.boundary_align
            if stable >= self.min_tokens:
                return stable
        return prompt_len

    def cold_target(self, tokens: Sequence[int], user_id: int | None = None,
                    assistant_id: int | None = None) -> ColdTarget:
        """Where to cold-save a prompt that got no cache hit (its token ids ``tokens``)."""
        n = len(tokens)
        if self.cold_max_tokens == 0:
            return ColdTarget(None, "disabled")
        if n < self.min_tokens:
            return ColdTarget(None, "below-min-tokens")
        anchor = chat_anchor(tokens, user_id, assistant_id, self.min_tokens)
        if n <= self.cold_max_tokens:
            return ColdTarget(anchor, "anchor") if anchor is not None else \
                ColdTarget(self.store_len(n), "aligned" if self.store_len(n) < n else "whole-prompt")
        if not self.cold_long_prompts:
            return ColdTarget(None, "above-cold-max")
        if anchor is not None and anchor <= self.cold_max_tokens:
            return ColdTarget(anchor, "long-prompt-anchor")
        stable = min(n - self.boundary_trim, self.cold_max_tokens)
        if self.boundary_align:
            stable -= stable % self.boundary_align
        return ColdTarget(stable, "long-prompt-aligned") if stable >= self.min_tokens else \
            ColdTarget(None, "above-cold-max")

    # ---- when -----------------------------------------------------------------------
    def continued_step(self) -> int:
        """Tokens between continued saves: the interval rounded up to the alignment (0: off)."""
        iv, al = self.continued_interval, self.boundary_align
        return -(-iv // al) * al if iv and al else iv

    def continued_due(self, live_len: int, last_store: int) -> bool:
        """A continued save is due at absolute multiples of the step past the last store."""
        step = self.continued_step()
        return bool(step) and live_len >= self.min_tokens and live_len % step == 0 and live_len > last_store

    def evict_due(self, live_len: int) -> bool:
        """Save the live state before it is replaced after a live-cache miss."""
        return live_len >= self.min_tokens

    def shutdown_due(self, live_len: int) -> bool:
        """Save the live state on a clean shutdown."""
        return live_len >= self.min_tokens

    def consume_on_load(self, tokens: int) -> bool:
        """Delete a file once restored (the live session owns that state now)."""
        return self.consume_on_load_above is not None and tokens > self.consume_on_load_above


@dataclass
class ContinuedSchedule:
    """The server's 'last stored' frontier for continued saves within one live session."""

    policy: KVPolicy
    last_store: int = 0

    def due(self, live_len: int) -> bool:
        return self.policy.continued_due(live_len, self.last_store)

    def stored(self, length: int) -> None:
        """A cold or continued save of ``length`` tokens succeeded."""
        self.last_store = max(self.last_store, length)

    def reset(self) -> None:
        """A complete miss: the live session starts over."""
        self.last_store = 0

    def loaded(self, length: int) -> None:
        """A disk hit restored ``length`` tokens."""
        self.last_store = length

    def claim_cold(self, cold_len: int) -> int | None:
        """Before prefilling to a cold save at a continued frontier, mark that frontier as
        done so it is not written twice; returns the value to ``rollback`` to if the cold
        save fails (None when ``cold_len`` is no frontier and nothing was claimed)."""
        step = self.policy.continued_step()
        if not step or cold_len % step or cold_len <= self.last_store:
            return None
        previous, self.last_store = self.last_store, cold_len
        return previous

    def rollback(self, previous: int | None) -> None:
        if previous is not None:
            self.last_store = previous


def effective_hits(hits: int, last_used: int, created_at: int, now: float,
                   half_life_s: float = HIT_HALF_LIFE_S) -> float:
    """Hit count decayed by age since last use (falling back to creation); < 0.01 counts as 0."""
    stamp = last_used or created_at
    if not hits or not stamp:
        return 0.0
    eff = hits * 2.0 ** (-max(0.0, now - stamp) / half_life_s)
    return eff if eff >= MIN_EFFECTIVE_HITS else 0.0


def eviction_score(tokens: int, file_size: int, hits: int, last_used: int, created_at: int,
                   reason: SaveReason, now: float, half_life_s: float = HIT_HALF_LIFE_S,
                   reason_weights: Mapping[SaveReason, float] | None = None) -> float:
    """ds4's keep-worthiness (eff_hits + 1) * tokens / bytes, times the save reason's weight.

    The lowest score is evicted first; ``reason_weights`` None uses the defaults, {} none.
    """
    weights = DEFAULT_REASON_WEIGHTS if reason_weights is None else reason_weights
    eff = effective_hits(hits, last_used, created_at, now, half_life_s)
    return (eff + 1.0) * tokens / max(1, file_size) * weights.get(SaveReason(reason), 1.0)
