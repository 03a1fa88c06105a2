"""`workbench run --kv-dir`: disk prefix reuse, suffix-only prefill and the saves, as JSON."""

import json

from workbench.cli import main
from workbench.kv.header import SaveReason, read_header


def _run(capsys, *argv):
    assert main(["run", *argv, "--json", "--temp", "0", "--max-tokens", "2"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_second_run_restores_the_cold_checkpoint(tiny_gguf, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Quel ramo del lago di Como, che volge a mezzogiorno. " * 40)
    kv = tmp_path / "kv"
    common = ["--model", str(tiny_gguf), "--prompt-file", str(prompt), "--kv-dir", str(kv),
              "--kv-min-tokens", "128", "--kv-align", "128", "--ctx", "4096"]
    first, shutdown = _run(capsys, *common)
    assert first["source"] == "none" and first["cached_tokens"] == 0
    assert first["cache_write_tokens"] == first["prompt_tokens"]
    (cold,) = first["saved"]
    assert cold["reason"] == "cold" and cold["status"] == "saved"
    # ds4's cold boundary: the prompt minus 32 trimmed tokens, aligned down to 128
    assert cold["tokens"] == (first["prompt_tokens"] - 32) // 128 * 128
    assert read_header(cold["path"]).reason == SaveReason.COLD
    assert shutdown["shutdown_save"]["tokens"] == first["prompt_tokens"] + 2

    second, _ = _run(capsys, *common)
    assert second["source"] == "disk"
    assert second["cached_tokens"] == cold["tokens"]
    assert second["cache_write_tokens"] == second["prompt_tokens"] - cold["tokens"]
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert second["tokens"] == first["tokens"]  # same greedy continuation after restore + suffix
    assert read_header(cold["path"]).hits == 1


def test_kv_dir_that_is_a_file_is_a_clear_error(tiny_gguf, tmp_path, capsys):
    bad = tmp_path / "not-a-dir"
    bad.write_text("x")
    assert main(["run", "--model", str(tiny_gguf), "--prompt", "hi", "--kv-dir", str(bad), "--json"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1
