"""When and where to write KV checkpoints, and which to evict: ds4-server's rules, pure.

Defaults are ds4's (``ds4_kvstore_default_options``): min 512 tokens, cold saves up to
30,000 tokens, a continued save every 10,000 tokens rounded up to the 2,048 alignment
(so every 10,240), cold boundaries trimmed by 32 tokens and aligned down to 2,048, a
4,096 MiB disk budget, hit evidence halving every 6 h, and today's ds4 eviction
(``eviction="ds4"``; ``KVPolicy.preset("ds4-2026-05")`` gives the May-2026 rules, see
``workbench.kv.eviction``). Departures, all opt-in or additive: ``cold_target`` says
*why* there is no cold save (ds4 is silent above cold_max, issue #392) and can save long
prompts at a boundary below cold_max (``cold_long_prompts``); consuming a restored file
is a separate setting (``consume_on_load_above``, issue #673) instead of being tied to
cold_max; ``protect_hit`` spares the checkpoint a lookup found from the evict save's
eviction (issues #447/#448).

Token counts are checkpoint lengths in tokens; times are Unix seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from workbench.errors import WorkbenchError
from workbench.kv.eviction import (  # noqa: F401  (effective_hits, eviction_score: re-exported)
    HIT_HALF_LIFE_S, PRESETS, EvictionError, EvictionRules, effective_hits, eviction_score,
)
from workbench.kv.header import SaveReason


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
    reason_weights: Mapping[SaveReason, float] | None = None  # None: the eviction preset's
    cold_long_prompts: bool = False  # save prompts above cold_max at a boundary below it
    consume_on_load_above: int | None = None  # delete restored files deeper than this
    eviction: str = "ds4"  # a preset of workbench.kv.eviction: ds4 | ds4-2026-05 | lru | lfu | size
    protect_hit: bool = False  # the evict save's eviction spares the checkpoint about to be loaded

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
        try:
            self.eviction_rules()
        except EvictionError as err:
            raise KVPolicyError(str(err)) from None

    @classmethod
    def preset(cls, name: str, **overrides) -> "KVPolicy":
        """ds4's save policy with the eviction preset ``name``; ``ds4-2026-05`` also consumes
        restores deeper than cold_max, as ds4 did then."""
        if name not in PRESETS:
            raise KVPolicyError(f"unknown eviction policy {name!r}; expected one of {sorted(PRESETS)}")
        policy = cls(eviction=name, **overrides)
        if name == "ds4-2026-05" and "consume_on_load_above" not in overrides and policy.cold_max_tokens:
            policy = replace(policy, consume_on_load_above=policy.cold_max_tokens)
        return policy

    def eviction_rules(self) -> EvictionRules:
        """The store's eviction rules: the preset with this policy's weights, half-life and hit protection."""
        extra: dict = {"half_life_s": self.half_life_s, "protect_hit": self.protect_hit}
        if self.reason_weights is not None:
            extra["reason_weights"] = dict(self.reason_weights)
        return EvictionRules.preset(self.eviction, **extra)

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


@dataclass(frozen=True)
class SavePlan:
    """Where one request's prefill stops to save: {length: reason}, the cold note, and the
    continued frontier a cold save claimed (``ContinuedSchedule.rollback`` value)."""

    stops: dict[int, str]
    note: str
    cold_claim: int | None


def plan_saves(policy: KVPolicy, schedule: ContinuedSchedule, tokens: Sequence[int], start: int, source: str,
               user_id: int | None, assistant_id: int | None) -> SavePlan:
    """The saves a prefill of ``tokens[start:]`` makes (``source``: how the prefix was
    reused, live | disk | none): a cold save after a complete miss, continued saves at the
    due frontiers. Claims the cold frontier in ``schedule`` (the only state it changes)."""
    stops: dict[int, str] = {}
    note, claim = "", None
    if source == "none":
        target = policy.cold_target(tokens, user_id, assistant_id)
        if target.length is not None:
            stops[target.length] = "cold"
            claim = schedule.claim_cold(target.length)
        note = f"cold save: {target.reason}"
    step = policy.continued_step()
    if step:
        for frontier in range((start // step + 1) * step, len(tokens) + 1, step):
            if frontier not in stops and schedule.due(frontier):
                stops[frontier] = "continued"
    return SavePlan(stops, note, claim)
