"""Issue 15's reliability fixes at their causes: argument ranges, regular files only,
model files changing under a session, non-finite logits, cooperative cancel, engine
chunking and failed saves reported."""

from __future__ import annotations

import argparse
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import build_parser, main
from workbench.commands.common import number, utf8_error
from workbench.gguf.reader import GGUFError, GGUFFile
from workbench.kv.policy import KVPolicy, KVPolicyError
from workbench.safeopen import NotRegularFileError, open_regular, read_capped
from workbench.sampling import Sampler, SamplingError


# ---- argument boundary ------------------------------------------------------------
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "x"])
def test_number_refuses_non_finite_and_junk(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        number(float)(text)


def test_number_ranges() -> None:
    assert number(int, 0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        number(int, 1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        number(float, 0, lo_open=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="<= 1"):
        number(float, 0, 1)("1.5")


def test_utf8_error_finds_surrogate_escaped_bytes() -> None:
    assert utf8_error("fine é") is None
    assert utf8_error(b"ab\xff".decode("utf-8", "surrogateescape")) == 2
    assert utf8_error(b"ab\xffcd") == 2


def _all_actions(parser: argparse.ArgumentParser, prog: str = "workbench"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_actions(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, action


def test_every_argument_has_help() -> None:
    missing = [f"{prog} {a.option_strings or a.dest}" for prog, a in _all_actions(build_parser()) if not a.help]
    assert missing == []


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model", "m.gguf", "--prompt", "x", "--temp", "nan"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--temp" in err and "finite" in err


def test_sampler_refuses_nan_temperature_and_negative_seed() -> None:
    with pytest.raises(SamplingError, match="temperature"):
        Sampler(temperature=math.nan)
    with pytest.raises(SamplingError, match="seed"):
        Sampler(seed=-1)


def test_sampler_tiny_temperature_is_the_argmax_not_nan() -> None:
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    p = Sampler(temperature=1e-300, min_p=0.0, seed=0).probabilities(logits)
    assert np.isfinite(p).all() and int(np.argmax(p)) == 1


@pytest.mark.parametrize("budget", [math.nan, math.inf, -1.0])
def test_policy_refuses_non_finite_budget(budget: float) -> None:
    with pytest.raises(KVPolicyError, match="budget_mb"):
        KVPolicy(budget_mb=budget)


# ---- regular files only ---------------------------------------------------------------
def test_open_regular_refuses_fifo_device_dir_and_links(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    (tmp_path / "target").write_bytes(b"x")
    link.symlink_to(tmp_path / "target")
    for path, what in ((fifo, "FIFO"), ("/dev/zero", "character device"), (tmp_path, "directory")):
        with pytest.raises(NotRegularFileError, match=what):
            open_regular(path)  # returns at once: never blocks on the FIFO
    with open_regular(link) as f:  # followed by default
        assert f.read() == b"x"
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        open_regular(link, follow=False)


def test_read_capped(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_bytes(b"12345")
    assert read_capped(p, 5) == b"12345"
    with pytest.raises(OSError, match="larger than"):
        read_capped(p, 4)


def test_gguf_on_a_fifo_is_a_clean_error(tmp_path: Path) -> None:
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="FIFO"):
        GGUFFile(fifo)


def test_gguf_notices_truncation(tiny_gguf: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "m.gguf"
    shutil.copyfile(tiny_gguf, copy)
    with GGUFFile(copy) as g:
        g.check_unchanged()
        os.truncate(copy, g.data_offset)  # as a user overwriting the model under a running prefill
        with pytest.raises(GGUFError, match="changed on disk"):
            g.check_unchanged()
    with pytest.raises(GGUFError):  # and a truncated model cannot be opened again
        GGUFFile(copy)


# ---- the session ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def session(tiny_gguf: Path):
    from workbench.session import load

    s = load(tiny_gguf, ctx=256)
    yield s
    s.close()


def test_context_overflow_names_ctx_and_how_to_raise_it(session) -> None:
    from workbench.session import SessionError

    session.reset()
    with pytest.raises(SessionError, match=r"ctx 256; raise ctx .*--ctx"):
        session.prefill([1] * 300)


def test_decode_refuses_non_finite_logits(session) -> None:
    import mlx.core as mx
    from dataclasses import replace

    from workbench.session import SessionError

    session.reset()
    session.prefill([1, 2, 3])
    bad = np.asarray(session.logits, dtype=np.float32).copy()
    bad[:] = np.nan
    session.state = replace(session.state, logits=mx.array(bad))
    with pytest.raises(SessionError, match="not finite"):
        session.decode(2)


def test_stop_cancels_prefill_and_leaves_the_state(session) -> None:
    from workbench.session import Cancelled, Progress

    session.reset()
    session.prefill([5, 6])

    def press_stop(p: Progress) -> None:  # as a Stop button would, from another thread
        t = threading.Thread(target=session.stop.set)
        t.start()
        t.join()

    with pytest.raises(Cancelled):
        session.prefill(list(range(10, 40)), chunk=4, progress=press_stop)
    assert session.tokens == [5, 6]
    session.prefill([7])  # the next call clears the flag
    assert session.n_tokens == 3


def test_stop_ends_decode_early(session) -> None:
    session.reset()
    session.prefill([1, 2, 3])
    out = session.decode(20, on_token=lambda t: session.stop.set())
    assert len(out) == 1


# ---- the engine --------------------------------------------------------------------------
def test_engine_honours_chunk_and_reports_progress_over_the_whole_prompt(session) -> None:
    from workbench.engine import Engine
    from workbench.session import Progress

    session.reset()
    seen: list[Progress] = []
    calls: list[int | None] = []
    real = session.prefill

    def spy(tokens, chunk=None, progress=None):
        calls.append(chunk)
        return real(tokens, chunk=chunk, progress=progress)

    session.prefill = spy
    try:
        engine = Engine(session, chunk=3, progress=seen.append)
        first = engine.complete(prompt="hello", max_tokens=1, sampler=None)
        second = engine.complete(messages=[{"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": first.text},
                                           {"role": "user", "content": "more"}], max_tokens=1)
    finally:
        del session.prefill
    assert calls and set(calls) == {3}
    assert len(first.top_next) == 5
    assert second.usage.source == "live"
    last = [p for p in seen if p.stage == "prefill"][-1]
    assert last.total == second.usage.prompt_tokens and last.done == last.total


def test_failed_save_is_reported_not_silent(session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.engine import Engine
    from workbench.kv.store import KVSaveError, KVStore

    store = KVStore(tmp_path / "kv", min_tokens=1)
    session.reset()
    engine = Engine(session, store, KVPolicy(min_tokens=1, boundary_align=0))

    def disk_full(*a, **k):
        raise KVSaveError(f"{tmp_path}/kv/x.kv: cannot write: No space left on device")

    monkeypatch.setattr(store, "save", disk_full)
    c = engine.complete(prompt="a prompt long enough", max_tokens=1)
    assert c.failed_saves and "No space left" in c.failed_saves[0].detail
    assert c.failed_saves[0].status == "failed"


def test_run_exits_1_and_says_why_when_a_save_fails(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from workbench.kv.store import KVSaveError, KVStore

    def disk_full(self, *a, **k):
        raise KVSaveError(f"{self.dir}/x.kv: cannot write: No space left on device")

    monkeypatch.setattr(KVStore, "save", disk_full)
    rc = main(["run", "--model", str(tiny_gguf), "--prompt", "hello there", "--max-tokens", "1", "--temp", "0",
               "--ctx", "256", "--kv-dir", str(tmp_path / "kv"), "--kv-min-tokens", "1", "--kv-align", "0", "--json"])
    out = capsys.readouterr()
    assert rc == 1
    rec = json.loads(out.out.splitlines()[0])
    assert rec["text"] is not None and any(s["status"] == "failed" for s in rec["saved"])
    assert "FAILED" in out.err and "No space left" in out.err


def test_prefill_on_a_truncated_model_is_an_error_not_sigbus(tiny_gguf: Path, tmp_path: Path) -> None:
    import shutil

    from workbench.session import load

    copy = tmp_path / "m.gguf"
    shutil.copyfile(tiny_gguf, copy)
    s = load(copy, ctx=64)
    try:
        s.prefill([1, 2])
        os.truncate(copy, s.file.data_offset)
        with pytest.raises(GGUFError, match="changed on disk"):
            s.prefill([3, 4])
        assert s.tokens == [1, 2]
    finally:
        s.close()


def test_kv_ls_and_show_survive_timestamps_no_calendar_holds(session, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import struct

    from workbench.kv.header import SaveReason
    from workbench.kv.store import KVStore

    session.reset()
    session.prefill([1, 2, 3])
    store = KVStore(tmp_path / "kv", min_tokens=1)
    path = store.save(session.snapshot(), b"abc", SaveReason.COLD).path
    raw = bytearray(path.read_bytes())
    raw[24:40] = struct.pack("<QQ", 2**62, 2**63)  # created_at, last_used beyond year 9999
    path.write_bytes(bytes(raw))
    assert main(["kv", "ls", str(tmp_path / "kv"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["entries"][0]
    assert row["last_used"] == f"out of range ({2**63})"
    assert main(["kv", "show", str(path)]) == 0
    assert "out of range" in capsys.readouterr().out
