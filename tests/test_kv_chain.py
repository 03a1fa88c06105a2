"""The chained layout: a growing conversation stored as a base plus deltas, restored
whole, exported byte-identical to the flat file, evicted leaf first, orphans found."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_kv_format import SMALL, assert_same_state, random_state

from workbench.cli import main as cli_main
from workbench.kv.chain import CHAIN_DIR, read_chain_header
from workbench.kv.errors import KVStoreError
from workbench.kv.header import TEXT_OFFSET, SaveReason, parse_header
from workbench.kv.index import NAME_RE
from workbench.kv.store import KVStore
from workbench.state import SessionState

CTX = 16384


def grown(full: SessionState, T: int, seed: int) -> SessionState:
    """``full`` cut to its first ``T`` tokens: the same appended rows (compressed, indexer,
    tokens), a different raw window, frontiers and logits (seeded), as a live session's."""
    fresh = random_state(SMALL, T, CTX, seed=seed)
    for ls_new, ls_full in zip(fresh.layers, full.layers):
        for name in ("comp", "idx"):
            if getattr(ls_full, name) is not None:
                setattr(ls_new, name, np.asarray(getattr(ls_full, name))[: np.asarray(getattr(ls_new, name)).shape[0]])
    fresh.tokens = list(full.tokens[:T])
    return fresh


def conversation(turns: int = 6, step: int = 2000) -> list[tuple[SessionState, bytes]]:
    """A conversation's checkpoints: each text and state extends the previous one."""
    full = random_state(SMALL, turns * step + 1, CTX, seed=99)
    text = b""
    out = []
    for t in range(1, turns + 1):
        text += f"<turn {t}> ".encode() + bytes([65 + t]) * 40
        out.append((grown(full, t * step, seed=t), text))
    return out


def disk_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != ".lock")


def payload_and_text(path: Path) -> tuple[bytes, bytes]:
    """(text, payload) bytes of a flat .kv file."""
    data = path.read_bytes()
    h = parse_header(data[:TEXT_OFFSET], str(path), len(data))
    return data[TEXT_OFFSET:h.payload_offset], data[h.payload_offset:h.payload_end]


def test_six_turn_chain_vs_flat_same_states_half_disk_and_exports_equal(tmp_path) -> None:
    """Acceptance: the same six turns saved flat and chained restore the same states; the
    chain uses at most half the disk; every chain entry exported equals the flat file."""
    flat = KVStore(tmp_path / "flat", budget_mb=None, min_tokens=1)
    chain = KVStore(tmp_path / "chain", budget_mb=None, min_tokens=1, kv_layout="chain")
    turns = conversation()
    for state, text in turns:
        assert flat.save(state, text, SaveReason.CONTINUED).saved
        assert chain.save(state, text, SaveReason.CONTINUED).saved
    entries = chain.entries()
    assert len(entries) == 6 and all(e.chained for e in entries)
    assert sorted(e.depth for e in entries) == [0, 1, 2, 3, 4, 5]
    assert disk_bytes(tmp_path / "chain") * 2 <= disk_bytes(tmp_path / "flat")
    for state, text in turns:
        hit_f, hit_c = flat.lookup(text + b" more", CTX, 1), chain.lookup(text + b" more", CTX, 1)
        assert hit_f.sha == hit_c.sha and hit_c.chained
        back_f, _ = flat.load(hit_f, SMALL, CTX)
        back_c, got = chain.load(hit_c, SMALL, CTX)
        assert got == text
        assert_same_state(back_f, back_c)
        assert_same_state(state, back_c)
        out = tmp_path / "export" / f"{hit_c.sha}.kv"
        out.parent.mkdir(exist_ok=True)
        chain.export(hit_c, out, SMALL)
        assert payload_and_text(out) == payload_and_text(hit_f.path)
    # a ds4-server sees no checkpoint of the chained directory
    assert not [p for p in (tmp_path / "chain").iterdir() if NAME_RE.match(p.name)]


def test_eviction_frees_leaves_first_and_never_breaks_a_chain(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain")
    turns = conversation(4, step=200)
    for state, text in turns:
        st.save(state, text, SaveReason.CONTINUED)
    total = st.total_bytes()
    sizes = {e.sha: e.file_size for e in st.entries()}
    leaf = max(st.entries(), key=lambda e: e.tokens)
    evicted = st.evict_to_budget(budget_mb=(total - 1) / 2**20)
    assert [ev.path.name[:40] for ev in evicted] == [leaf.sha]  # the parents are needed
    assert st.total_bytes() == total - sizes[leaf.sha]
    assert st.orphans() == []
    for e in st.entries():
        back, _ = st.load(e, SMALL, CTX)
        assert back.n_tokens == e.tokens
    with pytest.raises(KVStoreError, match="extend it"):
        st.remove(min(st.entries(), key=lambda e: e.tokens))
    st.evict_to_budget(budget_mb=1e-6)
    assert st.entries() == [] and st.total_bytes() == 0


def test_broken_chain_is_an_orphan_and_gc_removes_it(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain")
    for state, text in conversation(3, step=200):
        st.save(state, text, SaveReason.CONTINUED)
    base = min(st.entries(), key=lambda e: e.tokens)
    base.path.unlink()  # as a crash could not, but a user could
    stale = tmp_path / CHAIN_DIR / f"{'a' * 40}.kvd.tmp.999999999"
    stale.write_bytes(b"x")
    found = {p.name for p, _, _ in st.orphans()}
    assert len(found) == 3 and stale.name in found
    reps = st.verify(SMALL)
    assert sum(not r.ok for r in reps) == 2 and all("missing" in r.error for r in reps if not r.ok)
    assert len(st.remove_orphans()) == 3
    assert st.entries() == [] and st.orphans() == []


def test_chain_rebases_past_max_depth(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain", max_depth=2)
    turns = conversation(5, step=200)
    for state, text in turns:
        st.save(state, text, SaveReason.CONTINUED)
    assert [e.depth for e in sorted(st.entries(), key=lambda e: e.tokens)] == [0, 1, 2, 0, 1]
    assert_same_state(turns[-1][0], st.load(st.lookup(turns[-1][1], CTX, 1), SMALL, CTX)[0])


def test_chain_save_rebases_when_tokens_diverge(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain")
    (s1, t1), (s2, t2) = conversation(2, step=200)
    st.save(s1, t1, SaveReason.CONTINUED)
    s2.tokens = [(t + 1) % SMALL.n_vocab for t in s2.tokens]  # the same text re-tokenized differently
    st.save(s2, t2, SaveReason.CONTINUED)
    assert sorted(e.depth for e in st.entries()) == [0, 0]
    assert_same_state(s2, st.load(st.lookup(t2, CTX, 1), SMALL, CTX)[0])


def test_cli_export_import_ls_verify_gc(tmp_path, capsys) -> None:
    flat = KVStore(tmp_path / "flat", budget_mb=None, min_tokens=1)
    for state, text in conversation(3, step=300):
        flat.save(state, text, SaveReason.CONTINUED)
    chain_dir = tmp_path / "chain"
    assert cli_main(["kv", "import", str(tmp_path / "flat"), "--into", str(chain_dir)]) == 0
    st = KVStore(chain_dir, budget_mb=None)
    assert sorted(e.depth for e in st.entries()) == [0, 1, 2]
    assert cli_main(["kv", "ls", str(chain_dir)]) == 0
    assert "chain" in capsys.readouterr().out
    for e in flat.entries():
        out = tmp_path / f"{e.sha}.kv"
        assert cli_main(["kv", "export", str(chain_dir), e.sha, "--out", str(out)]) == 0
        assert payload_and_text(out) == payload_and_text(e.path)
    leaf = max(st.entries(), key=lambda e: e.tokens)
    capsys.readouterr()
    assert cli_main(["kv", "show", str(leaf.path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [c["depth"] for c in shown["chain"]] == [0, 1, 2] and shown["header"]["tokens"] == 900
    assert cli_main(["kv", "verify", str(chain_dir)]) == 0
    assert cli_main(["kv", "gc", str(chain_dir)]) == 0
    assert os.listdir(chain_dir / CHAIN_DIR)
    h, ref = read_chain_header(max(st.entries(), key=lambda e: e.tokens).path)
    assert ref.depth == 2 and h.tokens == 900


def test_bench_kv_chain_figures(tmp_path) -> None:
    from workbench.bench import BenchContext, kvchain

    ctx = BenchContext("quick", tmp_path / "tiny.gguf", tmp_path / "work", tmp_path / "real")
    res = kvchain.run(ctx, n_layer=6, step=1024, n=8, workloads=())
    (row,) = res.tables["kv_chain"]
    assert row["chain_disk"] * 2 <= row["flat_disk"] and row["chain_written"] == row["chain_disk"]
    assert row["chain_depth"] == 7 and row["chain_restore_s"] > 0 and row["flat_restore_s"] > 0
    assert {f.name for f in res.figures} == {"chain.disk", "chain.written", "chain.restore"}
    assert not (tmp_path / "work" / "kv_chain" / "chain").exists()


@pytest.mark.slow
def test_bench_kv_chain_workload_figures(tmp_path, tiny_gguf) -> None:
    from workbench.bench import BenchContext, kvchain

    ctx = BenchContext("quick", tiny_gguf, tmp_path / "work", tmp_path / "real")
    res = kvchain.run(ctx, n_layer=4, step=256, n=2, workloads=("agent",))
    (row,) = res.tables[kvchain.WORKLOADS]
    assert row["requests"] >= 3 and row["entries"] >= 3 and row["max_depth"] >= 1
    assert row["chain_written"] < row["flat_written"] and row["chain_disk"] < row["flat_disk"]
    assert row["real_chain_written"] < row["real_flat_written"]
    assert {"chain.agent.written", "chain.agent.disk", "chain.agent.restore", "chain.agent.real_written"} <= \
        {f.name for f in res.figures}
    assert len(res.charts) == 2
