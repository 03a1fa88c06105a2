"""The replay agrees with the engine: a trace the engine recorded with a budget small
enough to evict replays, under the same policy and budget, to the same source and cached
tokens for every request and the same saves and evictions."""

from __future__ import annotations

import pytest

from workbench import workloads as wl
from workbench.engine import Engine, restrict
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.lab.record import record
from workbench.lab.replay import replay, trace_rates
from workbench.lab.trace import read_trace
from workbench.session import load


@pytest.fixture(scope="module")
def session(tiny_gguf):
    return load(tiny_gguf, ctx=8192)


@pytest.mark.parametrize("preset", ["ds4", "ds4-2026-05"])
def test_replay_reproduces_the_engine_under_eviction(session, tmp_path, preset):
    session.reset()
    policy = KVPolicy.preset(preset, min_tokens=256, boundary_align=256, continued_interval=512, budget_mb=6.0)
    engine = Engine(session, KVStore.from_policy(tmp_path / "kv", policy), policy)
    work = wl.multi_user(seed=1, users=3, turns=2, file_chars=400, max_tokens=3)
    recorded = record(engine, work, restrict(engine.tokenizer.text_token_mask()))
    # llama.cpp-style prompt progress rows: from the cached tokens up to the whole prompt
    df = engine.records
    for req, rows in df[df.event == "progress"].groupby("request"):
        line = recorded.requests[req]
        assert rows.processed.iloc[0] == rows.cache.iloc[0] == line.recorded["cached_tokens"]
        assert rows.processed.iloc[-1] == rows.total.iloc[-1] == line.prompt_tokens
        assert rows.processed.is_monotonic_increasing and rows.time_ms.is_monotonic_increasing
    path = recorded.write(tmp_path / "t.jsonl")
    trace = read_trace(path)
    evictions = sum(len(r.recorded["evictions"]) for r in trace.requests)
    assert evictions > 0, "the budget must be small enough to evict"
    assert {r.recorded["source"] for r in trace.requests} >= {"none", "disk"}
    result = replay(trace, policy, trace_rates(trace))
    for got, want in zip(result.requests, trace.requests):
        rec = want.recorded
        assert (got.source, got.cached_tokens) == (rec["source"], rec["cached_tokens"]), got.request
        assert [(s["reason"], s["key"], s["tokens"], s["status"]) for s in got.saves] == \
            [(s["reason"], s["key"], s["tokens"], s["status"]) for s in rec["saves"]], got.request
        assert [(e["key"], e["tokens"], e["bytes"]) for e in got.evictions] == \
            [(e["key"], e["tokens"], e["bytes"]) for e in rec["evictions"]], got.request
        assert [s["bytes"] for s in got.saves] == [s["bytes"] for s in rec["saves"]]  # exact sizes, no tensors
    # the hashed trace (private traffic) replays the same
    hashed = read_trace(recorded.write(tmp_path / "h.jsonl", hash_text=True))
    again = replay(hashed, policy, trace_rates(trace))
    assert [(r.source, r.cached_tokens) for r in again.requests] == [(r.source, r.cached_tokens) for r in result.requests]
