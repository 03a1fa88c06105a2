"""Hostile cache directories, driven through the CLI: links out of the directory, a
hostile or busy ``.lock``, unreadable and read-only directories, full disks, corrupt
entries that must heal, foreign files over the budget, unusable checkpoints.

Every probe ends with a clean one-line error or a correct result (no traceback, no
hang) and modifies nothing outside the cache directory: ``outside`` holds a sentinel
file whose bytes and mtime are compared after each probe. Most probes call the CLI in
this process (fast, and ``monkeypatch`` can fail the disk); the permission probes run
it as ``nobody`` in a subprocess (root ignores permission bits) and skip where that is
not possible.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_kv_format import SMALL

from workbench.cli import main
from workbench.kv.errors import KVLoadError, KVSaveError
from workbench.kv.header import SaveReason, text_sha
from workbench.kv.lock import TIMEOUT_ENV, DirLock, holder_line
from workbench.kv.maintenance import verify_file
from workbench.kv.store import KVStore
from workbench.state import random_state

CTX = 4096


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of one in-process CLI call; never a traceback."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err and rc != 70, err
    return rc, out, [ln for ln in err.splitlines() if ln.strip()]


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc, _, err = cli(capsys, *argv)
    assert rc == 1 and len(err) == 1 and "error" in err[0], err
    return err[0]


class Outside:
    """A directory beside the cache holding a sentinel the probes must never change."""

    def __init__(self, root: Path, blob: bytes = b"sentinel\n") -> None:
        self.dir = root / "outside"
        self.dir.mkdir()
        self.file = self.dir / "target.kv"
        self.file.write_bytes(blob)
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in self.dir.iterdir()}

    def unchanged(self) -> bool:
        return self.snapshot() == self.before


def small_store(d: Path, **kw) -> KVStore:
    kw.setdefault("budget_mb", None)
    return KVStore(d, min_tokens=64, **kw)


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, Path]:
    """A cache directory with one checksummed checkpoint of the small layout: (dir, file)."""
    d = tmp_path / "kv"
    res = small_store(d).save(random_state(SMALL, 200, CTX), "<｜User｜>abuse " * 4, SaveReason.COLD)
    return d, res.path


# ---- 1. links are foreign files ---------------------------------------------------------------------
def test_symlinked_checkpoint_is_foreign_and_its_target_never_touched(tmp_path: Path, capsys) -> None:
    d = tmp_path / "kv"
    st = small_store(d)
    state, text = random_state(SMALL, 200, CTX), "<｜User｜>linked " * 4
    path = st.save(state, text, SaveReason.COLD).path
    out = Outside(tmp_path, path.read_bytes())  # a valid, compatible checkpoint of the same key, outside
    path.unlink()
    path.symlink_to(out.file)
    st2 = small_store(d)
    assert st2.lookup(text + " more", CTX) is None and st2.entries() == []
    res = st2.save(state, text, SaveReason.COLD)  # used to rewrite last_used through the link
    assert res.status == "skipped" and "symbolic link" in res.detail and path.is_symlink()
    with pytest.raises(KVLoadError, match="symbolic link"):
        st2.load(path, SMALL, CTX)
    for i, make in enumerate((os.mkfifo, os.mkdir)):  # other foreign files at the key: kept, never opened blocking
        other = f"<｜User｜>foreign {i} " * 4
        make(d / f"{text_sha(other.encode())}.kv")
        res = st2.save(state, other, SaveReason.COLD)
        assert res.status == "skipped" and ("a FIFO" in res.detail or "a directory" in res.detail)
    rc, stdout, err = cli(capsys, "kv", "ls", str(d), "--json")
    assert rc == 0 and not err
    others = json.loads(stdout)["others"]
    assert [o["kind"] for o in others] == ["foreign"] * 3
    assert sorted(o["problem"] for o in others) == ["a subdirectory", "not a regular file", "not a regular file"]
    rc, stdout, _ = cli(capsys, "kv", "verify", str(d), "--quarantine")
    assert rc == 0 and "0 ok, 0 failed" in stdout
    rc, _, err = cli(capsys, "kv", "gc", str(d), "--budget-mb", "0.00001")
    assert rc == 0 and len(err) == 1 and "does not own" in err[0]
    assert path.is_symlink() and out.unchanged()


def test_symlinked_quarantine_receives_nothing(cache, tmp_path: Path, capsys) -> None:
    d, path = cache
    blob = bytearray(path.read_bytes())
    blob[-200] ^= 0xFF  # payload corrupt: verify fails and wants to quarantine it
    path.write_bytes(bytes(blob))
    out = Outside(tmp_path)
    (d / "quarantine").symlink_to(out.dir, target_is_directory=True)
    err = one_line_error(capsys, "kv", "verify", str(d), "--quarantine")
    assert "not quarantined" in err and "quarantine: not a directory" in err
    assert path.exists() and out.unchanged()


def test_linked_lock_and_chain_dir_are_refused(cache, tmp_path: Path, capsys) -> None:
    d, _ = cache
    out = Outside(tmp_path)
    (d / ".lock").unlink()
    (d / ".lock").symlink_to(out.dir / "created-through-link")  # O_CREAT through a dangling link
    for argv in (["kv", "ls", str(d)], ["kv", "gc", str(d), "--budget-mb", "1"]):
        assert "symbolic link" in one_line_error(capsys, *argv)
    (d / ".lock").unlink()
    (d / "chain").symlink_to(out.dir, target_is_directory=True)
    with pytest.raises(KVSaveError, match="chain: not a directory"):
        small_store(d, kv_layout="chain").save(random_state(SMALL, 200, CTX), "<｜User｜>ch " * 4, SaveReason.COLD)
    rc, stdout, _ = cli(capsys, "kv", "ls", str(d), "--json")
    assert rc == 0 and [o["problem"] for o in json.loads(stdout)["others"]] == ["not a regular file"]
    assert out.unchanged()


def test_kv_import_of_a_fifo_does_not_block(cache, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "0000.kv")  # sorts first: the layout used to be read from it, blocking
    err = one_line_error(capsys, "kv", "import", str(src), "--into", str(tmp_path / "into"))
    assert "0000.kv: is a FIFO" in err
    shutil.copy(cache[1], src)
    rc, out, err = cli(capsys, "kv", "import", str(src), "--into", str(tmp_path / "into"), "--json")
    assert rc == 0 and not err and len(json.loads(out)["saved"]) == 1


def test_a_fifo_in_place_of_a_chain_parent_does_not_block(tmp_path: Path, capsys) -> None:
    from test_kv_chain import conversation

    d = tmp_path / "kv"
    st = KVStore(d, budget_mb=None, min_tokens=1, kv_layout="chain")
    for state, text in conversation(2, step=200):
        st.save(state, text, SaveReason.CONTINUED)
    base, leaf = sorted(st.entries(), key=lambda e: e.tokens)
    base.path.unlink()
    os.mkfifo(base.path)  # the leaf's walk to its base used to block in open()
    rc, out, err = cli(capsys, "kv", "verify", str(d))
    assert rc == 1 and not err and "is a FIFO" in out
    assert "is a FIFO" in one_line_error(capsys, "kv", "show", str(leaf.path))
    assert cli(capsys, "kv", "gc", str(d), "--dry-run")[0] == 0


# ---- 2. the lock: timeouts naming the holder; FIFO, directory, unreadable ------------------------------
def test_lock_wait_times_out_naming_the_holder(cache, capsys, monkeypatch) -> None:
    d, _ = cache
    monkeypatch.setenv(TIMEOUT_ENV, "0.3")
    with DirLock(d).exclusive():  # this process, another descriptor: excluded like another process
        err = one_line_error(capsys, "kv", "ls", str(d))
    assert "still locked after 0.3 s" in err and f"pid {os.getpid()}" in err and TIMEOUT_ENV in err
    monkeypatch.setattr(sys, "argv", ["python", "-c", "a\nmulti-line\nprogram"])
    assert holder_line().endswith(b"python -c a multi-line program")  # the error stays one line
    fd = os.open(d / ".lock", os.O_RDONLY)  # a holder that writes no line (ds4 tools, old workbench)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        err = one_line_error(capsys, "kv", "gc", str(d), "--budget-mb", "1")
    finally:
        os.close(fd)
    assert f"pid {os.getpid()}" in err or "unknown process" in err
    fd = os.open(d / ".lock", os.O_RDWR)  # the line of a holder that crashed is not believed
    try:
        os.write(fd, b"pid 999999999 on " + socket.gethostname().encode() + b": workbench run ...")
        fcntl.flock(fd, fcntl.LOCK_SH)
        err = one_line_error(capsys, "kv", "gc", str(d), "--budget-mb", "1")
    finally:
        os.close(fd)
    assert "999999999" not in err and "still locked" in err
    rc, _, _ = cli(capsys, "kv", "gc", str(d), "--budget-mb", "1")
    assert rc == 0 and (d / ".lock").read_bytes() == b""  # the holder line goes with the lock


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_lock_that_is_not_a_file_is_a_clean_error(cache, capsys, kind: str) -> None:
    d, _ = cache
    (d / ".lock").unlink()
    os.mkfifo(d / ".lock") if kind == "fifo" else (d / ".lock").mkdir()
    for argv in (["kv", "ls", str(d)], ["kv", "verify", str(d)], ["kv", "gc", str(d), "--budget-mb", "1"]):
        err = one_line_error(capsys, *argv)
        assert ".lock" in err and "not a lock file" in err


# ---- 3. permissions (as nobody: root ignores permission bits) ------------------------------------------
@contextmanager
def nobody():
    """This process with the effective ids of ``nobody`` (root's saved ids bring it back)."""
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def scratch(capsys) -> Path:
    """A directory ``nobody`` can reach (pytest's tmp_path is root's alone); skips unless
    this process may switch to nobody and back."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as nobody")
    root = Path(tempfile.mkdtemp(prefix="wb-nobody-"))
    root.chmod(0o755)
    os.chown(root, 65534, 65534)
    cli(capsys, "kv", "ls", str(root))  # imports done as root (nobody may not read the interpreter's tree)
    (root / ".lock").unlink()
    try:
        with nobody():
            rc = main(["kv", "ls", str(root)])
        capsys.readouterr()
        if rc != 0:
            pytest.skip("the CLI cannot run as nobody here")
        yield root
    finally:
        shutil.rmtree(root)


def test_unreadable_directory_lock_and_checkpoint(scratch: Path, capsys) -> None:
    d = scratch / "kv"
    text = "<｜User｜>perm " * 4
    path = small_store(d).save(random_state(SMALL, 200, CTX), text, SaveReason.COLD).path
    (d / ".lock").chmod(0o666)
    d.chmod(0o311)  # nobody may enter and write, not list
    with nobody():
        for argv in (["kv", "ls", str(d)], ["kv", "gc", str(d), "--budget-mb", "1"], ["kv", "verify", str(d)]):
            assert "cannot list cache directory: Permission denied" in one_line_error(capsys, *argv)
    d.chmod(0o755)  # listable, not writable: reads work without writing a lock
    (d / ".lock").chmod(0o000)
    with nobody():
        err = one_line_error(capsys, "kv", "verify", str(d))
    assert ".lock" in err and "Permission denied" in err
    (d / ".lock").chmod(0o644)
    path.chmod(0o600)
    with nobody():
        rc, stdout, err = cli(capsys, "kv", "verify", str(d))  # root's 0600 checkpoint: reported
    assert rc == 1 and "Permission denied" in stdout and not err
    before = path.read_bytes()
    (d / ".lock").chmod(0o666)
    os.chown(d, 65534, 65534)  # nobody's directory, root's unreadable file: reported, never overwritten
    with nobody():
        st = small_store(d)
        assert st.lookup(text + " more", CTX) is None  # its text cannot be read: no hit
        with pytest.raises(KVLoadError, match="Permission denied"):
            st.load(path, SMALL, CTX)
        res = st.save(random_state(SMALL, 200, CTX), text, SaveReason.COLD)
    assert res.status == "skipped" and "cannot read the existing file (Permission denied)" in res.detail
    assert path.read_bytes() == before


# ---- 4. corrupt entries heal; verify checks what a load checks -----------------------------------------
def test_corrupt_payload_is_marked_bad_and_replaced_by_the_next_save(tmp_path: Path) -> None:
    d = tmp_path / "kv"
    st = small_store(d)
    state, text = random_state(SMALL, 200, CTX), "<｜User｜>heal " * 4
    path = st.save(state, text, SaveReason.COLD).path
    blob = bytearray(path.read_bytes())
    blob[-300] ^= 0xFF  # header and text parse; the payload does not
    path.write_bytes(bytes(blob))
    hit = st.lookup(text + " and more", CTX)
    with pytest.raises(KVLoadError, match="checksum"):
        st.load(hit, SMALL, CTX)
    assert st.lookup(text + " and more", CTX) is None and st.events[-1].reason  # skipped, said why
    res = st.save(state, text, SaveReason.COLD)
    assert res.status == "saved" and res.detail.startswith("replaced: failed to load") and "checksum" in res.detail
    assert verify_file(path).ok
    st.load(st.lookup(text + " and more", CTX), SMALL, CTX)


def test_verify_runs_every_check_a_load_runs(tmp_path: Path, capsys) -> None:
    d = tmp_path / "kv"
    st = small_store(d, checksum=False)
    good = st.save(random_state(SMALL, 200, CTX), "<｜User｜>count " * 4, SaveReason.COLD).path
    blob = bytearray(good.read_bytes())
    blob[8:12] = (201).to_bytes(4, "little")  # header token count one off (no checksum to catch it)
    good.write_bytes(bytes(blob))
    nan = random_state(SMALL, 200, CTX, seed=1)
    nan.logits = np.full(SMALL.n_vocab, np.nan, dtype=np.float32)
    bad_logits = st.save(nan, "<｜User｜>nan " * 4, SaveReason.COLD).path
    oov = random_state(SMALL, 200, CTX, seed=2)
    oov.tokens[5] = SMALL.n_vocab + 7
    bad_ids = st.save(oov, "<｜User｜>oov " * 4, SaveReason.COLD).path
    rc, stdout, err = cli(capsys, "kv", "verify", str(d), "--json")
    files = {Path(f["path"]).name: f["error"] for f in json.loads(stdout)["files"]}
    assert rc == 1 and not err
    assert "payload holds 200 tokens, header says 201" in files[good.name]
    assert "not finite" in files[bad_logits.name] and "outside the vocabulary" in files[bad_ids.name]
    for path, words in ((good, "header says 201"), (bad_logits, "not finite"), (bad_ids, "vocabulary")):
        with pytest.raises(KVLoadError, match=words):
            st.load(path, SMALL, CTX)


def test_verify_of_a_payload_with_vocab_zero_does_not_crash(cache, capsys) -> None:
    d, path = cache
    blob = bytearray(path.read_bytes())
    p = 52 + int.from_bytes(blob[48:52], "little")  # payload offset: header, text
    blob[p + 44:p + 48] = (0).to_bytes(4, "little")  # DSV4 header field 12: vocab
    path.write_bytes(bytes(blob))
    rc, stdout, err = cli(capsys, "kv", "verify", str(d))
    assert rc == 1 and not err and "FAIL" in stdout


# ---- 5. read-only and full disks --------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_quarantine_on_a_read_only_or_full_disk(cache, capsys, monkeypatch, code: int) -> None:
    d, path = cache
    blob = bytearray(path.read_bytes())
    blob[-300] ^= 0xFF
    path.write_bytes(bytes(blob))

    def fail(*a, **kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "mkdir", fail)
    monkeypatch.setattr(os, "rename", fail)
    err = one_line_error(capsys, "kv", "verify", str(d), "--quarantine")
    assert os.strerror(code) in err and path.name in err
    assert path.read_bytes() == bytes(blob) and not (d / "quarantine").exists()


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only disk"), (errno.ENOSPC, "disk full"),
                                        (errno.EACCES, "no write permission")])
def test_save_on_a_read_only_or_full_disk_says_why(tmp_path: Path, monkeypatch, code: int, words: str) -> None:
    d = tmp_path / "kv"
    st = small_store(d, budget_mb=64)
    real_open = os.open

    def deny_tmp(path, flags, *a, **kw):
        if ".tmp." in str(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", deny_tmp)
    with pytest.raises(KVSaveError) as err:
        st.save(random_state(SMALL, 200, CTX), "<｜User｜>ro " * 4, SaveReason.COLD)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert st.events[-1].kind == "save-failed" and words in st.events[-1].error
    assert sorted(p.name for p in d.iterdir()) == [".lock"]


def test_a_real_read_only_disk(tmp_path: Path, capsys) -> None:
    """The same probes on a tmpfs remounted read-only (root only; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        d = mnt / "kv"
        path = small_store(d).save(random_state(SMALL, 200, CTX), "<｜User｜>ro disk " * 4, SaveReason.COLD).path
        blob = bytearray(path.read_bytes())
        blob[-300] ^= 0xFF
        path.write_bytes(bytes(blob))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        err = one_line_error(capsys, "kv", "verify", str(d), "--quarantine")
        assert "not quarantined" in err and "Read-only file system" in err
        assert "Read-only file system" in one_line_error(capsys, "kv", "gc", str(d), "--budget-mb", "0.1")
        st = small_store(d, budget_mb=64)  # opens: reads work on a read-only disk
        with pytest.raises(KVSaveError, match="Read-only file system"):
            st.save(random_state(SMALL, 200, CTX), "<｜User｜>new " * 4, SaveReason.COLD)
        assert sorted(p.name for p in d.iterdir()) == [".lock", path.name] and path.read_bytes() == bytes(blob)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---- 6. foreign files over the budget -----------------------------------------------------------------------
def test_foreign_files_over_the_budget_evict_nothing_and_say_so(cache, capsys) -> None:
    d, path = cache
    (d / "notes.bin").write_bytes(b"\0" * 2_000_000)  # 1.9 MiB the store does not own
    rc, stdout, err = cli(capsys, "kv", "gc", str(d), "--budget-mb", "1", "--json")
    assert rc == 0 and json.loads(stdout)["evicted"] == [] and path.exists()
    assert len(err) == 1 and "warning" in err[0] and "does not own" in err[0] and "1.0 MiB" in err[0]
    st = small_store(d, budget_mb=1)
    res = st.save(random_state(SMALL, 200, CTX, seed=3), "<｜User｜>another " * 4, SaveReason.COLD)
    assert res.status == "skipped" and "does not own" in res.detail and path.exists()
    assert any(e.kind == "budget-held" for e in st.events)


# ---- 7 through `run`: an unusable checkpoint is skipped with its reason, the prompt prefilled cold --------
def test_run_skips_a_checkpoint_with_logits_no_model_can_use(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    from workbench.chat import render_single
    from workbench.gguf.reader import GGUFFile
    from workbench.spec.args import ModelArgs
    from workbench.spec.statelayout import StateLayout

    text = "Quel ramo del lago di Como, che volge a mezzogiorno. " * 6
    kv = tmp_path / "kv"
    with GGUFFile(tiny_gguf) as g:  # a checksummed checkpoint of this model for the prompt's first half
        layout = StateLayout.from_args(ModelArgs.from_metadata(g.metadata))
    st = KVStore(kv, budget_mb=None, min_tokens=32, **checkpoint_identity_of(tiny_gguf))
    state = random_state(layout, 40, 512)
    state.logits = np.full(layout.n_vocab, np.inf, dtype=np.float32)
    rendered = render_single(text, ctx=512).encode()
    path = st.save(state, rendered[: len(rendered) // 2], SaveReason.COLD).path
    rc, out, err = cli(capsys, "run", "--model", str(tiny_gguf), "--prompt", text, "--kv-dir", str(kv), "--json",
                       "--kv-min-tokens", "32", "--ctx", "512", "--temp", "0", "--max-tokens", "1")
    rec = json.loads(out.splitlines()[0])
    assert rc == 0 and not err and rec["source"] == "none" and rec["cached_tokens"] == 0
    assert f"{path.name} unusable" in rec["note"] and "not finite" in rec["note"] and len(rec["tokens"]) == 1
    rc, stdout, err = cli(capsys, "kv", "verify", str(kv), "--model", str(tiny_gguf), "--json")
    files = {Path(f["path"]).name: f for f in json.loads(stdout)["files"]}
    assert rc == 1 and not err and "not finite" in files[path.name]["error"]  # as the load said
    identity = checkpoint_identity_of(tiny_gguf) | {"fingerprint": b"\1" * 32}  # another model's weights
    other = KVStore(tmp_path / "other", budget_mb=None, **identity)
    other.save(random_state(layout, 40, 512), "<｜User｜>another model's", SaveReason.COLD)
    rc, stdout, _ = cli(capsys, "kv", "verify", str(tmp_path / "other"), "--model", str(tiny_gguf), "--json")
    (f,) = json.loads(stdout)["files"]
    assert rc == 0 and f["ok"] and "not loaded by this model: written by a different model" in f["notes"][0]


def checkpoint_identity_of(model: Path) -> dict:
    from workbench.gguf.fingerprint import checkpoint_identity
    from workbench.gguf.reader import GGUFFile

    with GGUFFile(model) as g:
        return checkpoint_identity(g)
