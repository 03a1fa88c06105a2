"""The live session on the tiny model: chunked prefill equals token-by-token decoding,
split prefills, snapshot/restore, the context limit, decode, bad files."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from workbench.sampling import Sampler
from workbench.session import ModelFileError, Progress, Session, SessionError, chunk_schedule, load

# Chunking only reorders float32 accumulation (~1e-6 relative), but the FP8/FP4
# simulations turn that noise into whole-code flips now and then, and a flipped indexer
# key can swap a row in a top-k selection: measured on this prompt, chunked vs
# token-by-token logits (magnitude ~5) differ by up to 3.5e-3. Mutations of the
# visibility rules move them far more (measured: raw window 127 instead of 128: 0.14;
# top-k 7 instead of 8: 0.07; no indexer: 1.8; sinks zeroed: 0.05; no FP8 on raw rows:
# 0.08), so 1e-2 separates float noise from wrong math.
LOGIT_TOL = 1e-2
N_TOKENS = 300  # > 128 raw rows, two ratio-128 rows, 75 indexer rows vs top-k 8


@pytest.fixture(scope="module")
def session(tiny_gguf: Path) -> Session:
    return load(tiny_gguf, ctx=1024)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return [int(t) for t in np.random.default_rng(7).integers(0, 129280, N_TOKENS)]


@pytest.fixture(scope="module")
def token_by_token(session: Session, prompt: list[int]) -> dict:
    session.reset()
    session.prefill(prompt, chunk=1)
    return {"logits": np.array(session.logits), "state": session.snapshot()}


def _logits_after(session: Session, parts: list[list[int]], chunk: int) -> np.ndarray:
    session.reset()
    for part in parts:
        session.prefill(part, chunk=chunk)
        assert session.state.problems() == []
    return np.array(session.logits)


def test_context_exercises_every_row_kind(token_by_token: dict, session: Session) -> None:
    st, args = token_by_token["state"], session.args
    assert st.problems() == []
    for L, ls in enumerate(st.layers):
        r = args.ratio(L)
        assert ls.raw.shape[0] == args.n_swa
        if r == 128:
            assert ls.comp.shape[0] == N_TOKENS // 128 >= 2
        if r == 4:
            assert ls.idx.shape[0] == N_TOKENS // 4 > args.idx_topk


@pytest.mark.parametrize("chunk", [7, 64, 2048])
def test_chunked_prefill_matches_token_by_token(session: Session, prompt: list[int], token_by_token: dict,
                                                 chunk: int) -> None:
    got = _logits_after(session, [prompt], chunk)
    ref = token_by_token["logits"]
    assert np.abs(got - ref).max() <= LOGIT_TOL
    assert int(np.argmax(got)) == int(np.argmax(ref))


@pytest.mark.parametrize("cut,chunk", [(37, 64), (129, 32), (200, 2048)])
def test_unaligned_resumed_prefill_matches(session: Session, prompt: list[int], token_by_token: dict,
                                           cut: int, chunk: int) -> None:
    got = _logits_after(session, [prompt[:cut], prompt[cut:]], chunk)
    assert np.abs(got - token_by_token["logits"]).max() <= LOGIT_TOL


def test_state_rows_agree_across_chunk_sizes(session: Session, prompt: list[int]) -> None:
    _logits_after(session, [prompt], 2048)
    ref = session.snapshot()
    _logits_after(session, [prompt], 64)
    for L, (a, b) in enumerate(zip(session.state.layers, ref.layers)):
        for name, x in a.tensors():
            y = getattr(b, name)
            assert x.shape == y.shape, (L, name)
            diff = np.abs(np.array(x) - np.array(y))
            # identical up to float noise, except rare one-code QAT flips
            assert np.mean(diff > 1e-3) < 0.01, (L, name)


def test_resumed_schedule_is_absolute(session: Session) -> None:
    assert chunk_schedule(0, 300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert chunk_schedule(37, 263, 128) == [(37, 128), (128, 256), (256, 300)]
    assert chunk_schedule(5, 0, 128) == []


def test_split_prefill_equals_whole(session: Session, prompt: list[int]) -> None:
    whole = _logits_after(session, [prompt[:160]], 2048)
    split = _logits_after(session, [prompt[:100], prompt[100:160]], 2048)
    assert session.n_tokens == 160 and session.tokens == prompt[:160]
    assert np.abs(whole - split).max() <= LOGIT_TOL


def test_snapshot_restore_continue_equals_never_stopping(session: Session, prompt: list[int]) -> None:
    session.reset()
    session.prefill(prompt[:140], chunk=64)
    snap = session.snapshot()
    out1 = session.decode(4)
    logits1 = np.array(session.logits)
    session.prefill(prompt[140:150])  # wander off
    session.restore(snap)
    assert session.tokens == prompt[:140] and session.state.problems() == []
    out2 = session.decode(4)
    assert out1 == out2 and session.state.problems() == []
    np.testing.assert_array_equal(np.array(session.logits), logits1)
    # the snapshot itself was not touched by what happened after it
    assert snap.n_tokens == 140 and snap.problems() == []


def test_decode_feeds_tokens_and_stops(session: Session, prompt: list[int]) -> None:
    session.reset()
    session.prefill(prompt[:20])
    first = int(np.argmax(np.array(session.logits)))
    out = session.decode(3, sampler=Sampler(temperature=0.0))
    assert out[0] == first and session.n_tokens == 23 and session.tokens[20:] == out
    session.reset()
    session.prefill(prompt[:20])
    out = session.decode(5, stop=[first])
    assert out == [first] and session.n_tokens == 20  # the stop token is returned, not fed


def test_step_equals_prefill_of_one(session: Session, prompt: list[int]) -> None:
    session.reset()
    session.prefill(prompt[:10])
    a = np.array(session.step(prompt[10]))
    b = _logits_after(session, [prompt[:11]], 1)
    assert np.abs(a - b).max() <= LOGIT_TOL


def test_context_limit_is_checked_before_any_work(tiny_gguf: Path) -> None:
    s = load(tiny_gguf, ctx=16)
    s.prefill(list(range(10)))
    before = s.snapshot()
    with pytest.raises(SessionError, match="context full"):
        s.prefill(list(range(7)))
    assert s.n_tokens == 10 and s.state.logits is before.logits
    with pytest.raises(SessionError, match="context full"):
        s.decode(7)
    with pytest.raises(SessionError, match="outside the vocabulary"):
        s.prefill([129280])


def test_progress_reports_tokens(session: Session, prompt: list[int]) -> None:
    seen: list[Progress] = []
    session.reset()
    stats = session.prefill(prompt[:70], chunk=32, progress=seen.append)
    assert stats.tokens == 70 and stats.chunks == 3 and stats.tokens_per_s > 0
    assert all(p.stage == "prefill" and p.total == 70 for p in seen)
    done = [p.done for p in seen]
    assert done == sorted(done) and done[-1] == 70
    assert len(seen) == 3 * session.args.n_layer


def test_restore_checks_ctx_and_adopts_the_sessions(session: Session, tiny_gguf: Path) -> None:
    other = load(tiny_gguf, ctx=8)
    session.reset()
    session.prefill(list(range(12)))
    with pytest.raises(SessionError, match="ctx"):
        other.restore(session.snapshot())
    session.reset()
    session.prefill(list(range(6)))
    other.restore(session.snapshot())
    assert other.state.ctx == 8 and other.tokens == list(range(6))
    with pytest.raises(SessionError, match="context full"):
        other.prefill(list(range(3)))


def test_load_lists_layout_problems(tmp_path: Path) -> None:
    from gguf_helpers import write_tiny

    bad = write_tiny(tmp_path / "bad.gguf", drop_tensors=("blk.2.indexer.proj.weight",))
    with pytest.raises(ModelFileError, match="indexer.proj"):
        load(bad, ctx=64)


def test_state_logits_always_float32_vocab(session: Session) -> None:
    session.reset()
    session.prefill([1, 2, 3])
    assert session.logits.dtype == mx.float32 and session.logits.shape == (session.args.n_vocab,)
