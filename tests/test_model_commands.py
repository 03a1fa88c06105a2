"""``workbench run`` and ``workbench vectors`` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.commands.vectors import parse_vec

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ds4" / "test-vectors"


def test_run_prompt_json(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", str(tiny_gguf), "--prompt", "Hello there", "--max-tokens", "3",
                 "--temp", "0", "--json", "--ctx", "256"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["prompt_tokens"] == 6  # BOS User "Hello" " there" Assistant </think>
    assert rec["decode_tokens"] == 3 and len(rec["tokens"]) == 3
    assert rec["tokens"][0] == rec["top_next"][0]["id"]  # greedy takes the top token
    probs = [t["prob"] for t in rec["top_next"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True)
    assert rec["prefill_tokens_per_s"] > 0 and isinstance(rec["text"], str)


def test_run_text_summary_and_prompt_file(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pf = tmp_path / "p.txt"
    pf.write_text("Write a haiku", encoding="utf-8")
    assert main(["run", "--model", str(tiny_gguf), "--prompt-file", str(pf), "--system", "Be brief.",
                 "--think", "--max-tokens", "2", "--seed", "1", "--chunk", "4", "--ctx", "128"]) == 0
    captured = capsys.readouterr()
    err = captured.err  # the summary goes to stderr, the generated text alone to stdout
    assert "prefill" in err and "tok/s" in err and "top-5 after the prompt" in err
    assert "top-5" not in captured.out


def test_run_chat_reuses_the_session(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nwhat next?\n"))
    assert main(["run", "--model", str(tiny_gguf), "--chat", "--max-tokens", "2", "--temp", "0", "--json",
                 "--ctx", "256"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(recs) == 2
    assert recs[0]["prompt_tokens"] == 5  # BOS User hi Assistant </think>
    # the second turn reuses the live state and only prefills what follows it
    second = recs[1]
    assert second["source"] == "live" and second["cached_tokens"] >= 5
    assert second["prompt_tokens"] == second["cached_tokens"] + second["cache_write_tokens"]
    assert second["cache_write_tokens"] < 12


def test_run_bad_prompt_file(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", str(tiny_gguf), "--prompt-file", str(tmp_path / "none.txt")]) == 1
    assert "none.txt" in capsys.readouterr().err


def test_run_context_too_small(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", str(tiny_gguf), "--prompt", "a b c d e f g h", "--ctx", "4", "--json"]) == 1
    assert "context full" in capsys.readouterr().err


def test_parse_vec(tmp_path: Path) -> None:
    vec = tmp_path / "official.vec"
    vec.write_text("# c\ncase x 4096 2 tests/test-vectors/prompts/x.txt\nstep 0 416461 1\ntop 416461 0\n"
                   "step 1 0a 2\ntop 0a -0.5\ntop 20 -3\nend\n")
    (case,) = parse_vec(vec)
    assert case.id == "x" and case.ctx == 4096 and case.prompt_file == tmp_path / "prompts" / "x.txt"
    assert case.steps[0].selected == b"Ada" and case.steps[1].top == [(b"\n", -0.5), (b" ", -3.0)]
    vec.write_text("case x\n")
    with pytest.raises(Exception, match="malformed"):
        parse_vec(vec)


def test_vectors_harness_reports_failures_on_the_tiny_model(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (VECTORS / "official.vec").is_file():
        pytest.skip("shared test vectors not present")
    rc = main(["vectors", "--model", str(tiny_gguf), "--vectors", str(VECTORS), "--skip-long", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 1  # random weights cannot reproduce DeepSeek's answers
    assert rep["skip"] == 2 and rep["fail"] == 3 and rep["pass"] == 0
    by_id = {c["id"]: c for c in rep["cases"]}
    italian = by_id["short_italian_fact"]
    assert italian["prompt_tokens"] == 21  # the API's prompt_tokens for this case
    assert [s["expected"] for s in italian["steps"]] == ["'Ada'", "' Lov'", "'el'", "'ace'"]
    assert all(not s["passed"] and s["problems"] for s in italian["steps"])
    assert by_id["long_memory_archive"]["status"] == "skip"


@pytest.mark.slow
def test_vectors_pass_on_the_real_model() -> None:
    import os

    model = os.environ.get("DS4_GGUF")
    if not model or not Path(model).is_file():
        pytest.skip("set DS4_GGUF to the real DeepSeek V4 Flash q2 GGUF")
    assert main(["vectors", "--model", model, "--vectors", str(VECTORS)]) == 0


def test_chat_history_splits_reasoning(tiny_gguf: Path) -> None:
    from workbench.commands.run import assistant_message
    from workbench.gguf.reader import GGUFFile
    from workbench.tokenizer import Tokenizer

    with GGUFFile(tiny_gguf) as f:
        tok = Tokenizer.from_gguf(f)
    ids = tok.encode("plan") + [tok.think_end] + tok.encode("answer")
    assert assistant_message(ids, tok) == {"role": "assistant", "reasoning_content": "plan", "content": "answer"}
    assert assistant_message(tok.encode("just text"), tok) == {"role": "assistant", "content": "just text"}
