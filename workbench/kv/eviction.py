"""Which checkpoints to evict, and when: ds4's rules (today's and May 2026's) and simple
baselines, as pure functions over checkpoint metadata.

The store (``workbench.kv.store``) runs them on the files of a directory; the cache lab
(``workbench.lab.replay``) runs the very same functions on simulated checkpoints.

Presets (``EvictionRules.preset``), from ``ds4-kvcache-current.md`` §5 and ``ds4-kvcache.md`` §4:

============== ==========================================================================
``ds4``        ds4 today (upstream b030961): score (eff_hits + 1)·tokens/bytes, ×2 for
               cold/evict/shutdown files, ×(0.05 + 0.45·eff/(eff + 1)) for a continued file
               whose text is a strict prefix of the text being written; room is made
               *before* the write for the estimated size; nothing is protected; admission
               file + ⌈file/100⌉ ≤ budget. (ds4 runs no pass after the write; the store
               runs one sparing the new file, which only finds work when another process
               wrote meanwhile: ds4 has one writer, the workbench may have several.)
``ds4-2026-05`` ds4 on 2026-05-21: the plain score (no reason weights, no prefix penalty);
               admission file + ⌈file/100⌉ ≤ budget; the file is written, then one pass evicts
               with the new file protected (so an evict save may delete the checkpoint the
               lookup is about to load, ds4 #447/#448). Restores deeper than cold_max are
               consumed (``KVPolicy.preset``).
``lru``        ds4 today's mechanics, least recently used (last_used, else created) first.
``lfu``        ds4 today's mechanics, fewest hits first (then least recently used).
``size``       ds4 today's mechanics, largest file first.
============== ==========================================================================

``protect_hit`` (off in every preset) is the workbench's fix of #447/#448: the evict save's
pass spares the checkpoint the lookup just found. Sizes are bytes, times Unix seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from workbench.errors import WorkbenchError
from workbench.kv.header import SaveReason

HIT_HALF_LIFE_S = 21600.0  # ds4: hits lose half their weight every 6 hours
MIN_EFFECTIVE_HITS = 0.01  # ds4: decayed hit evidence below this counts as none
DS4_REASON_WEIGHTS: Mapping[SaveReason, float] = {
    SaveReason.COLD: 2.0, SaveReason.EVICT: 2.0, SaveReason.SHUTDOWN: 2.0,
}
ORDERS = ("score", "lru", "lfu", "size")


class EvictionError(WorkbenchError):
    """An unknown eviction preset or inconsistent rules."""


@dataclass(frozen=True)
class Candidate:
    """What eviction needs to know of one checkpoint."""

    key: str  # the file's SHA-1 stem (any unique id in a simulation)
    tokens: int
    size: int  # bytes on disk
    hits: int
    last_used: int  # Unix seconds (0: never)
    created_at: int  # Unix seconds
    reason: SaveReason
    prefix_of_incoming: bool = False  # its text is a strict prefix of the text being written


@dataclass(frozen=True)
class EvictionRules:
    """How a store makes room: the victim order and when the passes run."""

    name: str = "ds4"
    order: str = "score"  # score | lru | lfu | size
    reason_weights: Mapping[SaveReason, float] = field(default_factory=lambda: dict(DS4_REASON_WEIGHTS), hash=False)
    prefix_penalty: bool = True  # continued files that prefix the incoming text lose value
    pre_write: bool = True  # evict for the estimated size before writing
    post_write: bool = True  # one pass after the write, the new file protected
    protect_hit: bool = False  # the evict save's pass spares the lookup's hit (workbench fix)
    admission_slack: bool = True  # admit only when file + ceil(file/100) <= budget
    half_life_s: float = HIT_HALF_LIFE_S

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise EvictionError(f"eviction order {self.order!r}, expected one of {ORDERS}")
        if not (self.pre_write or self.post_write):
            raise EvictionError(f"eviction rules {self.name!r}: neither a pre-write nor a post-write pass")
        if not (0 < self.half_life_s and math.isfinite(self.half_life_s)):
            raise EvictionError(f"half_life_s must be > 0, got {self.half_life_s}")
        if not all(0 < w and math.isfinite(w) for w in self.reason_weights.values()):
            raise EvictionError(f"reason weights must be > 0: {dict(self.reason_weights)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "EvictionRules":
        """The rules called ``name`` (see the module table), with ``overrides`` applied."""
        if name not in PRESETS:
            raise EvictionError(f"unknown eviction policy {name!r}; expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def admits(self, size: int, budget: int | None) -> bool:
        """Whether a file of ``size`` bytes may be written at all under ``budget``."""
        if budget is None:
            return True
        return size + (-(-size // 100) if self.admission_slack else 0) <= budget


PRESETS: dict[str, EvictionRules] = {
    "ds4": EvictionRules(),
    "ds4-2026-05": EvictionRules("ds4-2026-05", reason_weights={}, prefix_penalty=False, pre_write=False,
                                 post_write=True),
    "lru": EvictionRules("lru", order="lru"),
    "lfu": EvictionRules("lfu", order="lfu"),
    "size": EvictionRules("size", order="size"),
}


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
                   reason_weights: Mapping[SaveReason, float] | None = None,
                   prefix_of_incoming: bool = False) -> float:
    """ds4's keep-worthiness (eff_hits + 1)·tokens/bytes, times the save reason's weight and,
    for a continued file that prefixes the incoming text, 0.05 + 0.45·eff/(eff + 1).

    The lowest score is evicted first; ``reason_weights`` None uses ds4's, {} none.
    """
    weights = DS4_REASON_WEIGHTS if reason_weights is None else reason_weights
    eff = effective_hits(hits, last_used, created_at, now, half_life_s)
    score = (eff + 1.0) * tokens / max(1, file_size) * weights.get(SaveReason(reason), 1.0)
    if prefix_of_incoming and SaveReason(reason) == SaveReason.CONTINUED:
        score *= 0.05 + 0.45 * eff / (eff + 1.0)
    return score


def keep_value(c: Candidate, now: float, rules: EvictionRules) -> tuple[float, float]:
    """Sort key of a candidate: the lowest is evicted first (ties: older last use first)."""
    age_key = float(c.last_used or c.created_at)
    if rules.order == "score":
        return (eviction_score(c.tokens, c.size, c.hits, c.last_used, c.created_at, c.reason, now,
                               rules.half_life_s, rules.reason_weights,
                               c.prefix_of_incoming and rules.prefix_penalty), age_key)
    if rules.order == "lru":
        return (age_key, 0.0)
    if rules.order == "lfu":
        return (float(c.hits), age_key)
    return (-float(c.size), age_key)


def plan_eviction(candidates: Sequence[Candidate], total: int, budget: int | None, rules: EvictionRules,
                  now: float, incoming: int = 0, keep: Iterable[str] = ()) -> list[Candidate]:
    """The victims, in eviction order, that bring ``total`` bytes plus ``incoming`` down to
    ``budget``. Keys in ``keep`` are spared unless the file alone exceeds the budget.
    Candidates come in a stable order (ties keep it). May not reach the budget (then the
    caller decides whether the write still fits)."""
    if budget is None:
        return []
    kept = set(keep)
    pool = [c for c in candidates if not (c.key in kept and c.size <= budget)]
    pool.sort(key=lambda c: keep_value(c, now, rules))
    out = []
    over = total + incoming
    for c in pool:
        if over <= budget:
            break
        out.append(c)
        over -= c.size
    return out
