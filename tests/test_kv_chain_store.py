"""Chain entries among the store's other files: one entry per name (a flat file wins over
a chain entry of its name), quarantine of a chain entry (its descendants go along, the
index forgets them), kv import reading each source file once."""

from __future__ import annotations

import json

from test_kv_chain import CTX, conversation
from test_kv_format import SMALL

import workbench.kv.chainstore as chainstore
from workbench.cli import main as cli_main
from workbench.kv.chain import CHAIN_DIR
from workbench.kv.header import SaveReason
from workbench.kv.index import QUARANTINE_DIR
from workbench.kv.store import KVStore


def test_a_flat_file_wins_over_the_chain_entry_of_its_name(tmp_path, capsys) -> None:
    conv = conversation(4, step=300)
    flat = KVStore(tmp_path, budget_mb=None, min_tokens=1)
    chain = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain")
    assert flat.save(*conv[0], SaveReason.CONTINUED).saved
    res = chain.save(*conv[0], SaveReason.CONTINUED)  # the flat file serves this name
    assert res.status == "exists" and res.path.suffix == ".kv"
    for state, text in conv[1:]:
        assert chain.save(state, text, SaveReason.CONTINUED).saved  # a base and two links
    assert flat.save(*conv[2], SaveReason.CONTINUED).saved  # a flat save always writes ds4's file
    sha2 = chain.lookup(conv[2][1], CTX, 1).sha
    for st in (flat, chain):
        entries = {e.sha: e for e in st.entries()}
        assert len(entries) == 4 and not entries[sha2].chained
        assert st.lookup(conv[2][1], CTX, 1).path == entries[sha2].path
        (shadow,) = [o for o in st.others() if o.kind == "shadowed"]
        assert shadow.path == tmp_path / CHAIN_DIR / f"{sha2}.kvd"
    assert chain.total_bytes() == sum(e.file_size for e in chain.entries()) + shadow.size
    capsys.readouterr()
    assert cli_main(["kv", "ls", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["entries"]) == 4 and [o["kind"] for o in listed["others"]] == ["shadowed"]
    assert chain.orphans() == []  # conv[3] restores through the shadowed copy: kept
    leaf = chain.lookup(conv[3][1], CTX, 1)
    assert leaf.chained and chain.load(leaf, SMALL, CTX)[0].n_tokens == leaf.tokens
    res = flat.save(*conv[3], SaveReason.CONTINUED)
    shadow3 = tmp_path / CHAIN_DIR / f"{leaf.sha}.kvd"
    assert res.saved and [p for p, _, _ in chain.orphans()] == [shadow3]  # nothing extends that copy
    assert [p for p, _, _ in chain.remove_orphans()] == [shadow3]
    # when the flat file of a name is evicted, its chain copy becomes the entry of that name
    evicted = chain.evict_to_budget(budget_mb=(shadow.size + 1) / 2**20)  # all but the copy's bytes
    assert sorted(e.path.suffix for e in evicted) == [".kv", ".kv", ".kv", ".kvd"]
    assert [e.path for e in chain.entries()] == [shadow.path] and chain.others() == []


def test_quarantine_moves_a_chain_entry_with_its_descendants(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain")
    conv = conversation(3, step=300)
    for state, text in conv:
        st.save(state, text, SaveReason.CONTINUED)
    total = st.total_bytes()
    base, mid, leaf = sorted(st.entries(), key=lambda e: e.tokens)
    dest = st.quarantine(mid.path, "test")
    assert dest == tmp_path / QUARANTINE_DIR / mid.path.name
    assert sorted(p.name for p in (tmp_path / QUARANTINE_DIR).iterdir()) == sorted([mid.path.name, leaf.path.name])
    assert [e.sha for e in st.index.entries().values()] == [base.sha]  # the index forgets them at once
    assert st.lookup(conv[-1][1], CTX, 1).sha == base.sha
    assert st.orphans() == [] and st.total_bytes() == total
    assert st.load(base, SMALL, CTX)[0].n_tokens == base.tokens


def test_verify_quarantine_of_a_corrupt_base_moves_the_chain(tmp_path) -> None:
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain")
    for state, text in conversation(3, step=300):
        st.save(state, text, SaveReason.CONTINUED)
    base = min(st.entries(), key=lambda e: e.tokens)
    data = bytearray(base.path.read_bytes())
    data[base.header.payload_offset + 300] ^= 0xFF
    base.path.write_bytes(bytes(data))
    reports = st.verify(SMALL, quarantine=True)
    assert [r.ok for r in reports] == [False] * 3
    assert st.entries() == [] and len(list((tmp_path / QUARANTINE_DIR).iterdir())) == 3


def test_import_reads_each_file_once(tmp_path, monkeypatch) -> None:
    flat = KVStore(tmp_path / "flat", budget_mb=None, min_tokens=1)
    for state, text in conversation(3, step=300):
        flat.save(state, text, SaveReason.CONTINUED)
    (tmp_path / "flat" / ("0" * 40 + ".kv")).write_bytes(b"not a checkpoint")
    reads = []
    real = chainstore.read_kv_file
    monkeypatch.setattr(chainstore, "read_kv_file", lambda f, *a, **k: reads.append(k["name"]) or real(f, *a, **k))
    saved = KVStore(tmp_path / "chain", budget_mb=None, kv_layout="chain").import_dir(tmp_path / "flat", SMALL)
    assert len(saved) == 3 and sorted(reads) == sorted(str(e.path) for e in flat.entries())


def test_usage_own_logical_shared_bytes_and_the_dashboard_table(tmp_path) -> None:
    from workbench.widgets.dashboard import chain_html

    conv = conversation(3, step=300)
    flat = KVStore(tmp_path / "flat", budget_mb=None, min_tokens=1)
    chain = KVStore(tmp_path / "chain", budget_mb=None, min_tokens=1, kv_layout="chain")
    for state, text in conv:
        flat.save(state, text, SaveReason.CONTINUED)
        chain.save(state, text, SaveReason.CONTINUED)
    sizes = {e.sha: e.file_size for e in flat.entries()}
    rows = sorted(chain.usage(SMALL), key=lambda r: r.tokens)
    assert [(r.chained, r.depth) for r in rows] == [(True, 0), (True, 1), (True, 2)]
    assert [r.parent for r in rows] == [None, rows[0].sha, rows[1].sha]
    assert all(r.logical == sizes[r.sha] for r in rows)  # the same state as the flat file
    assert [r.through for r in rows] == [rows[0].own, rows[0].own + rows[1].own, sum(r.own for r in rows)]
    assert rows[0].shared == 0 and rows[2].shared == rows[2].logical - rows[2].own > 0  # a base shares none
    assert all(r.own == r.logical and r.shared == 0 and not r.chained for r in flat.usage(SMALL))
    html = chain_html(chain.usage(SMALL), chain.total_bytes(), limit=2)
    logical = sum(sizes.values())
    assert "<b>3</b> checkpoints (3 chained, 0 flat)" in html and f"{logical / 2**20:,.2f} MiB" in html
    assert f"({chain.total_bytes() / logical:.2f}×)" in html and "… 1 more" in html
    assert f"<code>{rows[1].parent[:10]}</code>" in html or f"<code>{rows[2].parent[:10]}</code>" in html
    assert "no checkpoints" in chain_html([], 0)
