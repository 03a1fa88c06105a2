"""Acceptance for the chained layout through ``workbench run``: a six-turn conversation
run twice (``--kv-layout flat`` and ``chain``, the same small continued interval)."""

import io
import json
from pathlib import Path

import pytest

from test_kv_chain import payload_and_text
from test_kv_format import assert_same_state

from workbench.cli import main
from workbench.commands.kv import _model_layout
from workbench.kv.store import KVStore

TURNS = [f"Turn {i}: " + "Quel ramo del lago di Como, che volge a mezzogiorno, tra due catene non interrotte. " * 60
         for i in range(1, 7)]
CTX = 12288


def _chat(monkeypatch, capsys, model: Path, kv: Path, layout: str) -> list[dict]:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TURNS) + "\n"))
    assert main(["run", "--model", str(model), "--chat", "--json", "--temp", "0", "--max-tokens", "2",
                 "--kv-dir", str(kv), "--kv-layout", layout, "--kv-continued-interval", "256",
                 "--kv-align", "256", "--kv-min-tokens", "64", "--kv-budget-mb", "1024", "--ctx", str(CTX)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def _disk(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.mark.slow
def test_six_turns_flat_vs_chain(tiny_gguf, tmp_path, monkeypatch, capsys):
    flat_recs = _chat(monkeypatch, capsys, tiny_gguf, tmp_path / "flat", "flat")
    chain_recs = _chat(monkeypatch, capsys, tiny_gguf, tmp_path / "chain", "chain")
    assert [r.get("tokens") for r in flat_recs] == [r.get("tokens") for r in chain_recs]  # same replies
    flat, chain = KVStore.readonly(tmp_path / "flat"), KVStore.readonly(tmp_path / "chain")
    fe, ce = {e.sha: e for e in flat.entries()}, {e.sha: e for e in chain.entries()}
    assert len(fe) >= 6 and fe.keys() == ce.keys() and all(e.chained for e in ce.values())
    assert max(e.depth for e in ce.values()) >= 2  # the conversation became a chain
    assert 2 * _disk(tmp_path / "chain") <= _disk(tmp_path / "flat")
    layout, _ = _model_layout(tiny_gguf)
    for sha, e in ce.items():
        a, ta = flat.load(fe[sha], layout, CTX)
        b, tb = chain.load(e, layout, CTX)
        assert ta == tb
        assert_same_state(a, b)  # the same restored state
        out = tmp_path / f"{sha}.kv"
        assert main(["kv", "export", str(tmp_path / "chain"), sha, "--out", str(out), "--model", str(tiny_gguf)]) == 0
        assert payload_and_text(out) == payload_and_text(fe[sha].path)
