"""Robustness of .kv files and the store: truncation, bit flips, foreign files, a full
disk, a process killed mid-save, and two processes sharing one directory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_kv_format import SMALL

from workbench.cli import main as cli_main
from workbench.bench import staged
from workbench.bench.staged import write_staged
from workbench.kv import header, kvfile, stream
from workbench.kv import store as S
from workbench.kv.errors import KVLoadError, KVSaveError
from workbench.kv.header import SaveReason
from workbench.kv.maintenance import verify_file
from workbench.kv.store import KVStore
from workbench.state import random_state

CTX = 4096
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def store(path, **kw) -> KVStore:
    kw.setdefault("min_tokens", 64)
    kw.setdefault("budget_mb", None)
    return KVStore(path, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checksummed file of the small layout: (bytes, header, section offsets)."""
    d = tmp_path_factory.mktemp("orig")
    res = store(d).save(random_state(SMALL, 300, CTX), "<｜User｜>robust text", SaveReason.COLD)
    blob = res.path.read_bytes()
    h = header.read_header(res.path)
    p = h.payload_offset
    counts = p + 52 + 4 * 300 + 4 * SMALL.n_vocab
    layer0 = counts + 8 * SMALL.n_layer
    sections = {"magic": 0, "version": 3, "header end": 48, "text length": 50, "text": 52, "text middle": 52 + 8,
                "payload": p, "payload header": p + 20, "tokens": p + 52, "logits": p + 52 + 1200,
                "row counts": counts, "layer 0": layer0, "layer 2 comp": layer0 + 3 * 128 * 128 * 4,
                "payload end": h.payload_end, "trailer": h.payload_end + 10, "last byte": len(blob) - 1}
    return res.path.name, blob, h, sections


def _put(d: Path, name: str, blob: bytes) -> Path:
    path = d / name
    path.write_bytes(blob)
    return path


def test_truncation_at_every_section_boundary(tmp_path, saved) -> None:
    name, blob, _, sections = saved
    st = store(tmp_path)
    for what, cut in sections.items():
        path = _put(tmp_path, name, blob[:cut])
        rep = verify_file(path, SMALL)
        if what == "payload end":  # cut exactly before the footer: ds4's own file, whose checksums are gone
            assert rep.ok and rep.checksum == "absent", rep.error
            continue
        assert not rep.ok and str(path) in rep.error, what
        with pytest.raises(KVLoadError, match=str(path)):
            st.load(path, SMALL, CTX)
        assert path.exists() and path.stat().st_size == cut  # kept, unchanged
        if cut < sections["payload end"]:
            assert st.lookup(b"<\xef\xbd\x9cUser\xef\xbd\x9c>robust text and more", CTX, 1) is None
            assert [o.kind for o in st.invalid()] == ["invalid"], what


def test_every_flipped_byte_outside_hits_and_last_used_is_caught(tmp_path, saved) -> None:
    name, blob, h, sections = saved
    st = store(tmp_path)
    offsets = [i for i in range(52) if not (12 <= i < 16 or 32 <= i < 40)]
    offsets += [52, 52 + h.text_bytes - 1]  # text
    offsets += [sections[k] + 1 for k in ("payload", "tokens", "logits", "row counts", "layer 0", "layer 2 comp")]
    offsets += [h.payload_end - 1] + list(range(h.payload_end, len(blob)))  # the whole footer
    for off in offsets:
        bad = bytearray(blob)
        bad[off] ^= 0x01 if off != 6 else 0x08  # bit3 of the ext flags: a title trailer where the footer is
        path = _put(tmp_path, name, bytes(bad))
        with pytest.raises(KVLoadError, match=str(path)):
            st.load(path, SMALL, CTX)
        assert not verify_file(path, SMALL).ok, off
    # the in-place fields: any value (even a torn write) leaves a valid file
    for off in list(range(12, 16)) + list(range(32, 40)):
        bad = bytearray(blob)
        bad[off] ^= 0xA5
        path = _put(tmp_path, name, bytes(bad))
        assert verify_file(path, SMALL).ok, off


def test_without_checksum_bit_rot_in_tensors_is_invisible_as_in_ds4(tmp_path) -> None:
    res = store(tmp_path, checksum=False).save(random_state(SMALL, 300, CTX), "plain" * 20, SaveReason.COLD)
    bad = bytearray(res.path.read_bytes())
    bad[-100] ^= 0x01
    res.path.write_bytes(bytes(bad))
    rep = verify_file(res.path, SMALL)
    assert rep.ok and rep.checksum == "absent"


def test_file_from_larger_context_is_skipped_and_refused(tmp_path) -> None:
    st = store(tmp_path)
    res = st.save(random_state(SMALL, 300, 8192), "big ctx " * 10, SaveReason.COLD)
    assert st.lookup("big ctx " * 12, CTX) is None and st.events[-1].reason == "ctx-too-large"
    with pytest.raises(KVLoadError, match="does not fit current context: saved ctx 8192"):
        st.load(res.path, SMALL, CTX)
    assert res.path.exists()
    back, _ = st.load(res.path, SMALL, 8192)
    assert back.n_tokens == 300


def test_foreign_files_are_counted_and_never_deleted(tmp_path) -> None:
    one = kvfile.kv_file_bytes(random_state(SMALL, 300, CTX), 10)
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / ("a" * 40 + ".kv")).write_bytes(b"KVC\x01" + b"\0" * 60)  # invalid header (quant 0)
    (tmp_path / "sysprompt.kv").write_bytes(b"agent file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"\0" * 500)
    os.symlink("README.md", tmp_path / ("b" * 40 + ".kv"))
    st = store(tmp_path, budget_mb=(3 * one + 2000) / 2**20)
    for i in range(6):
        st.save(random_state(SMALL, 300, CTX, seed=i), f"{i:010d}", SaveReason.CONTINUED)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"README.md", "a" * 40 + ".kv", "sysprompt.kv", "sub", "b" * 40 + ".kv"} <= names
    assert (tmp_path / "sub" / "x.bin").exists()
    assert len(st.entries()) == 3 and st.total_bytes() <= st.budget_bytes
    kinds = sorted((o.path.name, o.kind) for o in st.others())
    assert ("a" * 40 + ".kv", "invalid") in kinds and ("sub", "foreign") in kinds
    assert ("b" * 40 + ".kv", "foreign") in kinds and ("sysprompt.kv", "foreign") in kinds


def _failing_writer(limit: int, exc: BaseException):
    real = stream.write_all
    written = [0]

    def write_all(f, data):
        n = len(memoryview(data).cast("B"))
        if written[0] + n > limit:
            raise exc
        written[0] += n
        return real(f, data)

    return write_all


@pytest.mark.parametrize("writer", [None, write_staged], ids=["direct", "staged"])
def test_disk_full_mid_stream_leaves_nothing_behind(tmp_path, monkeypatch, writer) -> None:
    st = store(tmp_path)
    keep = st.save(random_state(SMALL, 300, CTX), "existing " * 5, SaveReason.COLD).path
    before = keep.read_bytes()
    failing = _failing_writer(300_000, OSError(errno.ENOSPC, "No space left on device"))
    for module in (stream, kvfile, staged):
        monkeypatch.setattr(module, "write_all", failing)
    with pytest.raises(KVSaveError, match="disk full"):
        st.save(random_state(SMALL, 300, CTX, seed=1), "new one " * 5, SaveReason.EVICT, writer=writer)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == [keep.name]
    assert keep.read_bytes() == before
    assert st.events[-1].kind == "save-failed" and "disk full" in st.events[-1].error


def test_interrupt_and_serializer_bugs_never_publish(tmp_path, monkeypatch) -> None:
    st = store(tmp_path)
    text = "same key " * 5
    old = st.save(random_state(SMALL, 300, 8192), text, SaveReason.COLD).path  # incompatible at ctx 4096
    before = old.read_bytes()
    monkeypatch.setattr(stream, "write_all", _failing_writer(100_000, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        st.save(random_state(SMALL, 300, CTX), text, SaveReason.EVICT)
    monkeypatch.undo()
    assert old.read_bytes() == before and len(list(tmp_path.glob("*.tmp.*"))) == 0
    # a prediction that disagrees with the bytes written is refused before the rename
    monkeypatch.setattr(S, "kv_file_bytes", lambda state, n, c: kvfile.kv_file_bytes(state, n, c) + 4)
    with pytest.raises(KVSaveError, match="predicted"):
        st.save(random_state(SMALL, 300, CTX), text, SaveReason.EVICT)
    assert old.read_bytes() == before and len(list(tmp_path.glob("*.tmp.*"))) == 0


def test_real_full_tmpfs(tmp_path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        st = store(mnt)
        small = st.save(random_state(SMALL, 100, CTX), "fits " * 4, SaveReason.COLD)
        with pytest.raises(KVSaveError, match="disk full"):
            st.save(random_state(SMALL, 2000, CTX), "too big " * 4, SaveReason.COLD)
        assert sorted(p.name for p in mnt.iterdir() if p.name != ".lock") == [small.path.name]
        assert verify_file(small.path, SMALL).ok
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


SLOW_SAVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_kv_format import SMALL
from workbench.kv import stream
from workbench.kv.header import SaveReason
from workbench.kv.store import KVStore
from workbench.state import random_state
real = stream.write_all
def slow(f, data):
    n = real(f, data)
    open({flag!r}, "a").close()
    time.sleep(0.05)
    return n
stream.write_all = slow
KVStore({d!r}, budget_mb=None, min_tokens=1).save(random_state(SMALL, 3000, 4096), "killed" * 10, SaveReason.COLD)
"""


def test_killed_mid_save_never_publishes_and_tmp_is_swept(tmp_path) -> None:
    d, flag = tmp_path / "cache", tmp_path / "started"
    d.mkdir()
    live_tmp = d / (("c" * 40) + ".kv.tmp.1")  # pid 1 is alive: never swept
    live_tmp.write_bytes(b"in progress")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVER.format(tests=str(TESTS), flag=str(flag), d=str(d))],
                            cwd=REPO)
    deadline = time.time() + 30
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tmps = list(d.glob("*.kv.tmp.%d" % proc.pid))
    assert len(tmps) == 1 and not list(d.glob("*.kv"))
    assert tmps[0].stat().st_size < kvfile.kv_file_bytes(random_state(SMALL, 3000, 4096), 60)
    st = store(d)  # default grace: the fresh orphan stays
    assert tmps[0].exists() and any(o.kind == "tmp" for o in st.others())
    st = store(d, tmp_grace_s=0.0)
    assert not tmps[0].exists() and live_tmp.exists()
    assert [e.kind for e in st.events] == ["tmp-swept"]


WORKER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_kv_format import SMALL
from workbench.state import random_state
from workbench.kv.errors import KVLoadError
from workbench.kv.header import SaveReason
from workbench.kv.store import KVStore
open(os.path.join({sync!r}, "ready-{who}"), "w").close()
while not os.path.exists(os.path.join({sync!r}, "go")):  # start together
    time.sleep(0.005)
st = KVStore({d!r}, budget_mb={budget!r}, min_tokens=1)
gone = 0
for i in range(20):
    text = "shared prefix " + "{who}" * (i + 1)
    st.save(random_state(SMALL, 200 + 50 * (i % 3), 4096, seed=i), text, SaveReason.EVICT if i % 2 else SaveReason.COLD)
    hit = st.lookup("shared prefix " + "AB"[i % 2] * 20, 4096)
    if hit is not None:
        try:
            st.load(hit, SMALL, 4096)
        except KVLoadError as err:
            assert "no longer exists" in str(err), err
            gone += 1
print("ok", gone)
"""


def test_two_processes_save_and_evict_in_one_directory(tmp_path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    budget = 4 * kvfile.kv_file_bytes(random_state(SMALL, 300, CTX), 40) / 2**20
    procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(tests=str(TESTS), d=str(d), budget=budget,
                                                                   who=who, sync=str(tmp_path))],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in "AB"]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{w}").exists() for w in "AB") and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("ok"), err
    st = store(d, budget_mb=budget, maintain=False)
    entries = st.entries()
    assert entries and not list(d.glob("*.tmp.*"))
    assert st.total_bytes() <= st.budget_bytes
    for e in entries:
        state, text = st.load(e, SMALL, CTX)
        assert state.n_tokens == e.tokens and text.startswith(b"shared prefix ")
        assert verify_file(e.path, SMALL).ok


def test_cli_show_reports_a_broken_trailer_and_verify_fails(tmp_path, saved, capsys) -> None:
    name, blob, h, _ = saved
    path = _put(tmp_path, name, blob[: h.payload_end + 10])
    assert cli_main(["kv", "show", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trailer"] == "invalid" and "truncated footer" in out["notes"][0]
    assert cli_main(["kv", "verify", str(path)]) == 1
    assert "truncated footer" in capsys.readouterr().out
