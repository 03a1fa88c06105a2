"""The cache lab's replay accounts either store layout: under ``chain`` every save is the
size the chained store writes for it (the same parent, the same re-basing), eviction
never breaks a chain, and the CLI reports bytes written and disk used per layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_lab import RATES, req

from workbench.cli import main as cli_main
from workbench.kv.header import SaveReason
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.lab.replay import Replay
from workbench.lab.trace import Trace, TraceHeader
from workbench.state import random_state

LAYOUT = {"n_layer": 3, "head_dim": 8, "idx_dim": 4, "n_vocab": 16, "n_swa": 4, "ratios": [0, 4, 128]}
CTX = 4096
# every byte one token, continued saves every 16 tokens, whole-prompt cold saves
POLICY = KVPolicy(min_tokens=4, cold_max_tokens=1000, continued_interval=16, boundary_trim=0, boundary_align=0,
                  budget_mb=None)


def growing(turns: int = 6, step: int = 40) -> tuple[Trace, bytes]:
    """One conversation whose every prompt extends the previous one (live hits), and its text."""
    prompts = [b"".join(bytes([65 + i]) * step for i in range(t + 1)).decode() for t in range(turns)]
    recorded = {k: getattr(POLICY, k) for k in ("min_tokens", "cold_max_tokens", "continued_interval",
                                                 "boundary_trim", "boundary_align")}
    return Trace(TraceHeader(LAYOUT, CTX, policy=recorded), [req(i, p) for i, p in enumerate(prompts)]), \
        prompts[-1].encode()


@pytest.mark.parametrize("max_depth", [16, 2])
def test_chain_replay_sizes_are_the_chained_stores(tmp_path, max_depth) -> None:
    trace, text = growing()
    flat = Replay(trace, POLICY, RATES, kv_layout="flat").run()
    sim = Replay(trace, POLICY, RATES, kv_layout="chain", max_depth=max_depth)
    chain = sim.run()
    assert [r.cached_tokens for r in chain.requests] == [r.cached_tokens for r in flat.requests]
    saves = [s for r in chain.requests for s in r.saves if s["status"] == "saved"]
    assert len(saves) == 16 and max(e.depth for e in sim.entries.values()) == min(max_depth, 15)
    # the chained store, fed the same states in the same order, writes exactly these sizes
    layout = trace.header.state_layout()
    full = random_state(layout, len(text), CTX, seed=1)
    store = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain", max_depth=max_depth)
    for i, s in enumerate(saves):
        state = random_state(layout, s["tokens"], CTX, seed=2 + i)
        for mine, whole in zip(state.layers, full.layers):
            for name in ("comp", "idx"):
                if getattr(whole, name) is not None:
                    setattr(mine, name, np.asarray(getattr(whole, name))[: np.asarray(getattr(mine, name)).shape[0]])
        state.tokens = full.tokens[: s["tokens"]]
        res = store.save(state, text[: s["tokens"]], SaveReason[s["reason"].upper()])
        assert res.bytes == s["bytes"]
    s_chain, s_flat = chain.summary(), flat.summary()
    assert s_chain["kv_layout"] == "chain" and s_flat["kv_layout"] == "flat"
    assert s_chain["disk_bytes"] == s_chain["peak_disk_bytes"] == s_chain["bytes_written"] == store.total_bytes()
    assert s_chain["bytes_written"] < s_flat["bytes_written"] == s_flat["disk_bytes"]


def test_chain_replay_eviction_never_breaks_a_chain() -> None:
    a, _ = growing(3)
    b = [req(3 + r.request, r.rendered.lower(), "b") for r in a.requests]  # a second conversation
    trace = Trace(a.header, a.requests + b)
    unlimited = Replay(trace, POLICY, RATES, kv_layout="chain").run().summary()
    for budget in (0.5, 0.3):
        policy = KVPolicy(**{**POLICY.__dict__, "budget_mb": unlimited["disk_bytes"] * budget / 2**20})
        for clairvoyant in (False, True):
            sim = Replay(trace, policy, RATES, clairvoyant, kv_layout="chain")
            res = sim.run()
            assert sum(len(r.evictions) for r in res.requests) > 0
            assert all(e.parent is None or e.parent in sim.entries for e in sim.entries.values())
            assert max(r.disk_bytes for r in res.requests) <= policy.budget_mb * 2**20


def test_cli_replay_kv_layout(tmp_path, capsys) -> None:
    trace, _ = growing()
    path = trace.write(tmp_path / "t.jsonl")
    out = {}
    for layout in ("flat", "chain"):
        capsys.readouterr()
        assert cli_main(["lab", "replay", str(path), "--budget-mb", "0", "--kv-layout", layout, "--json"]) == 0
        out[layout] = json.loads(capsys.readouterr().out)["summary"]
    assert out["flat"].keys() == out["chain"].keys()
    assert out["chain"]["kv_layout"] == "chain" and out["chain"]["disk_bytes"] < out["flat"]["disk_bytes"]
    assert cli_main(["lab", "replay", str(path), "--budget-mb", "0", "--kv-layout", "chain"]) == 0
    assert "chain layout:" in capsys.readouterr().out
