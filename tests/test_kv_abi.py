"""Today's ds4 .kv ABI and its trailers, both directions, and the workbench's footer.

Files are crafted byte by byte as ds4 writes them today (byte 7 model id, byte 20 ABI 2,
DSV4 payload v2; a title trailer, a tool-map trailer, a payload-less /strip file) and
as it wrote them in May 2026 (ABI 0, payload v1) by ``kv_craft``, not by the workbench's
writer; ``kv ls/show/verify`` must accept them with exit status 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
from test_kv_format import SMALL, assert_same_state, random_state

import kv_craft
from gguf_helpers import write_tiny
from workbench.cli import main as cli_main
from workbench.gguf.fingerprint import checkpoint_identity, model_fingerprint
from workbench.gguf.reader import GGUFFile
from workbench.kv import kvfile
from workbench.kv.errors import KVFormatError, KVLoadError
from workbench.kv.header import ExtFlag, SaveReason, read_header
from workbench.kv.maintenance import verify_file
from workbench.kv.store import KVStore

CTX = 4096
NOW = 1_790_000_000
TEXT = "<｜User｜>abi text".encode()


def _read(path: Path):
    with open(path, "rb") as f:
        return kvfile.read_kv_file(f, SMALL, CTX, name=str(path))


def _cli(capsys, *args: str) -> tuple[int, dict]:
    rc = cli_main(["kv", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_writer_is_byte_identical_to_ds4_today_up_to_the_footer() -> None:
    state = random_state(SMALL, 300, CTX)
    crafted = kv_craft.ds4_file(state, TEXT, now=NOW, reason=SaveReason.COLD)
    for checksum in (False, True):
        buf = io.BytesIO()
        kvfile.write_kv_file(buf, state, TEXT, quant_bits=2, reason=SaveReason.COLD, checksum=checksum, now=NOW)
        blob = buf.getvalue()
        assert blob[:len(crafted)] == crafted and (len(blob) == len(crafted)) != checksum
    assert blob[len(crafted):][-4:] == b"KWBF"


def test_store_saves_model_id_0_abi_2_payload_v2_without_bit3(tmp_path) -> None:
    """The issue's acceptance: byte 7 = 0, byte 20 = 2, payload version 2, bit 3 clear."""
    res = KVStore(tmp_path, budget_mb=None, min_tokens=1).save(random_state(SMALL, 300, CTX), TEXT, SaveReason.COLD)
    blob = res.path.read_bytes()
    p = 52 + len(TEXT)
    assert blob[7] == 0 and blob[20] == 2 and blob[p:p + 4] == b"DSV4" and struct.unpack_from("<I", blob, p + 4) == (2,)
    assert blob[6] & ExtFlag.TITLE == 0


@pytest.mark.parametrize("case", ["plain", "title", "tool-map", "may"])
def test_crafted_ds4_files_load_list_show_verify(tmp_path, capsys, case: str) -> None:
    state = random_state(SMALL, 300, CTX)
    kw: dict = {}
    if case == "title":  # the agent: reason agent-session, named SHA1(title || created_at u64 LE)
        kw = dict(ext=ExtFlag.TITLE, reason=SaveReason.AGENT_SESSION,
                  trailer=kv_craft.title("Fix the “parser” bug".encode()))
    elif case == "tool-map":
        kw = dict(ext=ExtFlag.TOOL_MAP, trailer=kv_craft.tool_map([(b"call_1", b"<dsml>a</dsml>"), (b"call_2", b"x")]))
    elif case == "may":
        kw = dict(abi=0)
    blob = kv_craft.ds4_file(state, TEXT, now=NOW, **kw)
    stem = hashlib.sha1(TEXT).hexdigest()
    if case == "title":
        stem = hashlib.sha1("Fix the “parser” bug".encode() + struct.pack("<Q", NOW)).hexdigest()
    d = tmp_path / "kv"
    d.mkdir()
    path = d / f"{stem}.kv"
    path.write_bytes(blob)
    header, text, back, trailer = _read(path)
    assert text == TEXT and header.abi == (0 if case == "may" else 2) and trailer.checksums is None
    assert_same_state(state, back)
    rc, ls = _cli(capsys, "ls", str(d))
    assert rc == 0 and len(ls["entries"]) == 1 and not ls["others"]
    e = ls["entries"][0]
    rc, show = _cli(capsys, "show", str(path))
    assert rc == 0
    rc, ver = _cli(capsys, "verify", str(path))
    assert rc == 0 and ver["failed"] == 0, ver
    if case == "title":
        assert trailer.kind == "title" and e["title"] == show["title"] == "Fix the “parser” bug"
    elif case == "tool-map":
        assert trailer.tool_ids == ("call_1", "call_2") and show["tool_ids"] == ["call_1", "call_2"]
    elif case == "may":
        assert e["abi"] == 0 and "today's ds4 ignores" in e["abi_name"] and show["payload_header"]["version"] == 1
    else:
        assert e["abi"] == 2 and e["abi_name"] == "ds4 today (ABI 2)" and trailer.kind == "none"
    assert cli_main(["kv", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "abi: " in out and (case != "title" or "title: \"Fix the “parser” bug\"" in out)


def test_stripped_file_is_listed_and_verified_never_loaded(tmp_path, capsys) -> None:
    """ds4's agent /strip: payload_bytes 0, tokens = the retokenized count, the title right after the text."""
    title = b"stripped session"
    blob = kv_craft.kvc(TEXT, tokens=42, ctx=CTX, payload_bytes=0, reason=SaveReason.AGENT_SESSION,
                        ext=ExtFlag.TITLE, created=NOW, last_used=NOW) + kv_craft.title(title)
    path = tmp_path / f"{hashlib.sha1(title + struct.pack('<Q', NOW)).hexdigest()}.kv"
    path.write_bytes(blob)
    h = read_header(path)
    assert h.stripped and h.tokens == 42
    rc, ls = _cli(capsys, "ls", str(tmp_path))
    assert rc == 0 and ls["entries"][0]["title"] == "stripped session" and ls["entries"][0]["payload_bytes"] == 0
    rc, show = _cli(capsys, "show", str(path))
    assert rc == 0 and show["payload_header"] is None and show["title"] == "stripped session"
    rc, ver = _cli(capsys, "verify", str(path))
    assert rc == 0 and ver["failed"] == 0
    with pytest.raises(KVLoadError, match="no payload"):
        KVStore(tmp_path, budget_mb=None, min_tokens=1).load(path, SMALL, CTX)
    assert path.read_bytes() == blob


@pytest.mark.parametrize("trailer, ext, match", [
    (kv_craft.tool_map([]), ExtFlag.TOOL_MAP, "entry count 0"),
    (kv_craft.tool_map([(b"", b"x")]), ExtFlag.TOOL_MAP, "entry 0 id length 0"),
    (kv_craft.tool_map([(b"i" * 257, b"x")]), ExtFlag.TOOL_MAP, "entry 0 id length 257"),
    (kv_craft.tool_map([(b"id", b"")]), ExtFlag.TOOL_MAP, "entry 0 DSML length 0"),
    (b"KTM\x01" + struct.pack("<I", 10**9), ExtFlag.TOOL_MAP, "entry count 1000000000"),
    (kv_craft.tool_map([(b"id", b"dsml")])[:-2], ExtFlag.TOOL_MAP, "run past the trailer"),
    (b"KTX\x01\0\0\0\0", ExtFlag.TOOL_MAP, "expected b'KTM"),
    (struct.pack("<I", 100) + b"short", ExtFlag.TITLE, "title length 100"),
    (b"\0\0", ExtFlag.TITLE, "need 4"),
])
def test_malformed_trailers_are_named(tmp_path, trailer: bytes, ext: int, match: str) -> None:
    blob = kv_craft.ds4_file(random_state(SMALL, 200, CTX), TEXT, now=NOW, ext=ext, trailer=trailer)
    path = tmp_path / f"{hashlib.sha1(TEXT).hexdigest()}.kv"
    path.write_bytes(blob)
    with pytest.raises(KVFormatError, match=match):
        _read(path)
    rep = verify_file(path, SMALL)
    assert not rep.ok and str(path) in rep.error


def test_ds4_trailer_then_footer_and_old_bit3_checksum_both_verify(tmp_path) -> None:
    """A tool map rewritten by ds4 before the footer stays readable; a legacy bit-3 file verifies."""
    state = random_state(SMALL, 300, CTX)
    buf = io.BytesIO()
    kvfile.write_kv_file(buf, state, TEXT, quant_bits=2, reason=SaveReason.COLD, now=NOW)
    new = buf.getvalue()
    end = 52 + len(TEXT) + struct.unpack_from("<Q", new, 40)[0]
    legacy = kv_craft.to_may_with_checksum(new, len(TEXT), end - 52 - len(TEXT), 1)
    path = tmp_path / f"{hashlib.sha1(TEXT).hexdigest()}.kv"
    path.write_bytes(legacy)
    rep = verify_file(path, SMALL)
    assert rep.ok and rep.checksum == "verified" and rep.header.abi == 0
    bad = bytearray(legacy)
    bad[end - 10] ^= 1
    path.write_bytes(bytes(bad))
    assert "payload checksum mismatch" in verify_file(path, SMALL).error


def test_another_model_never_restores(tmp_path) -> None:
    """Fingerprint in the footer; without one, model id and quant bits must match."""
    state = random_state(SMALL, 300, CTX)
    fa, fb = bytes(range(32)), bytes(range(1, 33))
    saved = KVStore(tmp_path, budget_mb=None, min_tokens=1, fingerprint=fa).save(state, TEXT, SaveReason.COLD)
    with pytest.raises(KVLoadError, match="different model .*fingerprint"):
        KVStore(tmp_path, budget_mb=None, min_tokens=1, fingerprint=fb).load(saved.path, SMALL, CTX)
    st = KVStore(tmp_path, budget_mb=None, min_tokens=1, fingerprint=fa)
    assert_same_state(state, st.load(saved.path, SMALL, CTX)[0])
    assert st.save(state, TEXT, SaveReason.COLD).status == "exists"
    # the other model's save of the same text replaces the file (ds4 replaces another model id's file)
    other = KVStore(tmp_path, budget_mb=None, min_tokens=1, fingerprint=fb)
    assert other.save(state, TEXT, SaveReason.COLD).status == "saved"
    assert_same_state(state, other.load(saved.path, SMALL, CTX)[0])
    # no footer: ds4's own file
    path = saved.path
    path.write_bytes(kv_craft.ds4_file(state, TEXT, now=NOW))
    with pytest.raises(KVLoadError, match="4-bit"):
        KVStore(tmp_path, budget_mb=None, min_tokens=1, quant_bits=4, fingerprint=fb).load(path, SMALL, CTX)
    KVStore(tmp_path, budget_mb=None, min_tokens=1, fingerprint=fb).load(path, SMALL, CTX)  # matches id and bits
    blob = bytearray(path.read_bytes())
    blob[7] = 1  # DeepSeek V4 Pro
    path.write_bytes(bytes(blob))
    with pytest.raises(KVLoadError, match="model id 1"):
        KVStore(tmp_path, budget_mb=None, min_tokens=1).load(path, SMALL, CTX)
    assert path.exists()  # kept: a valid file of another model


def test_fingerprint_covers_metadata_not_weights(tmp_path) -> None:
    a = write_tiny(tmp_path / "a.gguf")
    b = write_tiny(tmp_path / "b.gguf")
    c = write_tiny(tmp_path / "c.gguf", drop_keys=("general.name",))
    with GGUFFile(a) as fa, GGUFFile(b) as fb, GGUFFile(c) as fc:
        assert model_fingerprint(fa) == model_fingerprint(fb) != model_fingerprint(fc)
        ident = checkpoint_identity(fa)
        assert ident["model_id"] == 0 and ident["quant_bits"] in (2, 4) and len(ident["fingerprint"]) == 32
