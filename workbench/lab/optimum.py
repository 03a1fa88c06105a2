"""The optimum for a budget and the infinite-budget bound.

Choosing which checkpoints to keep with the future known is an offline caching problem
with sizes (NP-hard in general), so the optimum reported here is the best *schedule
found*, at the same save points as the policy (``KVPolicy``: cold, continued, evict):

* a clairvoyant replay (``Replay(clairvoyant=True)``: checkpoints never needed again go
  first, then the largest next-use distance × bytes, Belady by size);
* every online preset (``ds4``, ``ds4-2026-05``, ``lru``, ``lfu``, ``size``) at the same
  budget — each is a feasible schedule, so the optimum is never below any of them;
* across a sweep, the optimum at a smaller budget (a schedule that fits a budget fits a
  larger one), which makes it non-decreasing in the budget.

The infinite-budget bound is a replay with no budget (nothing is ever evicted); since a
different save history can, rarely, place better checkpoints, the reported bound is the
larger of that replay and every optimum, and ``bound_source`` says which it was.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from workbench.kv.eviction import PRESETS
from workbench.kv.policy import KVPolicy
from workbench.lab.replay import Rates, ReplayResult, replay
from workbench.lab.trace import Trace

ONLINE = tuple(PRESETS)  # ds4, ds4-2026-05, lru, lfu, size


def preset_policy(base: KVPolicy, name: str) -> KVPolicy:
    """``base``'s save policy and budget with the eviction preset ``name`` (and, for
    ds4-2026-05, its consume-on-load rule)."""
    consume = base.cold_max_tokens if name == "ds4-2026-05" and base.cold_max_tokens else base.consume_on_load_above
    return replace(base, eviction=name, consume_on_load_above=consume,
                   reason_weights=None if name != base.eviction else base.reason_weights)


def cached(result: ReplayResult) -> int:
    return sum(r.cached_tokens for r in result.requests)


def optimal(trace: Trace, base: KVPolicy, rates: Rates, others: Sequence[ReplayResult] = ()) -> ReplayResult:
    """The best schedule found for ``base.budget_mb`` (see the module docstring); its
    ``policy`` is ``optimal`` and ``schedule`` names the run it came from."""
    runs = [replay(trace, base, rates, clairvoyant=True, name="clairvoyant")]
    runs += [r for r in others if r.budget_mb == base.budget_mb]
    have = {r.policy for r in runs}
    runs += [replay(trace, preset_policy(base, p), rates, name=p) for p in ONLINE if p not in have]
    best = max(runs, key=cached)  # ties: the clairvoyant run, listed first
    return replace(best, policy="optimal", budget_mb=base.budget_mb, schedule=best.policy)


def infinite(trace: Trace, base: KVPolicy, rates: Rates) -> ReplayResult:
    """The replay with no budget (no eviction, no consume on load)."""
    return replay(trace, replace(base, budget_mb=None, consume_on_load_above=None), rates, name="infinite")
