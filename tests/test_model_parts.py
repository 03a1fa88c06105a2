"""The easy mistakes of ds4-architecture §7, each pinned on small hand-checkable inputs."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from workbench.model.attention import Attention, AttentionWeights
from workbench.model.compressor import Compressor, CompressorWeights
from workbench.model.hyperconn import hc_collapse, hc_post, hc_pre
from workbench.model.indexer import Indexer, IndexerWeights
from workbench.model.moe import MoE, MoEWeights, softplus, swiglu
from workbench.model.ops import grouped_linear, topk_indices, topk_mask
from workbench.model.rope import RopeSpec, YarnParams, rope_frequencies, rope_tail, yarn_corr_range
from workbench.state import EMPTY_SCORE, LayerState

DS4_YARN = YarnParams(16.0, 65536, 32.0, 1.0)


# ---- hyper-connections (§2.2, §2.3, §7.11) ---------------------------------------------------

def test_hc_post_uses_the_transposed_combine() -> None:
    x = mx.array(np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2))  # [T, n_hc, D]
    comb = mx.array(np.random.default_rng(0).random((2, 3, 3)).astype(np.float32))
    post = mx.array([[0.5, 1.0, 1.5], [2.0, 0.0, 1.0]])
    f = mx.array([[1.0, -1.0], [3.0, 2.0]])
    got = np.array(hc_post(f, x, post, comb))
    c, xn, pn, fn = np.array(comb), np.array(x), np.array(post), np.array(f)
    for t in range(2):
        for b in range(3):
            want = pn[t, b] * fn[t] + sum(c[t, a, b] * xn[t, a] for a in range(3))
            np.testing.assert_allclose(got[t, b], want, rtol=1e-6)


def test_hc_pre_sinkhorn_with_exact_eps_placement() -> None:
    rng = np.random.default_rng(1)
    n, d, eps, iters = 4, 8, 1e-6, 20
    x = rng.normal(size=(1, n, d)).astype(np.float32)
    fn = rng.normal(size=(2 * n + n * n, n * d)).astype(np.float32) * 0.3
    scale = np.array([0.7, 1.1, 0.9], np.float32)
    base = rng.normal(size=2 * n + n * n).astype(np.float32)
    y, post, comb = hc_pre(mx.array(x), mx.array(fn), mx.array(scale), mx.array(base), iters, eps, 1e-6)
    flat = x.reshape(-1).astype(np.float64)
    m = fn.astype(np.float64) @ (flat / np.sqrt(np.mean(flat**2) + 1e-6))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    pre = sig(m[:n] * scale[0] + base[:n]) + eps
    a = (m[2 * n :] * scale[2] + base[2 * n :]).reshape(n, n)
    c = np.exp(a - a.max(1, keepdims=True))
    c = c / c.sum(1, keepdims=True) + eps
    c = c / (c.sum(0, keepdims=True) + eps)  # first column step: iteration 1
    for _ in range(iters - 1):
        c = c / (c.sum(1, keepdims=True) + eps)
        c = c / (c.sum(0, keepdims=True) + eps)
    np.testing.assert_allclose(np.array(comb)[0], c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(post)[0], 2 * sig(m[n : 2 * n] * scale[1] + base[n : 2 * n]), rtol=1e-5)
    np.testing.assert_allclose(np.array(y)[0], (pre[:, None] * x[0]).sum(0), rtol=1e-5, atol=1e-6)


def test_hc_collapse_is_sigmoid_plus_eps_without_sinkhorn() -> None:
    x = mx.array(np.random.default_rng(2).normal(size=(1, 4, 8)).astype(np.float32))
    fn = mx.zeros((4, 32))
    base = mx.array([0.0, 100.0, -100.0, 0.0])
    y = np.array(hc_collapse(x, fn, mx.array([1.0]), base, 1e-6, 1e-6))[0]
    xn = np.array(x)[0]
    w = np.array([0.5, 1.0, 0.0, 0.5]) + 1e-6
    np.testing.assert_allclose(y, (w[:, None] * xn).sum(0), rtol=1e-5, atol=1e-6)


# ---- RoPE (§2.5, §7.2, §7.3) -----------------------------------------------------------------

def test_yarn_range_for_ds4_constants() -> None:
    assert yarn_corr_range(64, 160000.0, DS4_YARN) == (15, 25)
    f = rope_frequencies(64, 160000.0, DS4_YARN)
    omega = 160000.0 ** (-np.arange(32) * 2 / 64)
    np.testing.assert_allclose(f[:16], omega[:16])  # pairs 0..15 unscaled
    np.testing.assert_allclose(f[25:], omega[25:] / 16)  # pairs >= 25 divided by the factor
    ramp = 1 - (20 - 15) / 10
    np.testing.assert_allclose(f[20], omega[20] * (ramp + (1 - ramp) / 16))


def test_rope_rotates_only_the_tail_with_interleaved_pairs() -> None:
    d, n_rot, p = 16, 8, 3
    x = mx.array(np.random.default_rng(3).normal(size=(1, d)).astype(np.float32))
    y = np.array(rope_tail(x, np.array([p]), n_rot, 10000.0, None))[0]
    xn = np.array(x)[0]
    np.testing.assert_array_equal(y[: d - n_rot], xn[: d - n_rot])  # nope dims untouched
    for i in range(n_rot // 2):
        th = p * 10000.0 ** (-2 * i / n_rot)
        v0, v1 = xn[d - n_rot + 2 * i], xn[d - n_rot + 2 * i + 1]
        assert y[d - n_rot + 2 * i] == pytest.approx(v0 * math.cos(th) - v1 * math.sin(th), abs=1e-5)
        assert y[d - n_rot + 2 * i + 1] == pytest.approx(v0 * math.sin(th) + v1 * math.cos(th), abs=1e-5)


def test_inverse_rope_undoes_rope_and_has_no_magnitude_scaling() -> None:
    x = mx.array(np.random.default_rng(4).normal(size=(2, 5, 128)).astype(np.float32))
    pos = np.array([0, 1, 70000, 5, 9])
    y = rope_tail(x, pos, 64, 160000.0, DS4_YARN)
    np.testing.assert_allclose(np.linalg.norm(np.array(y), axis=-1), np.linalg.norm(np.array(x), axis=-1), rtol=1e-5)
    back = rope_tail(y, pos, 64, 160000.0, DS4_YARN, inverse=True)
    np.testing.assert_allclose(np.array(back), np.array(x), atol=1e-5)


# ---- compressor (§2.5.1, §7.7, §7.8) ---------------------------------------------------------

def _compressor(ratio: int, d: int = 128, n_embd: int = 32, seed: int = 0, kind: str = "attn") -> Compressor:
    rng = np.random.default_rng(seed)
    coff = 2 if ratio == 4 else 1
    w = CompressorWeights(
        mx.array(rng.normal(size=(coff * d, n_embd)).astype(np.float32)),
        mx.array(rng.normal(size=(coff * d, n_embd)).astype(np.float32)),
        mx.array(rng.normal(size=(ratio, coff * d)).astype(np.float32)),
        mx.array((1 + 0.1 * rng.normal(size=d)).astype(np.float32)))
    return Compressor(ratio, d, w, RopeSpec(64, 160000.0, DS4_YARN), 1e-6, kind, n_nope=d - 64)


def _empty_frontier(c: Compressor) -> tuple[mx.array, mx.array]:
    return mx.zeros(c.frontier_shape), mx.full(c.frontier_shape, EMPTY_SCORE)


def _manual_rows(c: Compressor, h: np.ndarray) -> list[np.ndarray]:
    """The spec's pooling, token by token in float64 (before norm/RoPE/QAT)."""
    r, d = c.ratio, c.width
    kv = h @ np.array(c.w.wkv, np.float64).T
    sc = h @ np.array(c.w.wgate, np.float64).T + np.array(c.w.ape, np.float64)[np.arange(len(h)) % r]
    rows = []
    for w in range(len(h) // r):
        cur = slice(w * r, w * r + r)
        if r == 4:
            s = sc[cur, d:]
            v = kv[cur, d:]
            if w > 0:  # the first window has no previous one
                prev = slice(w * r - 4, w * r)
                s = np.concatenate([sc[prev, :d], s])
                v = np.concatenate([kv[prev, :d], v])
        else:
            s, v = sc[cur], kv[cur]
        e = np.exp(s - s.max(0))
        rows.append((e * v).sum(0) / e.sum(0))
    return rows


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_pools_with_overlap_and_ropes_at_window_start(ratio: int) -> None:
    c = _compressor(ratio)
    n = 3 * ratio
    h = np.random.default_rng(5).normal(size=(n, 32))
    rows, _, _ = c(mx.array(h.astype(np.float32)), 0, *_empty_frontier(c))
    assert rows.shape == (3, 128)
    pooled = _manual_rows(c, h)
    for i, pool in enumerate(pooled):
        want = c.finish(mx.array(pool[None].astype(np.float32)), np.array([i * ratio]))
        np.testing.assert_allclose(np.array(rows[i]), np.array(want)[0], atol=2e-3)
    # RoPE position is the window's first token, not its last
    last = c.finish(mx.array(pooled[1][None].astype(np.float32)), np.array([2 * ratio - 1]))
    assert np.abs(np.array(last)[0, 64:] - np.array(rows[1, 64:])).max() > 1e-2


def test_compressor_row_appears_at_the_completing_token_and_frontier_resumes() -> None:
    c = _compressor(4)
    h = mx.array(np.random.default_rng(6).normal(size=(12, 32)).astype(np.float32))
    whole, kv_w, sc_w = c(h, 0, *_empty_frontier(c))
    kv, sc = _empty_frontier(c)
    got = []
    for p in range(12):
        rows, kv, sc = c(h[p : p + 1], p, kv, sc)
        assert rows.shape[0] == (1 if (p + 1) % 4 == 0 else 0)
        got.append(rows)
    np.testing.assert_allclose(np.array(mx.concatenate(got)), np.array(whole), atol=1e-4)
    np.testing.assert_allclose(np.array(kv), np.array(kv_w), atol=1e-5)
    np.testing.assert_allclose(np.array(sc), np.array(sc_w), atol=1e-5)
    # slot layout: previous window in 0..3, current partial window at 4 + p % 4
    kv5 = c(h[:6], 0, *_empty_frontier(c))[1]
    proj = np.array(c.project(h[:6], 0)[0])
    np.testing.assert_allclose(np.array(kv5[:4]), proj[0:4], atol=1e-5)
    np.testing.assert_allclose(np.array(kv5[4:6]), proj[4:6], atol=1e-5)


def test_indexer_rows_get_hadamard_and_fp4() -> None:
    c = _compressor(4, d=128, kind="index", seed=9)
    h = mx.array(np.random.default_rng(7).normal(size=(4, 32)).astype(np.float32))
    rows = np.array(c(h, 0, *_empty_frontier(c))[0])[0]
    # FP4: in each block of 32, every value is an E2M1 value times one power of two
    for blk in rows.reshape(4, 32):
        s = 2.0 ** math.ceil(math.log2(np.abs(blk).max() / 6))
        assert set(np.abs(blk / s).round(6)) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6}


# ---- attention (§2.5, §7.1, §7.5, §7.6, §7.16) -----------------------------------------------

def _attention(ratio: int = 0, n_swa: int = 4, heads: int = 2, dh: int = 128, n_embd: int = 32) -> Attention:
    rng = np.random.default_rng(11)
    f = lambda *s: mx.array((rng.normal(size=s) / np.sqrt(s[-1])).astype(np.float32))  # noqa: E731
    w = AttentionWeights(f(16, n_embd), mx.ones(16), f(heads * dh, 16), f(dh, n_embd), mx.ones(dh),
                         mx.array([0.5, -1.0]), f(2 * 8, heads * dh // 2), f(n_embd, 16))
    return Attention(heads, dh, 64, n_swa, 2, 1e-6, w, RopeSpec(64, 10000.0, None), ratio)


def test_sinks_are_in_the_denominator_only() -> None:
    a = _attention()
    rng = np.random.default_rng(12)
    q = mx.array(rng.normal(size=(2, 3, 128)).astype(np.float32))
    raw = mx.array(rng.normal(size=(5, 128)).astype(np.float32))  # 2 earlier rows + 3 chunk rows
    o = np.array(a.attend(q, raw, 2, None, None))
    qn, rn, sink = np.array(q, np.float64), np.array(raw, np.float64), [0.5, -1.0]
    for hh in range(2):
        for t in range(3):
            p = 2 + t
            vis = [j for j in range(5) if p - 4 < j <= p]  # window 4 including the token itself
            s = np.array([qn[hh, t] @ rn[j] for j in vis]) / math.sqrt(128)
            m = max(sink[hh], s.max())
            e = np.exp(s - m)
            want = (e[:, None] * rn[vis]).sum(0) / (np.exp(sink[hh] - m) + e.sum())
            np.testing.assert_allclose(o[hh, t], want, rtol=1e-4, atol=1e-5)


def test_compressed_rows_visible_from_the_completing_token() -> None:
    a = _attention(ratio=4, n_swa=128)
    rng = np.random.default_rng(13)
    q = mx.array(rng.normal(size=(2, 8, 128)).astype(np.float32))
    raw = mx.array(rng.normal(size=(8, 128)).astype(np.float32))
    comp = 0.5 * mx.stack([q[0, 3], q[0, 7]])  # rows for windows 0-3 and 4-7, strongly attended
    o = np.array(a.attend(q, raw, 0, comp, None))
    o_raw = np.array(a.attend(q, raw, 0, None, None))
    # positions 0..2 see no compressed row; position 3 completes window 0 and sees row 0
    np.testing.assert_allclose(o[:, :3], o_raw[:, :3], atol=1e-6)
    assert np.abs(o[:, 3] - o_raw[:, 3]).max() > 1e-3
    # row 1 (window 4..7) changes nothing before position 7, and position 7 does see it
    comp2 = mx.concatenate([comp[:1], 2 * comp[1:]])
    o2 = np.array(a.attend(q, raw, 0, comp2, None))
    np.testing.assert_allclose(o2[:, :7], o[:, :7], atol=1e-6)
    assert np.abs(o2[:, 7] - o[:, 7]).max() > 1e-3


def test_grouped_output_projection_is_block_diagonal() -> None:
    rng = np.random.default_rng(14)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)  # [G, T, X]
    w = rng.normal(size=(2 * 4, 5)).astype(np.float32)  # [G*R, X]
    got = np.array(grouped_linear(mx.array(x), mx.array(w), 2))
    want = np.concatenate([x[0] @ w[:4].T, x[1] @ w[4:].T], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_attention_chunk_equals_token_by_token() -> None:
    a = _attention(n_swa=3)
    h = mx.array(np.random.default_rng(15).normal(size=(7, 32)).astype(np.float32))
    empty = LayerState(raw=mx.zeros((0, 128)))
    whole, st_w = a(h, 0, empty)
    st, outs = empty, []
    for p in range(7):
        o, st = a(h[p : p + 1], p, st)
        outs.append(o)
    np.testing.assert_allclose(np.array(mx.concatenate(outs)), np.array(whole), atol=1e-4)
    assert st.raw.shape == st_w.raw.shape == (3, 128)


def test_indexed_decode_gathers_the_chosen_rows_and_matches_the_masked_chunk() -> None:
    """A ratio-4 layer past top-k: one query at a time (decode, chosen rows gathered, rows
    appended into row buffers) gives what the whole chunk gives (top-k as a mask)."""
    rng = np.random.default_rng(18)
    base = _attention(n_swa=4)
    f = lambda *s: mx.array((rng.normal(size=s) / np.sqrt(s[-1])).astype(np.float32))  # noqa: E731
    comp = _compressor(4, d=128, n_embd=32, seed=3)
    ix = Indexer(2, 128, 3, 4, IndexerWeights(f(2 * 128, 16), f(2, 32)),
                 _compressor(4, d=128, n_embd=32, seed=4, kind="index"), RopeSpec(64, 160000.0, DS4_YARN))
    a = Attention(2, 128, 64, 4, 2, 1e-6, base.w, RopeSpec(64, 160000.0, DS4_YARN), 4, comp, ix)
    kv, sc = _empty_frontier(comp)
    ikv, isc = _empty_frontier(ix.compressor)
    empty = LayerState(raw=mx.zeros((0, 128)), comp=mx.zeros((0, 128)), comp_kv=kv, comp_score=sc,
                       idx=mx.zeros((0, 128)), idx_kv=ikv, idx_score=isc)
    h = mx.array(rng.normal(size=(40, 32)).astype(np.float32))  # 10 rows, 3 chosen from token 15 on
    whole, st_w = a(h, 0, empty)
    st, outs = empty, []
    for p in range(40):
        o, st = a(h[p : p + 1], p, st)
        outs.append(o)
    np.testing.assert_allclose(np.array(mx.concatenate(outs)), np.array(whole), atol=1e-4)
    assert st.comp_rows is not None and st.comp_rows.capacity >= 10
    np.testing.assert_allclose(np.array(st.comp), np.array(st_w.comp), atol=1e-5)  # float noise of the pooling
    np.testing.assert_allclose(np.array(st.idx), np.array(st_w.idx), atol=1e-5)


# ---- indexer (§2.5.2, §7.10) -----------------------------------------------------------------

def test_topk_ties_go_to_the_lower_index() -> None:
    s = mx.array([[1.0, 3.0, 2.0, 3.0, 2.0, -mx.inf]])
    assert np.array(topk_mask(s, 2)).tolist() == [[False, True, False, True, False, False]]
    assert np.array(topk_mask(s, 3)).tolist() == [[False, True, True, True, False, False]]
    assert np.array(topk_indices(s, 3)).tolist() == [[1, 2, 3]]


def test_indexer_selects_only_beyond_top_k_and_causally() -> None:
    rng = np.random.default_rng(16)
    heads, dim, n_embd = 2, 128, 32
    w = IndexerWeights(mx.array(rng.normal(size=(heads * dim, 16)).astype(np.float32)),
                       mx.array(rng.normal(size=(heads, n_embd)).astype(np.float32)))
    ix = Indexer(heads, dim, 3, 4, w, _compressor(4, d=128, kind="index"), RopeSpec(64, 160000.0, DS4_YARN))
    rows = mx.array(rng.normal(size=(6, dim)).astype(np.float32))
    qn = mx.array(rng.normal(size=(24, 16)).astype(np.float32))
    h = mx.array(rng.normal(size=(24, n_embd)).astype(np.float32))
    pos = np.arange(24)
    assert ix.visible(qn[:15], h[:15], pos[:15], rows) is None  # at most 3 rows visible up to p=15
    m = np.array(ix.visible(qn, h, pos, rows))
    n_vis = (pos + 1) // 4
    for t in range(24):
        assert not m[t, n_vis[t]:].any()  # never a future row
        assert m[t].sum() == min(n_vis[t], 3)
    q, wi = ix.queries(qn, h, pos)
    s = np.array(ix.scores(q, wi, rows))
    t = 23  # 6 visible rows, 3 chosen: the best scores (ReLU per head, weighted)
    assert set(np.nonzero(m[t])[0]) == set(np.argsort(-s[t], kind="stable")[:3])
    qq, rr, ww = np.array(q, np.float64), np.array(rows, np.float64), np.array(wi, np.float64)
    want = sum(ww[t, hh] * np.maximum(qq[hh, t] @ rr.T, 0) for hh in range(heads))
    np.testing.assert_allclose(s[t], want, rtol=1e-4)


# ---- MoE (§2.6, §7.12, §7.13) ----------------------------------------------------------------

class _Dense:
    def __init__(self, w: np.ndarray) -> None:
        self.w, self.shape = mx.array(w), w.shape

    def experts(self, ids: np.ndarray) -> mx.array:
        return self.w[mx.array(np.asarray(ids, np.int32))]


def _moe(hash_routed: bool, bias: np.ndarray | None) -> MoE:
    rng = np.random.default_rng(17)
    e, ff, d = 4, 8, 6
    f = lambda *s: (rng.normal(size=s) * 2).astype(np.float32)  # noqa: E731
    w = MoEWeights(mx.array(f(e, d)), None if bias is None else mx.array(bias),
                   mx.array(np.array([[3, 1], [0, 2]] * 4, np.int32)),
                   _Dense(f(e, ff, d)), _Dense(f(e, ff, d)), _Dense(f(e, d, ff)),
                   mx.array(f(ff, d)), mx.array(f(ff, d)), mx.array(f(d, ff)))
    return MoE(2, hash_routed, 1.5, 10.0, w)


def test_hash_routing_ignores_the_bias_but_uses_router_weights() -> None:
    big = np.array([100.0, 0.0, 0.0, 100.0], np.float32)
    m = _moe(True, big)
    g = mx.array(np.random.default_rng(18).normal(size=(2, 6)).astype(np.float32))
    sel, wt = m.route(g, mx.array([0, 1]))
    assert np.array(sel).tolist() == [[3, 1], [0, 2]]
    prob = np.sqrt(np.log1p(np.exp(np.array(g) @ np.array(m.w.router).T)))
    want = prob[0, [3, 1]] / prob[0, [3, 1]].sum() * 1.5
    np.testing.assert_allclose(np.array(wt)[0], want, rtol=1e-5)


def test_bias_chooses_but_does_not_weight() -> None:
    m = _moe(False, np.array([0.0, 50.0, 50.0, 0.0], np.float32))
    g = mx.array(np.random.default_rng(19).normal(size=(3, 6)).astype(np.float32))
    sel, wt = m.route(g, mx.array([0, 1, 2]))
    assert np.array(sel).tolist() == [[1, 2]] * 3
    prob = np.sqrt(np.log1p(np.exp(np.array(g) @ np.array(m.w.router).T)))
    np.testing.assert_allclose(np.array(wt), prob[:, [1, 2]] / prob[:, [1, 2]].sum(1, keepdims=True) * 1.5, rtol=1e-5)


def test_swiglu_clamp_is_asymmetric_on_routed_and_shared() -> None:
    gate = mx.array([20.0, -20.0, 1.0])
    up = mx.array([20.0, -20.0, 30.0])
    got = np.array(swiglu(gate, up, 10.0))
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    np.testing.assert_allclose(got, [silu(10) * 10, silu(-20) * -10, silu(1) * 10], rtol=1e-5)
    m = _moe(False, None)
    g = mx.array(np.random.default_rng(20).normal(size=(2, 6)).astype(np.float32) * 5)
    gn = np.array(g, np.float64)
    gs = gn @ np.array(m.w.gate_sh, np.float64).T
    us = gn @ np.array(m.w.up_sh, np.float64).T
    assert np.abs(us).max() > 10 and gs.max() > 10  # the clamp is active in this case
    gc = np.minimum(gs, 10)
    want = (gc / (1 + np.exp(-gc)) * np.clip(us, -10, 10)) @ np.array(m.w.down_sh, np.float64).T
    np.testing.assert_allclose(np.array(m.shared(g)), want, rtol=1e-4, atol=1e-4)


def test_routed_experts_match_the_per_token_formula() -> None:
    m = _moe(False, None)
    g = mx.array(np.random.default_rng(21).normal(size=(5, 6)).astype(np.float32))
    sel, wt = m.route(g, mx.arange(5))
    got = np.array(m.routed(g, sel, wt))
    gate, up, down = (np.array(b.w, np.float64) for b in (m.w.gate_exps, m.w.up_exps, m.w.down_exps))
    for t in range(5):
        want = 0
        for k, e in enumerate(np.array(sel)[t]):
            gv = np.minimum(gate[e] @ np.array(g)[t], 10)
            mid = gv / (1 + np.exp(-gv)) * np.clip(up[e] @ np.array(g)[t], -10, 10)
            want = want + down[e] @ (mid * np.array(wt)[t, k])
        np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-4)


def test_softplus_regimes() -> None:
    x = mx.array([-30.0, 0.0, 30.0])
    np.testing.assert_allclose(np.array(softplus(x)), [math.exp(-30), math.log(2), 30.0], rtol=1e-5)


def test_few_token_experts_from_blocks_match_dequantized(monkeypatch) -> None:
    """Experts with few tokens go through the native few-row kernel on their blocks; the
    result must match dequantize-then-matmul (the path for experts with many tokens)."""
    from workbench.gguf import quants
    from workbench.gguf.quants import QTensor
    from workbench.spec.ggml import Q8_0
    from workbench.model import moe as moe_mod

    if not quants.native_available():
        pytest.skip("native kernels not built (make native)")
    rng = np.random.default_rng(23)
    e, ff, d = 4, 64, 96

    def bank(out: int, n_in: int) -> QTensor:
        blocks = rng.integers(0, 256, (e * out * n_in // 32, 34), dtype=np.uint8)
        blocks[:, :2] = rng.uniform(0.01, 0.05, (blocks.shape[0], 1)).astype("<f2").view(np.uint8)
        return QTensor(blocks.reshape(e, out, -1), Q8_0, (e, out, n_in))

    f = lambda *s: (rng.normal(size=s) * 0.3).astype(np.float32)  # noqa: E731
    w = MoEWeights(mx.array(f(e, d)), None, None, bank(ff, d), bank(ff, d), bank(d, ff),
                   mx.array(f(ff, d)), mx.array(f(ff, d)), mx.array(f(d, ff)))
    m = MoE(2, False, 1.5, 10.0, w)
    g = mx.array(rng.normal(size=(6, d)).astype(np.float32))
    sel, wt = m.route(g, mx.arange(6))
    assert m._blocks_direct()
    direct = np.array(m.routed(g, sel, wt))
    monkeypatch.setattr(moe_mod, "QMV_MAX_TOKENS", 0)
    dequantized = np.array(m.routed(g, sel, wt))
    scale = np.abs(dequantized).max()  # float32 sums in another order: relative to the output's size
    assert scale > 1
    np.testing.assert_allclose(direct, dequantized, rtol=1e-4, atol=1e-5 * scale)
