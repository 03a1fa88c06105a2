"""Chain pieces carry the flat files' footer: checksums and the model fingerprint are
checked on restore and by kv verify; a bad or other-model piece is a one-line load
failure, the entry is skipped afterwards (a cold prefill), nothing is deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_kv_chain import CTX, conversation
from test_kv_format import SMALL, assert_same_state

from workbench.cli import main as cli_main
from workbench.kv.chain import CHAIN_CHUNK, read_link
from workbench.kv.checksum import FOOTER_MAGIC, footer_bytes
from workbench.kv.errors import KVLoadError
from workbench.kv.header import SaveReason
from workbench.kv.store import KVStore

FA, FB = b"A" * 32, b"B" * 32


def _chained(d: Path, turns: int = 3, **kw) -> tuple[KVStore, list]:
    st = KVStore(d, budget_mb=None, min_tokens=1, kv_layout="chain", fingerprint=FA, **kw)
    conv = conversation(turns, step=300)
    for state, text in conv:
        assert st.save(state, text, SaveReason.CONTINUED).saved
    return st, conv


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_chain_pieces_have_the_footer_and_restore_verified(tmp_path) -> None:
    st, conv = _chained(tmp_path)
    for e in st.entries():
        link = read_link(e.path)
        assert link.trailer.kind == "footer" and link.trailer.fingerprint == FA
        assert e.path.read_bytes()[-4:] == FOOTER_MAGIC
        assert e.file_size == e.header.payload_end + footer_bytes(e.header.payload_bytes, CHAIN_CHUNK)
    leaf = max(st.entries(), key=lambda e: e.tokens)
    back, _ = st.load(leaf, SMALL, CTX)
    assert_same_state(conv[-1][0], back)
    assert st.events[-1].checksum == "verified"
    assert all(r.ok and r.checksum == "verified" for r in st.verify(SMALL))
    plain = KVStore(tmp_path / "plain", budget_mb=None, min_tokens=1, kv_layout="chain", checksum=False)
    for state, text in conv:
        plain.save(state, text, SaveReason.CONTINUED)
    leaf = max(plain.entries(), key=lambda e: e.tokens)
    assert read_link(leaf.path).trailer.kind == "none"
    assert_same_state(conv[-1][0], plain.load(leaf, SMALL, CTX)[0])
    assert plain.events[-1].checksum == "absent"


def test_corrupt_ancestor_rows_fail_restore_are_skipped_and_verify_finds_them(tmp_path, capsys) -> None:
    st, conv = _chained(tmp_path)
    base = min(st.entries(), key=lambda e: e.tokens)
    _flip(base.path, base.header.payload_offset + 2000)  # in the base's grown rows, which every restore reads
    text = conv[-1][1]
    leaf = st.lookup(text, CTX, 1)
    with pytest.raises(KVLoadError, match=f"{base.path.name}: payload checksum mismatch") as err:
        st.load(leaf, SMALL, CTX)
    assert "\n" not in str(err.value)
    assert st.lookup(text, CTX, 1).sha != leaf.sha  # the failed entry is skipped: a shorter hit or cold
    assert st.load(leaf, SMALL, CTX, verify=False)[0].n_tokens == leaf.tokens  # structure is intact
    capsys.readouterr()
    assert cli_main(["kv", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 3 and "checksum mismatch" in out  # the base and both descendants
    assert len(st.entries()) == 3  # nothing deleted


def test_an_ancestors_changed_part_is_checked_by_its_own_restore_only(tmp_path, capsys) -> None:
    """A descendant's restore reads an ancestor's grown rows and at most one footer chunk
    past them; the ancestor's own raw window, frontiers and logits are checked when it is
    itself restored (and by kv verify)."""
    st, conv = _chained(tmp_path)
    base, mid, leaf = sorted(st.entries(), key=lambda e: e.tokens)
    assert base.header.payload_bytes > 2 * CHAIN_CHUNK  # the changed part runs past the checked chunk
    _flip(base.path, base.header.payload_end - 3)  # the last layer's frontier
    assert st.load(leaf, SMALL, CTX)[0].n_tokens == leaf.tokens
    with pytest.raises(KVLoadError, match="payload checksum mismatch"):
        st.load(base, SMALL, CTX)
    capsys.readouterr()
    assert cli_main(["kv", "verify", str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("FAIL") == 1


def test_other_model_leaf_is_a_miss_and_other_model_piece_is_corrupt(tmp_path) -> None:
    st, conv = _chained(tmp_path)
    other = KVStore(tmp_path, budget_mb=None, min_tokens=1, kv_layout="chain", fingerprint=FB)
    leaf = max(st.entries(), key=lambda e: e.tokens)
    with pytest.raises(KVLoadError, match="different model .*fingerprint"):
        other.load(leaf, SMALL, CTX)
    # the other model never chains onto this model's entries, and replaces the base
    state, text = conv[0]
    res = other.save(state, text, SaveReason.CONTINUED)
    assert res.saved and read_link(res.path).ref.parent is None and read_link(res.path).trailer.fingerprint == FB
    with pytest.raises(KVLoadError, match=f"chain piece {res.path.name} written by a different model"):
        st.load(leaf, SMALL, CTX)
    assert os.path.exists(leaf.path)


def test_unusable_leaf_logits_are_refused_as_a_flat_files_are(tmp_path) -> None:
    import mlx.core as mx
    import numpy as np

    st, conv = _chained(tmp_path, turns=2)
    state, text = conv[-1]
    state.logits = mx.array(np.full(SMALL.n_vocab, np.nan, dtype=np.float32))
    res = st.save(state, text + b" nan", SaveReason.CONTINUED)
    assert res.saved and read_link(res.path).ref.parent is not None
    with pytest.raises(KVLoadError, match="not finite"):
        st.load(res.path, SMALL, CTX)


def test_a_link_in_place_of_a_chain_piece_is_never_followed(tmp_path) -> None:
    st, conv = _chained(tmp_path)
    base, mid, leaf = sorted(st.entries(), key=lambda e: e.tokens)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.kvd"
    os.replace(mid.path, outside)
    os.symlink(outside, mid.path)  # the same bytes, reached through a link
    with pytest.raises(KVLoadError, match=f"{mid.path.name}.*symbolic link"):
        st.load(leaf.path, SMALL, CTX)
    assert outside.exists() and leaf.path.exists()
