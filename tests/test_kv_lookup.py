"""Why a request missed: `run --kv-dir` says it in plain words, `kv lookup` gives the details."""

import json

from workbench.cli import main


def test_whole_prompt_checkpoint_that_a_longer_message_cannot_use(tiny_gguf, tmp_path, capsys):
    # ds4's example (issue 15 item 8): the alignment is larger than the prompt, so the cold
    # save stores the whole prompt, ending in the assistant marker; a longer message diverges
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("Quel ramo del lago di Como, che volge a mezzogiorno. " * 20)
    second.write_text(first.read_text() + "E poi?")
    kv = tmp_path / "kv"
    common = ["--model", str(tiny_gguf), "--kv-dir", str(kv), "--kv-min-tokens", "128", "--kv-align", "1024",
              "--ctx", "4096", "--json", "--temp", "0", "--max-tokens", "1"]
    assert main(["run", "--prompt-file", str(first), *common]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    (cold,) = rec["saved"]
    assert cold["tokens"] == rec["prompt_tokens"] < 1024  # stored whole
    assert main(["kv", "lookup", str(kv), "--prompt-file", str(second), "--min-tokens", "128", "--kv-align", "1024",
                 "--model", str(tiny_gguf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["served_by"] is None and out["longest_file"] is not None
    assert out["tokens_estimated"] is False
    # the stored prompt and the new one agree up to the user message's end, token for token
    assert out["diverges_at_token"] == cold["tokens"] - 2 and out["diverges_at_byte"] > 0
    # the largest alignment whose trimmed boundary inside the shared prefix reaches min tokens
    shared = out["longest_common_tokens"]
    best = next(a for a in (2048, 1024, 512, 256, 128) if (shared - 32) // a * a >= 128)
    assert f"--kv-align {best})" in out["alignment_hint"]
    assert main(["run", "--prompt-file", str(second), *common]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["source"] == "none" and "diverges" in rec["why"] and f"--kv-align {best})" in rec["why"]
    # the first prompt itself is served by that checkpoint
    assert main(["kv", "lookup", str(kv), "--prompt-file", str(first), "--min-tokens", "128"]) == 0
    assert capsys.readouterr().out.startswith("served by ")
