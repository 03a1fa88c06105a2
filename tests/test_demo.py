"""The main job runs end to end and reports reuse from both live and disk."""

import json

from workbench.cli import main


def test_demo_reports_live_and_disk_reuse(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--model", str(tiny_gguf), "--out", str(out), "--turns", "3", "--max-tokens", "4",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    sources = [r["source"] for r in res["requests"]]
    assert sources == ["none", "live", "none", "disk"]  # turn, turn, title side request, turn
    disk = res["requests"][3]
    assert disk["cached"] > res["requests"][1]["prompt"] and disk["suffix"] == disk["prompt"] - disk["cached"]
    assert disk["ttft_ms"] < disk["full_prefill_ms"]
    html = out.read_text()
    for title in ("Tokens per request", "Time to first token", "Cache events", "Cached prefixes"):
        assert title in html
    assert [r["speedup"] for r in res["requests"]][0] is None  # a miss has no speedup
    assert res["requests"][3]["speedup"] > 1
    # the cache is kept beside the report, and `kv ls` lists it
    assert res["kv_dir"] == str(tmp_path / "demo-kv") and list((tmp_path / "demo-kv").glob("*.kv"))
    assert main(["kv", "ls", res["kv_dir"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"]
    # a second demo starts cold again: the same sources
    assert main(["demo", "--model", str(tiny_gguf), "--out", str(out), "--turns", "3", "--max-tokens", "4",
                 "--json"]) == 0
    assert [r["source"] for r in json.loads(capsys.readouterr().out)["requests"]] == sources
