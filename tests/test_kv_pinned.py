"""Checkpoint bytes pinned across refactors: the same state must give the same bytes.

The digests below were taken from the code before ``workbench/kv/`` was split by job
(issue 10); any change to them is a change of the on-disk format, never a refactor.
The one deliberate change since (issue 11, today's ds4 ABI): byte 20 = 2, DSV4 payload
version 2, and the checksum in a footer instead of an ext-bit-3 trailer. Each new file
is checked to turn back into the old pinned bytes by undoing exactly that
(``kv_craft.to_may_with_checksum``), so nothing else changed.
States are deterministic (NumPy PCG64 by seed); the store's clock is pinned (created_at
is covered by the header checksum), and the random save id of a sharded checkpoint is
replaced by a fixed one.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest

pytest.importorskip("xxhash")  # the default chunk checksum (algorithm 2) needs it

import kv_craft  # noqa: E402
from workbench.bench.staged import write_staged  # noqa: E402
from workbench.kv import kvfile  # noqa: E402
from workbench.kv import shards as S  # noqa: E402
from workbench.kv.header import ExtFlag, SaveReason  # noqa: E402
from workbench.kv.store import KVStore  # noqa: E402
from workbench.spec.statelayout import StateLayout  # noqa: E402
from workbench.state import SessionState, random_state  # noqa: E402

SMALL = StateLayout(n_layer=6, head_dim=64, idx_dim=32, n_vocab=512, n_swa=128, ratios=(0, 0, 4, 128, 4, 128))
NOW = 1_780_000_000
TEXT = "<｜User｜>pinned héllo".encode()


def det_state(T: int, ctx: int = 4096, seed: int = 7) -> SessionState:
    """A state of ``T`` tokens whose contents depend only on ``seed``."""
    return random_state(SMALL, T, ctx, seed)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def as_may_2026(blob: bytes, text_len: int, payload_len: int, checksum: bool) -> bytes:
    """Today's file turned back into the pre-ABI-change bytes: byte 20 = 0, payload
    version 1, and (with a checksum) ext bit3 with the KCS v1 trailer instead of the footer."""
    if checksum:
        return kv_craft.to_may_with_checksum(blob, text_len, payload_len, 2)
    old = bytearray(blob)
    old[20] = 0
    old[52 + text_len + 4] = 1
    return bytes(old)


def only_abi_changed(new: bytes, old_digest: str, checksum: bool) -> None:
    """``new`` differs from the pinned pre-change file only in bytes 7/20, the payload
    version and the footer; byte 7 stays 0 (Flash)."""
    text_len, payload_len = struct.unpack_from("<I", new, 48)[0], struct.unpack_from("<Q", new, 40)[0]
    end = 52 + text_len + payload_len
    assert new[7] == 0 and new[20] == 2 and new[52 + text_len + 4] == 2 and new[6] & 8 == 0
    assert (new[end:][-4:] == b"KWBF") if checksum else len(new) == end
    assert digest(as_may_2026(new, text_len, payload_len, checksum)) == old_digest


# (tokens, checksum, reason, ext flags) -> sha256[:32] of write_kv_file's bytes at NOW: (today, before issue 11)
KV_FILES = {
    (5, True, SaveReason.COLD, 0): ("bed4f461bc8bffecfaddaf399aa7fa83", "bea6e3d5979da766d86bac270a4114aa"),
    (300, True, SaveReason.CONTINUED, ExtFlag.THINKING_VISIBLE):
        ("1f62593f7124c9e6c4f9fcc6f0175f7c", "6c37989d487383b089c7178710178b3a"),
    (300, False, SaveReason.EVICT, 0): ("730997c0d7a9a7ecbf4b29926080e5a5", "da0448cb4dcab7915733a3a7a9f908ad"),
    (129, True, SaveReason.SHUTDOWN, ExtFlag.RESPONSES_VISIBLE):
        ("7ac2301813476e3139549523147c631b", "5a475fd9fec7cb83440794c5308167fc"),
}


@pytest.mark.parametrize("key", list(KV_FILES), ids=lambda k: f"T{k[0]}-{'kcs' if k[1] else 'plain'}-{k[2].name}")
def test_kv_file_bytes_pinned(key: tuple) -> None:
    T, checksum, reason, ext = key
    buf = io.BytesIO()
    _, n = kvfile.write_kv_file(buf, det_state(T), TEXT, quant_bits=2, reason=reason, ext_flags=ext, checksum=checksum,
                                now=NOW)
    assert n == len(buf.getvalue())
    assert digest(buf.getvalue()) == KV_FILES[key][0]
    only_abi_changed(buf.getvalue(), KV_FILES[key][1], checksum)


# KVStore.save of det_state(300) under TEXT at NOW: (today, before issue 11)
STORE_FILE = ("be523b6aa0d574ead9a9a1ba29c91e5f", "f50103e7b759f3847911cb0854e35077")


@pytest.mark.parametrize("writer", [None, write_staged], ids=["direct", "staged"])
def test_store_save_bytes_pinned(tmp_path: Path, writer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.time", lambda: float(NOW))  # created_at is covered by the header checksum
    store = KVStore(tmp_path, budget_mb=None, min_tokens=1, maintain=False)
    res = store.save(det_state(300), TEXT, SaveReason.COLD, writer=writer)
    assert res.saved and res.path.name == hashlib.sha1(TEXT).hexdigest() + ".kv"
    assert digest(res.path.read_bytes()) == STORE_FILE[0]
    only_abi_changed(res.path.read_bytes(), STORE_FILE[1], True)


# the DSVL shard files of det_state(300) split 0-1 / 2-5
SHARDS = {"L0-1": "497ae19ded81256b97db922d3a07275b", "L2-5": "2ed140bbdbcaddd1e3b14ac6bd091235"}
MANIFEST = "9c85c4d9ce34fca6b380abdb58cda0dc"  # its manifest.json, save id replaced by 16 zeros
# checkpoint_to_kv of kv_to_checkpoint of the pinned T=300 file: (today, before issue 11)
ROUND_TRIP = ("f340b52ab5ab603d7cf3923e1867ab37", "f317cecb1d42d0b958c5542a6cb19192")


def test_sharded_checkpoint_bytes_pinned(tmp_path: Path) -> None:
    state = det_state(300)
    m = S.write_checkpoint(tmp_path / "c", [state.layer_slice(0, 2), state.layer_slice(2, 6)],
                           TEXT, reason=SaveReason.COLD, created_at=NOW, last_used=NOW + 5, hits=3)
    got = {e.file.split(".")[1]: digest((tmp_path / "c" / e.file).read_bytes()) for e in m.shards}
    assert got == SHARDS
    manifest = (tmp_path / "c" / "manifest.json").read_text().replace(m.save_id, "0" * 16)
    assert digest(manifest.encode()) == MANIFEST
    kv = tmp_path / "one.kv"
    with open(kv, "wb") as f:
        kvfile.write_kv_file(f, state, TEXT, quant_bits=4, reason=SaveReason.COLD, now=NOW, hits=2)
    S.kv_to_checkpoint(kv, tmp_path / "d", 3)
    out = S.checkpoint_to_kv(tmp_path / "d", tmp_path / "back.kv")
    assert out.read_bytes() == kv.read_bytes()
    assert digest(out.read_bytes()) == ROUND_TRIP[0]
    only_abi_changed(out.read_bytes(), ROUND_TRIP[1], True)
