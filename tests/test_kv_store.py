"""The prefix store: naming, longest-prefix lookup, load/touch, saves, budget and eviction,
and the ``workbench kv`` commands."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import mlx.core as mx
import numpy as np
import pytest
from test_kv_format import SMALL, assert_same_state

from workbench.cli import main as cli_main
from workbench.bench.staged import write_staged
from workbench.kv import events, index
from workbench.kv import store as S
from workbench.kv.errors import KVLoadError
from workbench.kv.eviction import EvictionRules
from workbench.kv.header import ExtFlag, SaveReason, read_header
from workbench.kv.kvfile import kv_file_bytes
from workbench.kv.maintenance import verify_file
from workbench.kv.store import KVStore
from workbench.state import random_state

CTX = 4096


def make_store(path, **kw) -> KVStore:
    kw.setdefault("min_tokens", 64)
    kw.setdefault("budget_mb", None)
    return KVStore(path, **kw)


def set_header(path, *, hits: int | None = None, last_used: int | None = None, created: int | None = None) -> None:
    with open(path, "r+b") as f:
        for off, fmt, value in ((12, "<I", hits), (32, "<Q", last_used), (24, "<Q", created)):
            if value is not None:
                f.seek(off)
                f.write(struct.pack(fmt, value))


def test_save_names_file_by_sha1_and_loads_back(tmp_path) -> None:
    st = make_store(tmp_path)
    state = random_state(SMALL, 300, CTX)
    text = "<｜User｜>héllo wörld"
    res = st.save(state, text, SaveReason.COLD)
    assert res.saved and res.path.name == hashlib.sha1(text.encode()).hexdigest() + ".kv"
    assert res.bytes == os.path.getsize(res.path) == kv_file_bytes(state, len(text.encode()))
    assert [p.name for p in tmp_path.iterdir() if p.name != ".lock"] == [res.path.name]  # no tmp left
    back, got = st.load(res.path, SMALL, CTX)
    assert got == text.encode()
    assert_same_state(state, back)
    assert back is not state and back.ctx == CTX
    h = read_header(res.path)
    assert h.hits == 1 and h.reason == SaveReason.COLD and h.tokens == 300
    assert verify_file(res.path, SMALL).ok  # the in-place touch keeps the checksum valid
    st.load(res.path, SMALL, CTX)
    assert read_header(res.path).hits == 2
    kinds = [e.kind for e in st.events]
    assert kinds == ["saved", "loaded", "loaded"]
    assert st.events[0].row()["event"] == "saved" and st.events[0].row()["reason"] == "cold"


def test_lookup_longest_text_prefix_and_miss_reasons(tmp_path) -> None:
    st = make_store(tmp_path)
    short, long = "<｜User｜>system prompt", "<｜User｜>system prompt<｜Assistant｜>ok<｜User｜>more"
    st.save(random_state(SMALL, 200, CTX, seed=1), short, SaveReason.COLD)
    st.save(random_state(SMALL, 300, CTX, seed=2), long, SaveReason.EVICT)
    e = st.lookup(long + " and a new question", CTX)
    assert e is not None and e.tokens == 300 and e.text_bytes == len(long.encode())
    e = st.lookup(short + " different", CTX)
    assert e is not None and e.tokens == 200
    # one byte different inside the stored text: the longer file cannot match
    e = st.lookup(long[:-1] + "X question", CTX)
    assert e is not None and e.tokens == 200
    assert st.lookup("<｜User｜>system prompX", CTX) is None
    assert st.events[-1].reason == "no-prefix-match"
    assert st.lookup(long, CTX, min_tokens=250).tokens == 300
    assert st.lookup(short + "x", CTX, min_tokens=250) is None and st.events[-1].reason == "below-min-tokens"
    # a file from a larger context is never used
    assert st.lookup(long + "x", 2048) is None and st.events[-1].reason == "ctx-too-large"
    strict = make_store(tmp_path, quant_bits=4, reject_different_quant=True, maintain=False)
    assert strict.lookup(long + "x", CTX) is None and strict.events[-1].reason == "quant-mismatch"
    assert make_store(tmp_path / "empty").lookup("x", CTX) is None


def test_lookup_hashes_only_index_lengths_and_rereads_no_headers(tmp_path, monkeypatch) -> None:
    st = make_store(tmp_path)
    st.save(random_state(SMALL, 200, CTX), "a" * 100, SaveReason.COLD)
    calls = []
    real = index.read_header
    monkeypatch.setattr(index, "read_header", lambda p: calls.append(p) or real(p))
    for _ in range(5):
        assert st.lookup("a" * 150, CTX) is not None
    assert calls == []  # index reused: no header re-read for an unchanged file
    other = make_store(tmp_path, maintain=False)  # another process adds a file
    other.save(random_state(SMALL, 210, CTX, seed=3), "a" * 120, SaveReason.COLD)
    calls.clear()
    e = st.lookup("a" * 150, CTX)
    assert e.tokens == 210 and [p.name for p in calls] == [e.path.name]  # only the new file's header


def test_text_mismatch_guard_and_prompt_prefix_check(tmp_path) -> None:
    st = make_store(tmp_path)
    res = st.save(random_state(SMALL, 200, CTX), "abc" * 40, SaveReason.COLD)
    with pytest.raises(KVLoadError, match="prefix mismatch"):
        st.load(res.path, SMALL, CTX, prompt="xyz" * 50)
    # a file whose name does not hash its text is refused at load, kept on disk
    wrong = tmp_path / ("0" * 40 + ".kv")
    os.link(res.path, wrong)
    with pytest.raises(KVLoadError, match="hash mismatch"):
        st.load(wrong, SMALL, CTX)
    assert wrong.exists() and isinstance(st.events[-1], events.LoadFailed)


def test_consume_only_when_configured(tmp_path) -> None:
    st = make_store(tmp_path, consume_on_load_above=250)
    small = st.save(random_state(SMALL, 200, CTX), "s" * 50, SaveReason.COLD).path
    big = st.save(random_state(SMALL, 300, CTX, seed=1), "b" * 50, SaveReason.COLD).path
    st.load(small, SMALL, CTX)
    st.load(big, SMALL, CTX)
    assert small.exists() and not big.exists()
    assert any(isinstance(e, events.Consumed) for e in st.events)


def test_same_key_save_keeps_compatible_file_and_replaces_incompatible(tmp_path) -> None:
    st = make_store(tmp_path)
    text = "k" * 64
    first = st.save(random_state(SMALL, 200, CTX), text, SaveReason.COLD)
    set_header(first.path, hits=5, last_used=1000)
    again = st.save(random_state(SMALL, 200, CTX), text, SaveReason.CONTINUED)
    h = read_header(first.path)
    assert again.status == "exists" and h.hits == 5 and h.last_used > 1000 and h.reason == SaveReason.COLD
    # a runtime with a smaller context replaces the file written for a larger one
    st.save(random_state(SMALL, 200, 1024), text, SaveReason.EVICT)
    h = read_header(first.path)
    assert h.ctx == 1024 and h.hits == 0 and h.reason == SaveReason.EVICT
    assert any(isinstance(e, events.Replaced) for e in st.events)


def test_staged_and_direct_write_identical_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(S.time, "time", lambda: 1_800_000_000.0)
    state = random_state(SMALL, 300, CTX)
    a = make_store(tmp_path / "a").save(state, "t" * 90, SaveReason.COLD)
    b = make_store(tmp_path / "b").save(state, "t" * 90, SaveReason.COLD, writer=write_staged)
    assert a.path.read_bytes() == b.path.read_bytes()
    plain = make_store(tmp_path / "c", checksum=False).save(state, "t" * 90, SaveReason.COLD)
    full, bare = a.path.read_bytes(), plain.path.read_bytes()
    # without the checksum: the same bytes minus the footer (ds4's exact file)
    assert bare[6] == full[6] == 0 and bare == full[:plain.bytes] and full[-4:] == b"KWBF"


def test_durable_save_fsyncs_file_and_directory(tmp_path, monkeypatch) -> None:
    synced = []
    real = os.fsync
    monkeypatch.setattr(S.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    make_store(tmp_path).save(random_state(SMALL, 200, CTX), "d" * 70, SaveReason.SHUTDOWN, durable=True)
    assert len(synced) == 2
    synced.clear()
    make_store(tmp_path).save(random_state(SMALL, 200, CTX), "e" * 70, SaveReason.SHUTDOWN)
    assert synced == []


def _file_size(T: int, text_len: int) -> int:
    return kv_file_bytes(random_state(SMALL, T, CTX), text_len)


def test_budget_counts_every_file_and_evicts_lowest_score(tmp_path) -> None:
    size = _file_size(300, 10)
    mib = 1024 * 1024
    (tmp_path / "notes.txt").write_bytes(b"x" * 1000)
    (tmp_path / ("f" * 40 + ".kv")).write_bytes(b"garbage that is no header")  # invalid
    st = make_store(tmp_path, budget_mb=(3 * size + 2000) / mib)
    a = st.save(random_state(SMALL, 300, CTX, seed=1), "a" * 10, SaveReason.CONTINUED).path
    b = st.save(random_state(SMALL, 300, CTX, seed=2), "b" * 10, SaveReason.COLD).path  # cold counts x2
    c = st.save(random_state(SMALL, 300, CTX, seed=3), "c" * 10, SaveReason.CONTINUED).path
    assert st.total_bytes() == 3 * size + 1000 + 25
    set_header(c, hits=3, last_used=int(time.time()))  # c has recent hits
    d = st.save(random_state(SMALL, 300, CTX, seed=4), "d" * 10, SaveReason.CONTINUED)
    assert [e.path for e in d.evicted] == [a] and d.evicted[0].why == "make-room"
    assert not a.exists() and b.exists() and c.exists() and d.path.exists()
    assert st.total_bytes() <= st.budget_bytes
    assert {o.path.name for o in st.foreign()} == {"notes.txt"}
    assert [o.path.name for o in st.invalid()] == ["f" * 40 + ".kv"]
    # room is made before the write: the Evicted event precedes Saved
    kinds = [e.kind for e in st.events]
    assert kinds[-2:] == ["evicted", "saved"]


def test_eviction_protects_new_and_listed_files_and_tie_breaks_by_age(tmp_path) -> None:
    size = _file_size(300, 10)
    st = make_store(tmp_path, budget_mb=(2 * size + 100) / (1024 * 1024))
    now = int(time.time())
    old = st.save(random_state(SMALL, 300, CTX, seed=1), "o" * 10, SaveReason.CONTINUED).path
    new = st.save(random_state(SMALL, 300, CTX, seed=2), "n" * 10, SaveReason.CONTINUED).path
    set_header(old, last_used=now - 100)
    set_header(new, last_used=now - 50)
    # equal scores: the older last_used goes first
    r = st.save(random_state(SMALL, 300, CTX, seed=3), "x" * 10, SaveReason.CONTINUED)
    assert [e.path for e in r.evicted] == [old]
    # today's ds4 protects nothing: the evict save may delete the file a lookup just found
    hit = st.lookup("n" * 10 + "tail", CTX)
    set_header(hit.path, last_used=now - 10**6)
    r = st.save(random_state(SMALL, 300, CTX, seed=4), "y" * 10, SaveReason.EVICT, protect=[hit])
    assert not hit.path.exists() and r.path.exists()
    # with protect_hit (the workbench's fix of ds4 #447/#448) the lookup's hit survives
    st.eviction = EvictionRules.preset("ds4", protect_hit=True)
    hit = st.lookup("x" * 10 + "tail", CTX)
    set_header(hit.path, last_used=now - 10**6)
    r = st.save(random_state(SMALL, 300, CTX, seed=5), "z" * 10, SaveReason.EVICT, protect=[hit])
    assert hit.path.exists() and [e.path for e in r.evicted] != [hit.path]
    assert r.path.exists() and len(st.entries()) == 2


def test_may_2026_rules_write_then_evict_sparing_the_new_file(tmp_path) -> None:
    size = _file_size(300, 10)
    st = make_store(tmp_path, budget_mb=(2 * size + 100) / (1024 * 1024),
                    eviction=EvictionRules.preset("ds4-2026-05"))
    a = st.save(random_state(SMALL, 300, CTX, seed=1), "a" * 10, SaveReason.COLD).path
    st.save(random_state(SMALL, 300, CTX, seed=2), "b" * 10, SaveReason.CONTINUED)
    r = st.save(random_state(SMALL, 300, CTX, seed=3), "c" * 10, SaveReason.CONTINUED)
    # no reason weights in May: equal scores, the older file goes, after the write
    assert [e.path for e in r.evicted] == [a] and r.evicted[0].why == "disk-cache-full"
    assert [e.kind for e in st.events][-2:] == ["evicted", "saved"] and r.path.exists()


def test_continued_prefix_of_the_incoming_text_is_evicted_first(tmp_path) -> None:
    st = make_store(tmp_path, budget_mb=(2 * _file_size(310, 14) + 100) / (1024 * 1024))
    prefix = st.save(random_state(SMALL, 300, CTX, seed=1), "p" * 10, SaveReason.CONTINUED).path
    other = st.save(random_state(SMALL, 300, CTX, seed=2), "q" * 10, SaveReason.CONTINUED).path
    set_header(prefix, last_used=int(time.time()))
    set_header(other, last_used=int(time.time()) - 1000)  # older: LRU would pick it
    r = st.save(random_state(SMALL, 310, CTX, seed=3), "p" * 10 + "more", SaveReason.CONTINUED)
    assert [e.path for e in r.evicted] == [prefix] and other.exists()


def test_lookup_skips_another_model_id(tmp_path) -> None:
    st = make_store(tmp_path)
    path = st.save(random_state(SMALL, 300, CTX), "m" * 10, SaveReason.COLD).path
    assert st.lookup("m" * 10 + "x", CTX) is not None
    with open(path, "r+b") as f:
        f.seek(7)
        f.write(bytes([1]))  # byte 7: model id 1 (Pro)
    assert st.lookup("m" * 10 + "x", CTX) is None and st.events[-1].reason == "model-mismatch"


def test_oversize_and_no_room_saves_are_skipped_without_touching_files(tmp_path) -> None:
    size = _file_size(300, 10)
    st = make_store(tmp_path, budget_mb=(size - 1) / (1024 * 1024))
    r = st.save(random_state(SMALL, 300, CTX), "z" * 10, SaveReason.COLD)
    assert r.status == "skipped" and "exceeds the budget" in r.detail and st.entries() == []
    (tmp_path / "big.bin").write_bytes(b"\0" * (size // 2))
    st2 = make_store(tmp_path, budget_mb=(size + size // 100 + 100) / (1024 * 1024))  # ds4's 1% slack
    r = st2.save(random_state(SMALL, 300, CTX), "z" * 10, SaveReason.COLD)
    assert r.status == "skipped" and st2.events[-1].why == "no-room" and (tmp_path / "big.bin").exists()


def test_open_evicts_to_a_lowered_budget_and_gc(tmp_path, capsys) -> None:
    st = make_store(tmp_path)
    for i in range(3):
        st.save(random_state(SMALL, 300, CTX, seed=i), f"{i}" * 20, SaveReason.CONTINUED)
    size = _file_size(300, 20)
    st2 = make_store(tmp_path, budget_mb=(2 * size + 10) / (1024 * 1024))
    assert len(st2.entries()) == 2 and len([e for e in st2.events if e.kind == "evicted"]) == 1
    assert cli_main(["kv", "gc", str(tmp_path), "--budget-mb", str(size / (1024 * 1024)), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["evicted"]) == 1 and len(st2.entries()) == 2
    assert cli_main(["kv", "gc", str(tmp_path), "--budget-mb", str(size / (1024 * 1024))]) == 0
    assert len(st2.entries()) == 1


def test_verify_and_quarantine_never_delete(tmp_path, capsys) -> None:
    st = make_store(tmp_path)
    good = st.save(random_state(SMALL, 300, CTX, seed=1), "g" * 20, SaveReason.COLD).path
    bad = st.save(random_state(SMALL, 300, CTX, seed=2), "b" * 20, SaveReason.COLD).path
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    bad.write_bytes(bytes(blob))
    reports = {r.path.name: r for r in st.verify(SMALL)}
    assert reports[good.name].ok and reports[good.name].checksum == "verified"
    assert not reports[bad.name].ok and "checksum mismatch" in reports[bad.name].error
    total = st.total_bytes()
    assert cli_main(["kv", "verify", str(tmp_path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["failed"] == 1 and out["checked"] == 2
    assert cli_main(["kv", "verify", str(tmp_path), "--quarantine"]) == 1
    assert not bad.exists() and (tmp_path / "quarantine" / bad.name).exists()
    assert [e.path for e in st.entries()] == [good] and st.total_bytes() == total
    assert [o.kind for o in st.foreign()] == ["quarantined"]
    assert cli_main(["kv", "verify", str(tmp_path)]) == 0


def test_cli_ls_and_show(tmp_path, capsys) -> None:
    st = make_store(tmp_path)
    state = random_state(SMALL, 300, CTX)
    path = st.save(state, "<｜User｜>show me", SaveReason.SHUTDOWN).path
    (tmp_path / "stray.txt").write_text("hi")
    assert cli_main(["kv", "ls", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["tokens"] for e in out["entries"]] == [300] and out["entries"][0]["reason"] == "shutdown"
    assert out["others"][0]["kind"] == "foreign" and out["total_bytes"] == st.total_bytes()
    assert cli_main(["kv", "show", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["header"]["tokens"] == 300 and out["trailer"] == "footer"
    assert out["payload_accounted"] == out["header"]["payload_bytes"]
    assert "inferred" in out["layout_source"]
    per_layer = {(r["layer"], r["kind"]): r["bytes"] for r in out["layers"]}
    assert per_layer[(2, "compressed")] == 75 * 128 * 4 and per_layer[(2, "indexer")] == 75 * 128 * 4
    assert per_layer[(0, "raw window")] == 128 * 128 * 4
    assert cli_main(["kv", "show", str(path)]) == 0
    assert "show me" in capsys.readouterr().out
    assert cli_main(["kv", "ls", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_cli_show_with_model_layout(tmp_path, tiny_gguf, capsys) -> None:
    from workbench.gguf.reader import GGUFFile
    from workbench.spec.args import ModelArgs
    from workbench.spec.statelayout import StateLayout

    with GGUFFile(tiny_gguf) as g:
        lay = StateLayout.from_args(ModelArgs.from_metadata(g.metadata))
    st = make_store(tmp_path)
    path = st.save(random_state(lay, 300, CTX), "tiny" * 10, SaveReason.COLD).path
    assert cli_main(["kv", "show", str(path), "--model", str(tiny_gguf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout_source"] == f"from {tiny_gguf}" and out["layout"]["n_layer"] == lay.n_layer
    assert cli_main(["kv", "verify", str(path), "--model", str(tiny_gguf)]) == 0


def test_loaded_state_is_new_and_payload_arrays_are_float32(tmp_path) -> None:
    st = make_store(tmp_path)
    state = random_state(SMALL, 300, CTX)
    path = st.save(state, "q" * 70, SaveReason.COLD).path
    back, _ = st.load(st.lookup("q" * 80, CTX), SMALL, 8192)
    assert back.ctx == 8192 and back.layers[2].comp.dtype == mx.float32 and back.problems() == []


def test_progress_reports_every_layer_up_to_the_payload_size(tmp_path) -> None:
    st = make_store(tmp_path)
    state = random_state(SMALL, 300, CTX)
    saved, loaded = [], []
    res = st.save(state, "p" * 70, SaveReason.COLD, progress=lambda done, total: saved.append((done, total)))
    st.load(res.path, SMALL, CTX, progress=lambda done, total: loaded.append((done, total)))
    payload = read_header(res.path).payload_bytes
    assert len(saved) == SMALL.n_layer and len(loaded) >= 2
    for calls in (saved, loaded):
        assert calls[-1] == (payload, payload) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_a_file_that_failed_to_load_is_skipped_until_it_changes(tmp_path) -> None:
    st = make_store(tmp_path)
    text = "f" * 80
    path = st.save(random_state(SMALL, 300, CTX), text, SaveReason.COLD).path
    blob = bytearray(path.read_bytes())
    blob[-200] ^= 1
    path.write_bytes(bytes(blob))
    hit = st.lookup(text + "?", CTX)
    with pytest.raises(KVLoadError, match="checksum mismatch"):
        st.load(hit, SMALL, CTX)
    assert st.lookup(text + "?", CTX) is None and st.events[-1].reason == "failed-before"
    assert path.exists()
    path.unlink()
    st.save(random_state(SMALL, 300, CTX), text, SaveReason.COLD)  # rewritten: tried again
    assert st.lookup(text + "?", CTX) is not None


def test_cli_reads_a_ds4_server_directory_without_a_model(tmp_path, capsys) -> None:
    from workbench.spec.statelayout import StateLayout

    lay = StateLayout.ds4()
    st = make_store(tmp_path, checksum=False)  # byte-for-byte what ds4-server writes
    path = st.save(random_state(lay, 256, 32768), "<｜begin▁of▁sentence｜>sys" * 20, SaveReason.EVICT).path
    assert cli_main(["kv", "show", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout_source"].startswith("ds4-server layout") and out["trailer"] == "none"
    assert out["header"]["payload_bytes"] == 23_995_788 + 13_764 * 256 == out["payload_accounted"]
    per_layer = {(r["layer"], r["kind"]): r["bytes"] for r in out["layers"]}
    assert per_layer[(42, "compressed")] == 64 * 2048 and per_layer[(41, "compressed")] == 2 * 2048
    assert per_layer[(42, "frontiers")] == 2 * 32768 + 2 * 8192 and per_layer[(41, "frontiers")] == 2 * 262144
    assert cli_main(["kv", "verify", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"][0]["ok"] and out["files"][0]["checksum"] == "absent"
    assert cli_main(["kv", "verify", str(tmp_path), "--ctx", "16384"]) == 1  # saved at 32768: does not fit
    assert "does not fit current context" in capsys.readouterr().out


def test_remove_deletes_only_checkpoints_of_this_directory(tmp_path):
    from workbench.kv.errors import KVStoreError
    from workbench.kv.store import KVStore

    store = KVStore(tmp_path / "kv", budget_mb=None, min_tokens=1)
    foreign = tmp_path / "kv" / "notes.txt"
    foreign.write_text("mine")
    with pytest.raises(KVStoreError):
        store.remove(foreign)
    with pytest.raises(KVStoreError):
        store.remove(tmp_path / "kv" / ("0" * 40 + ".kv"))
    assert foreign.exists()
