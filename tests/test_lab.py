"""The cache lab without the model: hand-made traces whose hits are worked out by hand,
a hand-made ds4-server trace, hashed traces, the optimum's bounds, miss reasons, the CLI."""

from __future__ import annotations

import json

import pytest

from workbench.cli import main as cli_main
from workbench.kv.policy import KVPolicy
from workbench.lab.ds4trace import parse_ds4_trace
from workbench.lab.optimum import infinite
from workbench.lab.replay import Rates, Replay, replay
from workbench.lab.sweep import sweep
from workbench.lab.trace import Trace, TraceError, TraceHeader, TraceRequest, estimate_token_ends, read_trace

LAYOUT = {"n_layer": 2, "head_dim": 8, "idx_dim": 4, "n_vocab": 16, "n_swa": 4, "ratios": [0, 4]}
RATES = Rates(100.0, 1e9, 1e9)
# every byte one token, whole-prompt cold saves, no continued saves
POLICY = KVPolicy(min_tokens=4, cold_max_tokens=1000, continued_interval=0, boundary_trim=0, boundary_align=0,
                  budget_mb=None)


def req(i: int, prompt: str, conv: str = "c", generated: str = "") -> TraceRequest:
    """A request whose every byte is one token (ASCII texts)."""
    n, g = len(prompt), len(generated)
    return TraceRequest(i, conv, 1000.0 + 10 * i, n, n, list(range(1, n + 1)), prompt, [], None, generated, g, g,
                        list(range(1, g + 1)))


def trace(*prompts: str, budget_mb: float | None = None) -> Trace:
    return Trace(TraceHeader(LAYOUT, 64, policy={}, budget_mb=budget_mb),
                 [req(i, p) for i, p in enumerate(prompts)])


def sizes() -> tuple[int, int]:
    """File sizes of an 8-token and a 10-token checkpoint (8 and 10 text bytes)."""
    r = Replay(trace("x"), POLICY, RATES)
    return r.file_size(8, 8), r.file_size(10, 10)


def two_files_trace() -> tuple[Trace, KVPolicy]:
    """Worked by hand in test_hand_worked_hits_and_evictions: a budget for an 8- and a 10-token file."""
    s8, s10 = sizes()
    budget = (s8 + s10 + s10 // 100 + 64) / 2**20
    t = trace("AAAAAAAA", "BBBBBBBB", "AAAAAAAAaa", "CCCCCCCC", "BBBBBBBBbb")
    return t, KVPolicy(**{**POLICY.__dict__, "budget_mb": budget})


def test_hand_worked_hits_and_evictions() -> None:
    t, policy = two_files_trace()
    res = replay(t, policy, RATES)
    # r0, r1: cold whole-prompt saves A8, B8. r2 extends A: disk hit of 8 (A8 hits=1).
    # r3: the live A10 (unsaved) is saved as evict; the budget holds two files: B8 scores
    # (0+1)*8/s8*2 < A8's (1+1)*8/s8*2, so B8 goes; C8's cold save then evicts A10
    # (1*10/s10*2 < 32/s8). r4 wants B8: evicted -> a miss; its cold save evicts C8.
    assert [(r.source, r.cached_tokens) for r in res.requests] == [
        ("none", 0), ("none", 0), ("disk", 8), ("none", 0), ("none", 0)]
    assert [[(s["reason"], s["tokens"]) for s in r.saves] for r in res.requests] == [
        [("cold", 8)], [("cold", 8)], [], [("evict", 10), ("cold", 8)], [("cold", 10)]]
    assert [[e["tokens"] for e in r.evictions] for r in res.requests] == [[], [], [], [8, 10], [8]]
    assert res.requests[3].evictions[0]["key"] == res.requests[1].saves[0]["key"]  # B8
    # why r4 missed: B8 held 8 of its tokens and was evicted by r3's evict save
    last = res.requests[4]
    assert last.losses == {"evicted": 8, "first-seen": 2} and last.miss_reason == "evicted"
    assert "evicted by the evict save of request 3" in last.explanation
    # LRU agrees here; the clairvoyant keeps B8 (needed by r4) and drops A8, A10 (never again)
    lru = replay(t, KVPolicy(**{**policy.__dict__, "eviction": "lru"}), RATES)
    assert [r.cached_tokens for r in lru.requests] == [0, 0, 8, 0, 0]
    opt = replay(t, policy, RATES, clairvoyant=True)
    assert [(r.source, r.cached_tokens) for r in opt.requests][-1] == ("disk", 8)
    assert sum(r.cached_tokens for r in infinite(t, policy, RATES).requests) == 16


def test_miss_reasons_alignment_divergence_and_min_tokens() -> None:
    p = KVPolicy(min_tokens=4, cold_max_tokens=1000, continued_interval=0, boundary_trim=0, boundary_align=8,
                 budget_mb=None)
    t = trace("0123456789abcdefghij", "0123456789abcdefghXY", "01234567QQQQ", "01Z")
    res = replay(t, p, RATES)
    # r0 cold-saves 16 (20 aligned down to 8s); r1 shares 18 bytes: disk 16, 2 lost to alignment
    assert (res.requests[1].source, res.requests[1].cached_tokens) == ("disk", 16)
    assert res.requests[1].losses == {"alignment": 2, "first-seen": 2}
    # r2 shares 8 bytes, but every checkpoint (r0's 16 and 20, r1's 20) ends past them:
    # they diverged before any checkpoint boundary (a changed system prompt looks like this)
    assert res.requests[2].losses == {"diverged-before-any-checkpoint": 8, "first-seen": 4}
    # r3 shares 2 bytes: shorter than min_tokens
    assert res.requests[3].losses == {"below-min-tokens": 2, "first-seen": 1}


def test_optimum_bounds_across_a_sweep() -> None:
    t, policy = two_files_trace()
    s8, s10 = sizes()
    budgets = [b / 2**20 for b in (s10 + 200, s8 + s10 + 300, 2 * s10 + s8 + 400, 4 * s10)]
    df, runs = sweep(t, policy, ["ds4", "ds4-2026-05", "lru", "lfu", "size"], budgets, RATES)
    opt = df[df.policy == "optimal"].set_index("budget_mb").cached_tokens
    assert list(opt) == sorted(opt)  # non-decreasing in the budget
    for b in budgets:
        here = df[(df.budget_mb == b) & ~df.policy.isin(["optimal", "infinite"])]
        assert (here.cached_tokens <= opt[b]).all()
    bound = int(df[df.policy == "infinite"].cached_tokens.iloc[0])
    assert opt.max() <= bound == 16
    assert opt[budgets[1]] == 16 > int(df[(df.policy == "ds4") & (df.budget_mb == budgets[1])].cached_tokens.iloc[0])


def test_hashed_trace_replays_like_the_full_one(tmp_path) -> None:
    t, policy = two_files_trace()
    t.write(tmp_path / "full.jsonl")
    t.write(tmp_path / "hashed.jsonl", hash_text=True)
    hashed = read_trace(tmp_path / "hashed.jsonl")
    assert hashed.header.hashed and all(r.rendered is None and r.prefix_hashes for r in hashed.requests)
    assert "AAAA" not in (tmp_path / "hashed.jsonl").read_text()
    full = replay(read_trace(tmp_path / "full.jsonl"), policy, RATES)
    anon = replay(hashed, policy, RATES)
    assert [(r.source, r.cached_tokens, r.losses) for r in full.requests] == \
        [(r.source, r.cached_tokens, r.losses) for r in anon.requests]


def test_bad_trace_lines_name_the_file_and_field(tmp_path) -> None:
    t, _ = two_files_trace()
    path = t.write(tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    head["version"] = 99
    (tmp_path / "v.jsonl").write_text(json.dumps(head) + "\n")
    with pytest.raises(TraceError, match=r"v.jsonl:1: field 'version'"):
        read_trace(tmp_path / "v.jsonl")
    bad = json.loads(lines[1])
    bad["token_ends"] = bad["token_ends"][:-1]
    (tmp_path / "e.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TraceError, match=r"e.jsonl:2: field 'token_ends'"):
        read_trace(tmp_path / "e.jsonl")


DS4_TRACE = """
===== request 1 2026-08-01 10:00:00 =====
kind: chat
model: deepseek-v4-flash
stream: 1
tools: 0
think_mode: none
prompt_tokens: 9
effective_prompt_tokens: 9
cached_tokens: 0
max_tokens: 64
temperature: 0.000
top_k: 0
top_p: 1.000
min_p: 0.000
seed: 0
stream_include_usage: 0

--- cache decision ---
live_tokens_before: 0
prompt_tokens: 9
live_prompt_common: 0
memory_token_reusable: 0
memory_miss_reason: no-live-checkpoint
tool_replay: mem=0 disk=0 canonical=0 missing_ids=0
cache_source: none
cached_tokens: 0
disk_cached_tokens: 0

--- raw request json ---
{"messages":[{"role":"user","content":"Ciao, è tardi?"}]}

--- rendered prompt ---
<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Ciao, è tardi?<｜Assistant｜></think>

--- generated text ---
No, è presto.

--- trace: tool call parsing started ---

 Buona giornata.

--- parsed message ---
finish: stop
generated_tokens: 7
dsml_start: 0
dsml_end: 0
elapsed_sec: 0.812

content:
No, è presto. Buona giornata.

===== end request 1 =====

===== request 2 2026-08-01 10:00:05 =====
kind: chat
model: deepseek-v4-flash
prompt_tokens: 30
effective_prompt_tokens: 31
cached_tokens: 16

--- cache decision ---
live_tokens_before: 16
prompt_tokens: 30
live_prompt_common: 12
memory_token_reusable: 0
memory_miss_reason: token-mismatch
tool_replay: mem=0 disk=0 canonical=0 missing_ids=0
cache_source: disk-text
cached_tokens: 16
disk_cached_tokens: 16
disk_cache_file: /cache/0123456789abcdef0123456789abcdef01234567.kv

first_mismatch_token: 12
token_window: [10..14)
     10 ==          live 5 "a" | prompt 5 "a"
     12 !=          live 7 "b" | prompt 8 "c"

--- rendered prompt ---
<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Ciao, è tardi?<｜Assistant｜></think>No, è presto. Buona giornata.<｜end▁of▁sentence｜><｜User｜>E domani?<｜Assistant｜></think>

--- generated text ---
Anche.

--- parsed message ---
finish: stop
generated_tokens: 2
dsml_start: 0
dsml_end: 0
elapsed_sec: 0.100

===== end request 2 =====
"""


def test_import_a_ds4_server_trace(tmp_path) -> None:
    src = tmp_path / "ds4.trace"
    src.write_text(DS4_TRACE, encoding="utf-8")
    t = parse_ds4_trace(src)
    first, second = t.requests
    assert first.rendered == "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Ciao, è tardi?<｜Assistant｜></think>"
    assert first.generated == "No, è presto. Buona giornata."  # the trace event is not generated text
    assert second.rendered.endswith("<｜User｜>E domani?<｜Assistant｜></think>")
    assert (first.recorded["source"], first.recorded["cached_tokens"], first.recorded["miss_reason"]) == \
        ("none", 0, "no-live-checkpoint")
    assert (second.recorded["source"], second.recorded["cached_tokens"], second.recorded["miss_reason"]) == \
        ("disk", 16, "token-mismatch")
    assert second.recorded["disk_cache_file"].endswith("01234567.kv")
    assert first.tokens_estimated and first.token_ends[-1] == first.prompt_bytes
    assert first.user_ends and first.assistant_end is not None  # markers are one token each
    # through the CLI: import, then replay shows ds4's cached tokens beside the replay's
    out = tmp_path / "t.jsonl"
    assert cli_main(["lab", "import", str(src), "--out", str(out)]) == 0
    assert read_trace(out).requests[1].rendered == second.rendered


def test_cli_replay_json_and_ds4_recorded_beside(tmp_path, capsys) -> None:
    src = tmp_path / "ds4.trace"
    src.write_text(DS4_TRACE, encoding="utf-8")
    out = tmp_path / "t.jsonl"
    assert cli_main(["lab", "import", str(src), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    assert cli_main(["lab", "replay", str(out), "--min-tokens", "4", "--boundary-align", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"requests", "summary"} and d["summary"]["cached_tokens"] == sum(
        r["cached_tokens"] for r in d["requests"])
    assert [r["recorded_cached_tokens"] for r in d["requests"]] == [0, 16]
    assert 0 <= d["summary"]["fraction_of_optimum"] <= 1
    assert d["summary"]["cached_tokens"] <= d["summary"]["optimal_cached_tokens"] <= d["summary"]["infinite_cached_tokens"]
    assert d["requests"][1]["source"] == "live"  # the replay serves the follow-up from the live state


def test_cli_sweep_writes_csv_and_html(tmp_path, capsys) -> None:
    t, policy = two_files_trace()
    t.header.policy = {k: getattr(policy, k) for k in ("min_tokens", "cold_max_tokens", "continued_interval",
                                                         "boundary_trim", "boundary_align")}
    path = t.write(tmp_path / "t.jsonl")
    s8, s10 = sizes()
    budgets = f"{(s10 + 200) / 2**20},{policy.budget_mb}"
    assert cli_main(["lab", "sweep", str(path), "--budgets", budgets, "--policies", "ds4,lru",
                     "--out", str(tmp_path / "sw"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["policy"] for r in rows} == {"ds4", "lru", "optimal", "infinite"}
    for name in ("sweep.csv", "misses.csv", "sweep.html"):
        assert (tmp_path / "sw" / name).stat().st_size > 0
    assert cli_main(["lab", "sweep", str(path), "--budgets", "-1", "--out", str(tmp_path / "x")]) == 1
    assert "--budgets" in capsys.readouterr().err


def test_estimated_token_ends_keep_markers_whole() -> None:
    text = "<｜User｜>héllo wörld<｜Assistant｜>".encode("utf-8")
    ends = estimate_token_ends(text, 6, ["<｜User｜>".encode(), "<｜Assistant｜>".encode()])
    assert ends[0] == len("<｜User｜>".encode()) and ends[-1] == len(text)
    assert all(b > a for a, b in zip(ends, ends[1:]))
    assert all((text[e] & 0xC0) != 0x80 for e in ends[:-1])  # never inside a character


def test_policy_lab_widget_sweeps_and_shows_a_strip() -> None:
    from workbench.widgets import PolicyLab

    t, policy = two_files_trace()
    s8, s10 = sizes()
    lab = PolicyLab(t, [(s10 + 200) / 2**20, policy.budget_mb], base=policy, rates=RATES)
    lab.policies.value = ("ds4", "lru")
    df = lab.sweep()
    assert set(df.policy) == {"ds4", "lru", "optimal", "infinite"}
    assert len(lab.figures["sweep"].data) > 0 and len(lab.figures["strip"].data) == 5  # 4 bars + checkpoints
    lab.shown.value, lab.budget.value = "optimal", policy.budget_mb
    assert sum(r.cached_tokens for r in lab.show().requests) == 16
    lab.policies.value = ()
    lab.guarded(lab.sweep)
    assert "tick at least one policy" in lab.error.value


def test_import_a_cache_directory_as_a_trace_skeleton(tmp_path, capsys) -> None:
    from test_kv_format import SMALL

    from workbench.kv.header import SaveReason
    from workbench.kv.store import KVStore
    from workbench.state import random_state

    store = KVStore(tmp_path / "kv", budget_mb=None, min_tokens=1, checksum=False)
    texts = ["<｜User｜>first conversation", "<｜User｜>first conversation, and more"]
    for i, (text, reason) in enumerate(zip(texts, (SaveReason.COLD, SaveReason.EVICT))):
        store.save(random_state(SMALL, 40 + 10 * i, 4096, seed=i), text, reason)
    before = sorted(p.name for p in (tmp_path / "kv").iterdir())
    out = tmp_path / "skeleton.jsonl"
    assert cli_main(["lab", "import", str(tmp_path / "kv"), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 2
    t = read_trace(out)
    assert t.header.source == "ds4-cache-dir" and sorted(r.rendered for r in t.requests) == sorted(texts)
    assert sorted(r.recorded["saves"][0]["tokens"] for r in t.requests) == [40, 50]
    assert sorted(r.recorded["reason"] for r in t.requests) == ["cold", "evict"]
    assert sorted(p.name for p in (tmp_path / "kv").iterdir()) == before  # nothing modified
