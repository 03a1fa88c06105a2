"""The session state's layout: shapes, byte breakdown and validation; row buffers."""

import io

import mlx.core as mx
import numpy as np
import pytest

from workbench.kv.dsv4 import write_payload
from workbench.spec.statelayout import StateLayout
from workbench.state import EMPTY_SCORE, ROW_STEP, RowBuffer, SessionState, StateError, join, random_state


def test_ds4_layout_fixed_and_per_token_bytes():
    lay = StateLayout.ds4()
    assert lay.ratios[:5] == (0, 0, 4, 128, 4) and lay.ratios.count(4) == 21 and lay.ratios.count(128) == 20
    # spec (ds4-kvcache.md §1.4): 11,272,192 raw + 1,720,320 + 10,485,760 frontiers at T >= 128
    kv = lambda T: sum(r["bytes"] for r in lay.layer_bytes_at(T))
    assert kv(256) - kv(128) == 128 * (13764 - 4)  # per token minus the 4-byte token id
    fixed = kv(128) - 128 * (13764 - 4)
    assert fixed == 11_272_192 + 1_720_320 + 10_485_760


def test_empty_state_is_valid_and_breakdown_matches_layout():
    lay = StateLayout(n_layer=4, head_dim=128, idx_dim=128, n_vocab=1000, n_swa=128, ratios=(0, 0, 4, 128))
    s = SessionState.empty(lay, ctx=4096)
    assert s.prefill_chunk == 2048 and s.problems() == []
    assert s.layers[2].comp_score.shape == (8, 256) and s.layers[2].comp_score[0, 0].item() == mx.array(EMPTY_SCORE).item()
    assert s.layers[3].comp_kv.shape == (128, 128) and s.layers[3].idx is None
    assert s.layer_bytes() == [r for r in lay.layer_bytes_at(0)]


def test_problems_name_the_layer_and_field():
    lay = StateLayout(n_layer=3, head_dim=128, idx_dim=128, n_vocab=10, n_swa=4, ratios=(0, 4, 128))
    s = SessionState.empty(lay, ctx=64)
    s.tokens = [1, 2, 3, 4, 5]
    s.logits = mx.zeros((10,))
    s.layers[0].raw = mx.zeros((5, 128))  # window is 4
    probs = s.problems()
    assert any("layer 0: raw shape (5, 128), expected (4, 128)" in p for p in probs)
    assert any("layer 1: comp shape (0, 128), expected (1, 128)" in p for p in probs)
    c = s.copy()
    c.tokens.append(9)
    assert s.n_tokens == 5


def test_ds4_args_match_the_ds4_layout_and_are_consistent():
    from workbench.spec.args import ModelArgs

    args = ModelArgs.ds4()
    assert args.problems() == []
    assert StateLayout.from_args(args) == StateLayout.ds4()
    assert args.hc_dim == 16384 and args.hc_mix == 24 and args.n_nope == 448


def test_layer_range_states_slice_validate_and_join():
    lay = StateLayout(n_layer=4, head_dim=16, idx_dim=8, n_vocab=10, n_swa=4, ratios=(0, 0, 4, 128))
    part = SessionState.empty(lay, ctx=64, start=1, stop=3)
    assert (part.start, part.stop, len(part.layers)) == (1, 3, 2) and not part.is_whole and not part.has_last_layer
    assert part.problems() == [] and part.layers[1].idx.shape == (0, 8)  # layer 2 has the indexer
    whole = SessionState.empty(lay, ctx=64)
    whole.tokens, whole.logits = [1, 2, 3, 4, 5], mx.arange(10, dtype=mx.float32)
    whole.layers[0].raw = whole.layers[1].raw = whole.layers[2].raw = whole.layers[3].raw = mx.ones((4, 16))
    whole.layers[2].comp, whole.layers[2].idx = mx.ones((1, 16)), mx.ones((1, 8))
    assert whole.is_whole and whole.problems() == []
    head, tail = whole.layer_slice(0, 3), whole.layer_slice(3, 4)
    assert head.logits is None and tail.logits is whole.logits and head.problems() == tail.problems() == []
    assert [r["layer"] for r in tail.layer_bytes()] == [3, 3, 3]
    tail.logits = None
    assert tail.problems() == ["logits shape None, expected (10,)"]  # the last layer's range carries them
    tail.logits = whole.logits
    joined = join([tail, head])
    assert joined.is_whole and joined.problems() == [] and joined.layers[3] is tail.layers[0]
    with pytest.raises(StateError, match="cover layers 0..2"):
        join([head])
    head.tokens = [1]
    with pytest.raises(StateError, match="disagree"):
        join([head, tail])
    with pytest.raises(StateError, match="outside the state's layers 0..2"):
        head.layer_slice(2, 4)
    assert SessionState(lay, 64, 64, start=2, stop=3).problems() == ["0 layers for range 2..2"]


# ---- row buffers: compressed/indexer rows grow without copying the rows before them ----------

def _rows(rng, n, width=8):
    return mx.array(rng.normal(size=(n, width)).astype(np.float32))


def test_row_buffer_appends_in_place_and_keeps_older_views():
    rng = np.random.default_rng(0)
    first, second, third = _rows(rng, 3), _rows(rng, 2), _rows(rng, 1)
    a, buf = RowBuffer.append(mx.zeros((0, 8)), None, first)
    b, buf_b = RowBuffer.append(a, buf, second)
    c, buf_c = RowBuffer.append(b, buf_b, third)
    assert buf_b is buf and buf_c is buf and buf.capacity == ROW_STEP and buf.filled == 6  # one allocation
    want = np.concatenate([np.array(first), np.array(second), np.array(third)])
    assert np.array_equal(np.array(c), want)
    assert np.array_equal(np.array(a), want[:3]) and np.array_equal(np.array(b), want[:5])  # older views intact
    same, same_buf = RowBuffer.append(c, buf, mx.zeros((0, 8)))
    assert same is c and same_buf is buf  # no new rows: nothing copied


def test_row_buffer_forks_an_older_view_and_grows_past_its_capacity():
    rng = np.random.default_rng(1)
    a, buf = RowBuffer.append(mx.zeros((0, 8)), None, _rows(rng, 4))
    b, _ = RowBuffer.append(a, buf, _rows(rng, 1))
    other = _rows(rng, 2)
    forked, fork_buf = RowBuffer.append(a, buf, other)  # `a` is no longer the tip: copied, never overwrites b
    assert fork_buf is not buf
    assert np.array_equal(np.array(forked), np.concatenate([np.array(a), np.array(other)]))
    assert np.array_equal(np.array(b)[:4], np.array(a)) and not np.array_equal(np.array(b)[4], np.array(other)[0])
    big = _rows(rng, ROW_STEP)
    grown, grown_buf = RowBuffer.append(b, buf, big)  # does not fit: a larger buffer
    assert grown_buf is not buf and grown_buf.capacity >= grown.shape[0] * 1.25
    assert np.array_equal(np.array(grown), np.concatenate([np.array(b), np.array(big)]))


def test_a_state_in_row_buffers_serialises_like_plain_arrays():
    lay = StateLayout(n_layer=3, head_dim=128, idx_dim=128, n_vocab=10, n_swa=4, ratios=(0, 4, 128))
    plain = random_state(lay, 300, 1024).to_mlx()
    grown = plain.copy()
    for ls in grown.layers:
        for name in ("comp", "idx"):
            rows = getattr(ls, name)
            if rows is not None and rows.shape[0] > 7:  # the same rows, appended in two steps into a row buffer
                head, buf = RowBuffer.append(rows[:0], None, rows[:7])
                view, again = RowBuffer.append(head, buf, rows[7:])
                assert again is buf
                setattr(ls, name, view)
                setattr(ls, f"{name}_rows", buf)
    out_plain, out_grown = io.BytesIO(), io.BytesIO()
    write_payload(out_plain, plain)
    write_payload(out_grown, grown)
    assert out_plain.getvalue() == out_grown.getvalue()
