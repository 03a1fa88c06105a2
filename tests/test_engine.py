"""The engine end to end on the tiny model: live and disk reuse, saves, records."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import workloads as wl
from workbench.engine import Engine, restrict
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.session import load
from workbench.telemetry import COLUMNS

POLICY = KVPolicy(min_tokens=256, boundary_align=256, continued_interval=1024, budget_mb=256)


@pytest.fixture(scope="module")
def session(tiny_gguf):
    return load(tiny_gguf, ctx=8192)


def _engine(session, tmp_path, policy=POLICY):
    session.reset()
    return Engine(session, KVStore.from_policy(tmp_path / "kv", policy), policy)


def _drive(engine, workload):
    """Run a workload; replies are restricted to whole-character tokens so that, as with a
    real model, the client's replayed transcript extends the live state byte for byte."""
    sampler = restrict(engine.tokenizer.text_token_mask())
    out = []
    for req, _ in workload.run(lambda r: (out.append(engine.complete(
            messages=r.messages, tools=r.tools, max_tokens=r.max_tokens, conversation=r.conversation,
            sampler=sampler)), out[-1].text)[1]):
        pass
    return out


def test_agent_turns_reuse_the_live_state(session, tmp_path):
    eng = _engine(session, tmp_path)
    outs = _drive(eng, wl.agent_session(seed=1, turns=3, file_chars=800, max_tokens=4, side_every=0))
    assert outs[0].usage.source == "none" and outs[0].usage.cached_tokens == 0
    for prev, cur in zip(outs, outs[1:]):
        assert cur.usage.source == "live"
        # everything the live state held (prompt + generated) is reused
        assert cur.usage.cached_tokens == prev.usage.prompt_tokens + len([t for t in prev.tokens if t != eng.tokenizer.eos])
        assert cur.usage.cache_write_tokens == cur.usage.prompt_tokens - cur.usage.cached_tokens > 0
    df = eng.records
    assert list(df.columns) == COLUMNS
    assert (df[df.event == "hit"].source == "live").sum() == 2
    assert df[df.event == "save"].reason.str.startswith("cold").sum() == 1


def test_agent_workload_hits_live_and_disk(session, tmp_path):
    eng = _engine(session, tmp_path)
    outs = _drive(eng, wl.agent_session(seed=4, turns=4, file_chars=700, max_tokens=4, side_every=2))
    # turn 1 extends the live state; the title request evicts it; turn 2 comes from disk
    assert [o.usage.source for o in outs] == ["none", "live", "none", "disk", "live"]
    assert outs[3].usage.cached_tokens > outs[1].usage.prompt_tokens
    req = eng.records[eng.records.event == "request"]
    assert (req.ttft_s[req.source != "none"] < req.full_prefill_s[req.source != "none"]).all()


def test_switching_users_evicts_and_comes_back_from_disk(session, tmp_path):
    eng = _engine(session, tmp_path)
    outs = _drive(eng, wl.multi_user(seed=2, users=2, turns=2, file_chars=700, max_tokens=4))
    assert [o.usage.source for o in outs] == ["none", "none", "disk", "disk"]
    df = eng.records
    assert (df[(df.event == "save")].reason == "evict").sum() == 3
    hits = df[(df.event == "hit") & (df.source == "disk")]
    assert len(hits) == 2 and (hits.restore_s > 0).all()
    # a disk hit restores exactly the evicted live state of that user
    assert outs[2].usage.cached_tokens == outs[0].usage.prompt_tokens + len(outs[0].tokens) - (eng.tokenizer.eos in outs[0].tokens)
    assert eng.close() is not None  # shutdown save of the last live state
    assert eng.records.iloc[-1].reason == "shutdown"


def test_disk_hit_logits_match_cold_prefill(session, tmp_path, tiny_gguf):
    """Restore + suffix prefill gives the same next-token logits as a full prefill."""
    eng = _engine(session, tmp_path)
    prompt_a = "Il lago di Como. " * 60
    first = eng.complete(prompt=prompt_a, max_tokens=1)
    eng.complete(prompt="Something unrelated entirely. " * 40, max_tokens=1)  # evicts A to disk
    eng.session.reset()
    eng._live_text = b""
    out = eng.complete(prompt=prompt_a, max_tokens=0)
    # the evict file holds A + its generated token, so it is no prefix of A: the cold
    # save at the trimmed, aligned boundary is the longest stored prefix
    assert out.usage.source == "disk"
    assert out.usage.cached_tokens == POLICY.store_len(first.usage.prompt_tokens) < first.usage.prompt_tokens
    cold = load(tiny_gguf, ctx=8192)
    cold.prefill(session.tokens)
    # restore at the boundary + a suffix chunk vs one cold chunk: the same math in another
    # float32 accumulation order (and an occasional FP8 rounding tie flipping), ~2e-4 here
    a, b = np.array(session.logits), np.array(cold.logits)
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
    assert list(np.argsort(-a)[:5]) == list(np.argsort(-b)[:5])


def test_corrupt_checkpoint_falls_back_and_is_kept(session, tmp_path):
    eng = _engine(session, tmp_path)
    eng.complete(prompt="Quel ramo del lago di Como. " * 40, max_tokens=1)
    eng.complete(prompt="Unrelated. " * 80, max_tokens=1)  # evict save of the first
    files = sorted((tmp_path / "kv").glob("*.kv"))
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        data[-200] ^= 0xFF  # inside payload / checksum region
        f.write_bytes(bytes(data))
    eng.session.reset()
    eng._live_text = b""
    out = eng.complete(prompt="Quel ramo del lago di Como. " * 40, max_tokens=1)
    assert out.usage.source == "none"
    assert (eng.records.event == "load_failed").sum() >= 1
    assert all(f.exists() for f in files)  # reported, never deleted


def test_records_come_from_the_store_events(session, tmp_path):
    """One event path: every save, eviction, disk load and disk miss row is one store event
    of this engine's calls, tagged with its request; the store's own use outside adds none."""
    from workbench.kv.events import Evicted, Loaded, Miss, Saved, SaveFailed, SaveSkipped

    eng = _engine(session, tmp_path)
    first = eng.complete(prompt="Quel ramo del lago di Como. " * 40, max_tokens=1)
    size = first.saves[0].bytes
    eng.store.budget_mb = 2.5 * size / 2**20  # room for two checkpoints: the next saves evict
    for i in range(3):  # three more conversations, each an evict and a cold save
        eng.complete(prompt=f"Conversation {i}. " + "Il lago di Como e le sue montagne. " * 40, max_tokens=1)
    eng.close()
    ev, df = list(eng.store.events), eng.records
    count = lambda *kinds: sum(isinstance(e, kinds) for e in ev)  # noqa: E731
    assert count(Evicted) >= 1 and (df.event == "evict").sum() == count(Evicted)
    assert (df.event == "save").sum() == count(Saved, SaveSkipped, SaveFailed)
    assert ((df.event == "hit") & (df.source == "disk")).sum() == count(Loaded)
    assert ((df.event == "miss") & (df.source == "disk")).sum() == count(Miss)
    evicts = df[df.event == "evict"]
    # each eviction is tagged with the request whose save made room (-1: the shutdown save)
    assert evicts.request.isin(df[df.event == "save"].request).all()
    assert (evicts.disk_bytes <= eng.store.budget_bytes).all()
    rows = len(df)
    eng.store.lookup("nothing stored starts like this", session.ctx)  # not the engine's call
    assert len(eng.records) == rows


def test_engine_kv_layout_chain_writes_and_restores_chains(session, tmp_path):
    """``Engine(kv_layout="chain")`` switches a flat store to chains: the evict save of a
    conversation extends its cold save (depth 1), restores to the evicted live state, and
    a disk hit restores from a chain entry; no flat file is written."""
    from test_kv_format import assert_same_state

    session.reset()
    store = KVStore.from_policy(tmp_path / "kv", POLICY)
    eng = Engine(session, store, POLICY, kv_layout="chain")
    assert store.kv_layout == "chain"
    prompt = "Quel ramo del lago di Como. " * 40
    eng.complete(prompt=prompt, max_tokens=1)
    live = session.snapshot()
    eng.complete(prompt="Unrelated. " * 8, max_tokens=0)  # evict save of the first conversation
    assert not list((tmp_path / "kv").glob("*.kv"))
    evict = next(e for e in store.entries() if e.reason.name == "EVICT" and e.tokens == live.n_tokens)
    assert evict.chained and evict.depth == 1 and evict.parent is not None
    assert_same_state(live, store.load(evict, session.layout, session.ctx)[0])
    session.reset()
    eng._live_text = b""
    out = eng.complete(prompt=prompt, max_tokens=0)
    assert out.usage.source == "disk"
    assert eng.records[eng.records.event == "hit"].iloc[-1].path.endswith(".kvd")
