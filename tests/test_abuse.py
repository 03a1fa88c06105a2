"""Hostile command lines, each in its own process with a timeout.

Every probe must end with exactly one line of error on stderr and a non-zero exit code:
no traceback, no hang, no partial output file. The probes that fail before any model is
loaded are cheap; the few that load the tiny model share one copy of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def workbench(argv: list[str], stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), WORKBENCH_TRACEBACK="")
    return subprocess.run([sys.executable, "-m", "workbench.cli", *argv], input=stdin, capture_output=True,
                          timeout=TIMEOUT_S, env=env, cwd=cwd)


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> str:
    err = res.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.split("\n") if ln.strip()]
    assert res.returncode not in (0, 70), f"rc {res.returncode}: {err}"
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of things that are not what they claim to be."""
    d = tmp_path_factory.mktemp("hostile")
    os.mkfifo(d / "fifo")
    os.mkfifo(d / "fifo.gguf")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with open(d / "huge.txt", "wb") as f:  # sparse: 17 MiB of nothing on disk
        f.truncate(17 * 2**20)
    (d / "link.txt").symlink_to(d / "fifo")
    (d / "empty.gguf").write_bytes(b"")
    (d / "garbage.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    return d


# ---- refused before anything is loaded -----------------------------------------------------
ARG_PROBES = {
    "temp nan": ["--temp", "nan"], "temp inf": ["--temp", "inf"], "temp -inf": ["--temp=-inf"],
    "seed -1": ["--seed", "-1"], "seed 2^64": ["--seed", str(2**64)], "seed x": ["--seed", "x"],
    "top-p 0": ["--top-p", "0"], "top-p nan": ["--top-p", "nan"], "min-p 2": ["--min-p", "2"],
    "top-k -1": ["--top-k", "-1"], "ctx 0": ["--ctx", "0"], "ctx -5": ["--ctx", "-5"],
    "chunk 0": ["--chunk", "0"], "max-tokens -1": ["--max-tokens", "-1"],
    "budget nan": ["--kv-dir", "kv", "--kv-budget-mb", "nan"], "budget inf": ["--kv-dir", "kv", "--kv-budget-mb", "inf"],
    "budget 0": ["--kv-dir", "kv", "--kv-budget-mb", "0"], "min-tokens 0": ["--kv-dir", "kv", "--kv-min-tokens", "0"],
    "align -1": ["--kv-dir", "kv", "--kv-align", "-1"], "unknown flag": ["--bogus"],
}


@pytest.mark.parametrize("extra", list(ARG_PROBES.values()), ids=list(ARG_PROBES))
def test_run_argument_out_of_range(extra: list[str], tmp_path: Path) -> None:
    res = workbench(["run", "--model", "none.gguf", "--prompt", "hi", *extra], cwd=tmp_path)
    assert res.returncode == 2
    assert_one_line_error(res, "error: ", "--help")
    assert not (tmp_path / "kv").exists()


@pytest.mark.parametrize("argv", [
    ["run", "--model", "m.gguf", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
    ["run", "--model", "m.gguf", "--prompt", "hi", "--system", b"\xff\xfe".decode("utf-8", "surrogateescape")],
    ["kv", "gc", ".", "--budget-mb", "nan"], ["kv", "gc", ".", "--budget-mb", "-1"],
    ["kv", "verify", ".", "--ctx", "0"], ["demo", "--ctx", "-1"], ["demo", "--seed", "-5"], ["demo", "--turns", "1000"],
    ["demo", "--max-tokens", "100000"], ["synth", "--preset", "tiny", "--out", "x.gguf", "--seed", "-1"],
    ["doctor", "--repeats", "0"], ["kv"], ["kv", "nope"],
], ids=lambda a: " ".join(a)[:40])
def test_bad_arguments_of_every_command(argv: list[str], tmp_path: Path) -> None:
    res = workbench(argv, cwd=tmp_path)
    assert_one_line_error(res, "error")
    assert list(tmp_path.iterdir()) == []


# ---- files that are not regular files -----------------------------------------------------------
@pytest.mark.parametrize("name", ["fifo.gguf", "empty.gguf", "garbage.gguf", ".", "missing.gguf", "/dev/zero"])
def test_model_file_probes(hostile: Path, name: str) -> None:
    path = name if name.startswith("/") else str(hostile / name)
    for argv in (["inspect", path], ["run", "--model", path, "--prompt", "hi", "--json"]):
        assert_one_line_error(workbench(argv), path)


@pytest.mark.parametrize("argv", [["kv", "ls", "fifo"], ["kv", "ls", "missing"], ["kv", "show", "."],
                                  ["kv", "show", "latin1.txt"], ["kv", "verify", ".", "--model", "fifo.gguf"]],
                         ids=lambda a: " ".join(a))
def test_kv_commands_on_wrong_paths(hostile: Path, argv: list[str]) -> None:
    assert_one_line_error(workbench(argv, cwd=hostile), "workbench kv: error")


# ---- with the tiny model: prompt sources -------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_gguf: Path) -> str:
    return str(tiny_gguf)


@pytest.mark.parametrize("name,words", [("fifo", ["FIFO"]), ("/dev/zero", ["character device"]),
                                        ("huge.txt", ["16 MiB"]), ("latin1.txt", ["not UTF-8"]),
                                        ("link.txt", ["FIFO"]), (".", ["directory"])])
def test_prompt_file_probes(hostile: Path, model: str, name: str, words: list[str]) -> None:
    path = name if name.startswith("/") else str(hostile / name)
    res = workbench(["run", "--model", model, "--prompt-file", path, "--json"])
    assert_one_line_error(res, path, *words)


def test_chat_stdin_that_is_not_utf8(model: str) -> None:
    res = workbench(["run", "--model", model, "--chat", "--json", "--max-tokens", "1", "--ctx", "256"],
                    stdin=b"hello\xff\n")
    assert_one_line_error(res, "stdin line 1")


def test_context_overflow_says_how_to_raise_ctx(model: str) -> None:
    res = workbench(["run", "--model", model, "--prompt", "a b c d e f g h", "--ctx", "4", "--json"])
    assert_one_line_error(res, "ctx 4", "--ctx")


# ---- GGUF metadata out of its sane range (the ranges live in workbench.spec.keys) -------------------------
@pytest.mark.parametrize("key,value", [("attention.indexer.top_k", 0),
                                       ("hyper_connection.sinkhorn_iterations", 10**9),
                                       ("block_count", 0), ("expert_used_count", 10**6)])
def test_gguf_metadata_out_of_range(tmp_path: Path, key: str, value: int) -> None:
    from gguf import GGUFValueType as V
    from gguf_helpers import write_tiny

    path = write_tiny(tmp_path / "bad.gguf", set_keys={f"deepseek4.{key}": (value, V.UINT32, None)})
    res = workbench(["run", "--model", str(path), "--prompt", "hi", "--json"])
    assert_one_line_error(res, key)


def test_kv_show_and_verify_on_a_fifo_do_not_hang(hostile: Path) -> None:
    assert_one_line_error(workbench(["kv", "show", str(hostile / "fifo")]), "FIFO")
    res = workbench(["kv", "verify", str(hostile / "fifo")])  # a report on stdout, exit 1
    assert res.returncode == 1 and b"FIFO" in res.stdout and b"Traceback" not in res.stderr
