"""Save policy and eviction score: ds4's worked examples (ds4-kvcache.md §3.2, §3.3, §4, §8)."""

from __future__ import annotations

import pytest

from workbench.kv.header import SaveReason
from workbench.kv.policy import (
    ContinuedSchedule, KVPolicy, KVPolicyError, chat_anchor, effective_hits, eviction_score,
)

U, A = 128803, 128804  # stand-ins for the <｜User｜> / <｜Assistant｜> ids
H = 21600.0


@pytest.mark.parametrize("prompt,expected", [(11011, 10240), (2600, 2048), (30000, 28672), (1695, 1695), (545, 545)])
def test_store_len_table(prompt: int, expected: int) -> None:
    assert KVPolicy().store_len(prompt) == expected


def test_store_len_configured_boundary() -> None:
    assert KVPolicy(boundary_trim=0, boundary_align=1000).store_len(3500) == 3000
    assert KVPolicy(boundary_trim=0, boundary_align=0).store_len(3500) == 3500


def test_cold_target_reasons() -> None:
    p = KVPolicy()
    plain = [7] * 11011
    assert p.cold_target(plain) == p.cold_target(plain, U, A) and p.cold_target(plain).length == 10240
    assert p.cold_target(plain).reason == "aligned"
    assert p.cold_target([7] * 1695).length == 1695 and p.cold_target([7] * 1695).reason == "whole-prompt"
    assert p.cold_target([7] * 100).length is None and p.cold_target([7] * 100).reason == "below-min-tokens"
    # above cold_max ds4 is silent (issue #392): here it says why
    t = p.cold_target([7] * 30001)
    assert t.length is None and t.reason == "above-cold-max"
    assert KVPolicy(cold_max_tokens=0).cold_target(plain).reason == "disabled"
    # Claude-Code-style anchor: system+tools end at 27005, then the user turn; saved unaligned
    claude = [7] * 27005 + [U] + [7] * 2000 + [A]
    assert p.cold_target(claude, U, A).length == 27005 and p.cold_target(claude, U, A).reason == "anchor"


def test_cold_target_long_prompts_optional() -> None:
    p = KVPolicy(cold_long_prompts=True)
    long_plain = [7] * 35000
    t = p.cold_target(long_plain)
    assert (t.length, t.reason) == (28672, "long-prompt-aligned")
    anchored = [7] * 27005 + [U] + [7] * 8000
    assert p.cold_target(anchored, U, A).length == 27005
    assert p.cold_target(anchored, U, A).reason == "long-prompt-anchor"
    deep_anchor = [7] * 31000 + [U] + [7] * 10
    assert p.cold_target(deep_anchor, U, A).length == 28672  # anchor beyond cold_max: aligned boundary
    assert KVPolicy(cold_long_prompts=True, boundary_align=0).cold_target(long_plain).length == 30000


def test_chat_anchor_last_user_before_first_assistant() -> None:
    codex = [1] * 600 + [U] + [2] * 700 + [U] + [3] * 50 + [A]  # two user markers: the last one
    assert chat_anchor(codex, U, A, 512) == 1301
    claude = [1] * 900 + [U] + [2] * 10 + [A] + [4] * 5
    assert chat_anchor(claude, U, A, 512) == 900
    multiturn = [1] * 600 + [U] + [2] * 10 + [A] + [3] * 10 + [U] + [4] * 10
    assert chat_anchor(multiturn, U, A, 512) == 600  # the scan stops at the first assistant marker
    assert chat_anchor([1] * 100 + [U] + [A], U, A, 512) is None  # below min
    assert chat_anchor(codex, -1, A, 512) is None and chat_anchor(codex, U, -1, 512) is None
    assert chat_anchor(codex, None, A, 512) is None
    assert chat_anchor([1] * 1000, U, A, 512) is None


def test_continued_step_rounding() -> None:
    assert KVPolicy().continued_step() == 10240
    assert KVPolicy(continued_interval=25000).continued_step() == 26624
    assert KVPolicy(continued_interval=50000).continued_step() == 51200
    assert KVPolicy(continued_interval=4096, boundary_align=4096).continued_step() == 4096
    assert KVPolicy(boundary_align=0).continued_step() == 10000
    assert KVPolicy(continued_interval=0).continued_step() == 0


def test_continued_uses_aligned_frontiers() -> None:
    p = KVPolicy()
    assert not p.continued_due(10239, 0)
    assert p.continued_due(10240, 0)
    assert not p.continued_due(18432, 10240)
    assert p.continued_due(20480, 10240)
    assert not p.continued_due(10240, 10240)  # already stored
    q = KVPolicy(boundary_align=0)
    assert not q.continued_due(29999, 20480) and q.continued_due(30000, 20480)
    assert not KVPolicy(continued_interval=0).continued_due(10240, 0)


def test_cold_store_suppresses_duplicate_continued_boundary() -> None:
    s = ContinuedSchedule(KVPolicy())
    assert s.due(10240)
    prev = s.claim_cold(10240)  # cold save at a continued frontier: mark it done first
    assert prev == 0 and not s.due(10240)
    s.rollback(prev)  # the cold save failed: the frontier is due again
    assert s.due(10240)
    assert s.claim_cold(10000) is None and s.due(10240)  # not a frontier: nothing claimed
    s.stored(10240)
    assert not s.due(10240) and s.due(20480)
    s.loaded(20480)
    assert not s.due(20480) and s.due(30720)
    s.reset()
    assert s.due(10240)


def test_evict_and_shutdown_need_min_tokens() -> None:
    p = KVPolicy()
    assert not p.evict_due(511) and p.evict_due(512)
    assert not p.shutdown_due(100) and p.shutdown_due(40000)
    assert not p.consume_on_load(100000) and KVPolicy(consume_on_load_above=30000).consume_on_load(30001)


def test_policy_validation() -> None:
    with pytest.raises(KVPolicyError, match="min_tokens"):
        KVPolicy(min_tokens=0)
    with pytest.raises(KVPolicyError, match="cold_max_tokens 100"):
        KVPolicy(cold_max_tokens=100)
    with pytest.raises(KVPolicyError, match="boundary_align"):
        KVPolicy(boundary_align=-1)
    with pytest.raises(KVPolicyError, match="budget_mb"):
        KVPolicy(budget_mb=0)


def _size(T: int) -> int:
    """Real-model file size: 52 + text (3 B/token) + payload (§4 examples)."""
    return 52 + 3 * T + 23_995_788 + 13_764 * T


@pytest.mark.parametrize("T,hits,age_h,expected", [
    (4096, 0, 0, 5.10), (20480, 1, 40, 6.69), (49022, 0, 0, 7.02), (126976, 0, 0, 7.17), (20480, 4, 12, 13.39),
])
def test_eviction_score_examples(T: int, hits: int, age_h: float, expected: float) -> None:
    now = 1_800_000_000
    s = eviction_score(T, _size(T), hits, int(now - age_h * 3600), now - 10**6, SaveReason.CONTINUED, now,
                       reason_weights={})
    assert s * 1e5 == pytest.approx(expected, abs=0.006)


def test_effective_hits_decay() -> None:
    now = 1_800_000_000
    assert effective_hits(4, now - 6 * 3600, 0, now) == pytest.approx(2.0)
    assert effective_hits(10, int(now - 14 * H), 0, now) == 0.0  # 10 * 2^-14 < 0.01
    assert effective_hits(3, 0, now - 6 * 3600, now) == pytest.approx(1.5)  # falls back to created_at
    assert effective_hits(3, 0, 0, now) == 0.0
    assert effective_hits(2, now + 100, 0, now) == 2.0  # clock skew: no growth


def test_eviction_ordering_cases() -> None:
    now = 1_800_000_000
    sc = lambda T, size, hits=0, used=now, reason=SaveReason.CONTINUED, w=None: eviction_score(  # noqa: E731
        T, size, hits, used, used, reason, now, reason_weights=w)
    # fresh snapshots: the denser file is worth more
    assert sc(20480, _size(20480)) > sc(4096, _size(4096))
    # 10 hits after 14 half-lives lose to a fresh denser file, whose score is tokens/size
    stale = sc(4096, _size(4096), hits=10, used=int(now - 14 * H))
    fresh = sc(20480, _size(20480))
    assert stale < fresh and fresh == pytest.approx(20480 / _size(20480))
    # a 2048-token continued file beats a 512-token cold file of the same size, even with cold x2
    assert sc(2048, 10**8) > sc(512, 10**8, reason=SaveReason.COLD)
    # reason weights: cold/evict/shutdown count double by default, configurable
    assert sc(4096, _size(4096), reason=SaveReason.EVICT) == pytest.approx(2 * sc(4096, _size(4096)))
    assert sc(4096, _size(4096), reason=SaveReason.COLD, w={}) == pytest.approx(sc(4096, _size(4096)))
    assert sc(4096, _size(4096), reason=SaveReason.CONTINUED, w={SaveReason.CONTINUED: 3.0}) == \
        pytest.approx(3 * sc(4096, _size(4096)))
