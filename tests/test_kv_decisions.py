"""The store's lookup decision as a pure function over checkpoint metadata: simulated
checkpoints (no files) get the same answers the store gives on disk; the store's
eviction runs ``kv.eviction.plan_eviction`` on its entries (tested in test_kv_store)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import pytest
from test_kv_format import SMALL

from workbench.kv.eviction import plan_eviction
from workbench.kv.header import SaveReason
from workbench.kv.lookup import LookupRules, decide, prefix_candidates
from workbench.kv.maintenance import candidate
from workbench.kv.store import KVStore
from workbench.state import random_state

CTX = 4096


@dataclass(frozen=True)
class Sim:
    """A simulated checkpoint: the metadata the decisions read, and its text."""

    text: bytes
    tokens: int
    ctx: int = CTX
    quant_bits: int = 2
    model_id: int = 0
    file_size: int = 1000
    last_used: int = 0
    created_at: int = 0
    hits: int = 0

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.text).hexdigest()

    @property
    def text_bytes(self) -> int:
        return len(self.text)


def index_of(*sims: Sim) -> dict[str, Sim]:
    return {s.sha: s for s in sims}


def test_longest_prefix_wins_and_misses_say_why() -> None:
    a, b, c = Sim(b"sys", 600), Sim(b"sys+user", 700), Sim(b"other", 900)
    idx = index_of(a, b, c)
    rules = LookupRules(min_tokens=512)
    assert prefix_candidates(b"sys+user+more", idx) == [b, a]
    same = lambda s: True  # noqa: E731 - the stored text is the simulated one
    assert decide(b"sys+user+more", idx, CTX, rules, same).hit is b
    d = decide(b"sys+user+more", idx, CTX, LookupRules(min_tokens=800), same)
    assert d.hit is None and d.reason == "below-min-tokens" and d.candidates == 2
    assert decide(b"sy!", idx, CTX, rules, same).reason == "no-prefix-match"
    assert decide(b"x", {}, CTX, rules, same).reason == "no-entries"
    small = decide(b"sys+user+more", index_of(Sim(b"sys", 600, ctx=8192)), CTX, rules, same)
    assert small.reason == "ctx-too-large"
    assert decide(b"sys+", index_of(Sim(b"sys", 600, model_id=1)), CTX, rules, same).reason == "model-mismatch"
    strict = LookupRules(512, quant_bits=4, reject_different_quant=True)
    assert decide(b"sys+", idx, CTX, strict, same).reason == "quant-mismatch"
    # the winner's text is confirmed; a failure falls back to the next shorter prefix
    assert decide(b"sys+user+more", idx, CTX, rules, lambda s: s is not b).hit is a
    assert decide(b"sys+user+more", idx, CTX, rules, same, failed={b.sha}).hit is a


def test_store_decisions_match_the_pure_functions_on_disk(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=64, maintain=False)
    texts = ["p" * 80, "p" * 120, "q" * 90]
    for i, t in enumerate(texts):
        st.save(random_state(SMALL, 100 + 50 * i, CTX, seed=i), t, SaveReason.COLD)
    entries = {e.sha: e for e in st.entries()}
    prompt = ("p" * 150).encode()
    pure = decide(prompt, entries, CTX, st.rules, lambda e: True)
    assert st.lookup(prompt, CTX) == pure.hit and pure.hit.text_bytes == 120
    total = st.total_bytes()
    budget = total - 1
    victims = plan_eviction([candidate(e, b"") for e in entries.values()], total, budget, st.eviction, time.time())
    got = [e.path for e in st.evict_to_budget(budget_mb=budget / 2**20, dry_run=True)]
    assert got == [entries[c.key].path for c in victims] and len(got) == 1


@pytest.mark.parametrize("reason", [SaveReason.COLD, SaveReason.CONTINUED])
def test_entries_expose_the_metadata_the_decisions_read(tmp_path, reason) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, maintain=False)
    st.save(random_state(SMALL, 10, CTX), "abc", reason)
    (e,) = st.entries()
    assert (e.sha, e.tokens, e.text_bytes, e.ctx, e.quant_bits, e.reason) == (
        hashlib.sha1(b"abc").hexdigest(), 10, 3, CTX, 2, reason)
    assert e.file_size == e.path.stat().st_size and e.last_used == e.created_at > 0 and e.hits == 0
