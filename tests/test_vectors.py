"""``workbench vectors``: the fixture per checkpoint, ds4's path mapping, the local-golden
parser and criteria, and the whole command on the tiny model with a crafted fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main
from workbench.commands.vectors import (GoldenCase, VectorsError, check_golden, checkpoint_of, fixture_dir, map_path,
                                        parse_golden)

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ds4" / "test-vectors"


def test_checkpoint_from_file_name_or_general_metadata() -> None:
    assert checkpoint_of(Path("/m/ds4f-0731-q2.gguf"), {})[0] == "0731"
    cp, why = checkpoint_of(Path("/m/flash.gguf"), {"general.name": "DeepSeek V4 Flash 0731", "x": "0731"})
    assert cp == "0731" and "general.name" in why
    assert checkpoint_of(Path("/m/flash.gguf"), {"tokenizer.chat_template": "0731", "general.name": "Flash"})[0] \
        == "pre-0731"


def test_ds4_paths_map_into_the_vectors_folder(tmp_path: Path) -> None:
    assert map_path("tests/test-vectors/flash-0731/prompts/a.txt", tmp_path) == tmp_path / "flash-0731/prompts/a.txt"
    assert map_path("tests/test-vectors/flash-pre-0731/prompts/a.txt", tmp_path) == tmp_path / "prompts/a.txt"
    assert map_path("tests/test-vectors/prompts/a.txt", tmp_path) == tmp_path / "prompts/a.txt"
    assert map_path("tests/long_context_story_prompt.txt", tmp_path) == tmp_path / "long_context_story_prompt.txt"


@pytest.mark.skipif(not (VECTORS / "flash-0731" / "local-golden.vec").is_file(), reason="shared test vectors absent")
def test_shared_fixtures_parse() -> None:
    for checkpoint in ("0731", "pre-0731"):
        d = fixture_dir(VECTORS, checkpoint)
        (case,) = parse_golden(d / "local-golden.vec", VECTORS)
        assert (case.id, case.mode, case.ctx, case.frontier) == ("long_story_4096", "text", 5000, 4096)
        assert len(case.top) == 64 and case.top[0][0] == 4371 and case.prompt_file.is_file()
    assert fixture_dir(VECTORS, "0731").name == "flash-0731"


def golden(top: list[tuple[int, float]]) -> GoldenCase:
    return GoldenCase("g", "text", 100, 10, Path("p.txt"), top)


def test_golden_criteria() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000) * 3
    order = np.argsort(-logits)
    ref = [(int(i), float(logits[i])) for i in order[:64]]
    ok = check_golden(golden(ref), logits)
    assert ok.status == "pass" and ok.overlap == {5: 5, 20: 20, 64: 64} and ok.top20_max_abs == 0
    shifted = logits.copy()
    shifted[order[0]] -= 100  # top-1 lost, and a logit 100 away
    bad = check_golden(golden(ref), shifted)
    assert bad.status == "fail" and any("top-1" in p for p in bad.problems) and any("max" in p for p in bad.problems)
    swapped = [ref[0]] + [(int(i), v) for (i, v) in ref[1:5]][::-1] + ref[5:]
    assert check_golden(golden(swapped), logits).status == "pass"  # order inside the top 5 does not count
    alien = ref[:1] + [(999 - k, 0.0) for k in range(63)]  # ids outside the local top
    res = check_golden(golden([(int(order[0]), float(logits[order[0]]))] + alien[1:]), logits)
    assert res.status == "fail" and res.overlap[5] < 4


def test_golden_parser_errors(tmp_path: Path) -> None:
    vec = tmp_path / "g.vec"
    vec.write_text("case c text 50 8 tests/p.txt 2\ntop 0 5 1.5\ntop 1 7 1.0\nend\n")
    (case,) = parse_golden(vec, tmp_path)
    assert case.top == [(5, 1.5), (7, 1.0)] and case.prompt_file == tmp_path / "p.txt"
    for text in ("case c text 50 8 tests/p.txt 2\ntop 1 5 1.5\n", "case c text 8 8 p 1\ntop 0 1 1\nend\n",
                 "top 0 1 1\n", "case c text 50 8 p 2\ntop 0 1 1\nend\n"):
        vec.write_text(text)
        with pytest.raises(VectorsError, match="g.vec"):
            parse_golden(vec, tmp_path)


def crafted_fixture(root: Path, tiny: Path, frontier: int) -> tuple[Path, list[int]]:
    """A test-vectors folder whose flash-0731 local golden is the tiny model's own top 64, and
    whose pre-0731 golden is shifted so it fails."""
    from workbench.session import load
    from workbench.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog, again and again, " * 3
    base = load(tiny, ctx=64)
    try:
        ids = Tokenizer.from_gguf(base.file).encode(text)[:frontier]
        from workbench.session import Session

        s = Session(base.model, 64)
        s.prefill(ids)
        logits = np.asarray(s.logits)
    finally:
        base.close()
    top = np.argsort(-logits, kind="stable")[:64]
    (root / "flash-0731" / "prompts").mkdir(parents=True)
    (root / "prompts").mkdir()
    (root / "story.txt").write_text(text)
    for sub, shift in (("flash-0731", 0.0), (".", 50.0)):
        lines = [f"case long_story text 64 {frontier} tests/story.txt 64"]
        lines += [f"top {r} {int(i)} {float(logits[i]) + shift:.7f}" for r, i in enumerate(top)]
        (root / sub / "local-golden.vec").write_text("\n".join(lines + ["end", ""]))
        (root / sub / "official.vec").write_text(
            "case short 64 1 tests/test-vectors/prompts/q.txt\nstep 0 41 1\ntop 41 0\nend\n")
        (root / sub / "prompts" / "q.txt").write_text("Say A")
    return root, [int(i) for i in top]


def test_vectors_command_picks_the_fixture_and_runs_local_golden(tiny_gguf: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, top = crafted_fixture(tmp_path / "vectors", tiny_gguf, frontier=12)
    dated = tmp_path / "ds4f-0731-tiny.gguf"
    dated.symlink_to(tiny_gguf)
    rc = main(["vectors", "--model", str(dated), "--vectors", str(root), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["checkpoint"] == "0731" and Path(rep["fixture"]).name == "flash-0731"
    assert rep["golden"]["pass"] == 1 and rep["golden"]["cases"][0]["top1"] == top[0]
    assert rep["fail"] == 1 and rc == 1  # the official case cannot pass on random weights
    # the undated file gets the top-level fixture, whose golden logits are 50 off
    rc = main(["vectors", "--model", str(tiny_gguf), "--vectors", str(root)])
    out = capsys.readouterr().out
    assert rc == 1 and f"fixture {root.resolve()} (checkpoint pre-0731" in out
    assert "FAIL local golden long_story" in out and "max |logit difference|" in out
    # forced checkpoint, golden skipped
    rc = main(["vectors", "--model", str(tiny_gguf), "--vectors", str(root), "--checkpoint", "0731", "--json",
               "--skip-golden", "--only", "short"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["checkpoint_reason"] == "--checkpoint" and rep["golden"]["cases"] == []
    with pytest.raises(VectorsError, match="no official.vec"):
        fixture_dir(tmp_path, "0731")
