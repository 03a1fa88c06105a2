"""The GGUF-array tokenizer against the official tokenizer.json (HF ``tokenizers``)."""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizers
from gguf_helpers import write_tokenizer_gguf

from workbench.tokenizer import SPECIAL_TEXTS, Tokenizer, TokenizerError
from workbench.vocab import official_vocab, tokenizer_json, tokenizer_json_path

SHARED = Path(__file__).resolve().parents[2] / "shared"
PROMESSI = SHARED / "data" / "ds4" / "speed-bench" / "promessi_sposi.txt"

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "Quel ramo del lago di Como, che volge a mezzogiorno... perché è così? Città, università, più.",
    "«Sì»\n\nMa il curato, ok…\nE poi — disse — «no».",
    "Größenwahn: Übermäßige Straßenbahnfahrten in München, Köln und Düsseldorf.",
    "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass  # trailing\n",
    "I love pizza 🍕🍕 and 👨‍👩‍👧 families! 🎉 👍🏽 🏳️‍🌈",
    "日本語のテキスト、カタカナ、ひらがな。中文文本测试。한국어 텍스트입니다.",
    "abc你好 naïve café—ok x² + y³ ١٢٣ x ٣٤٥ a ½ １２３",
    "1234567 3.14159 1,000,000 0x1F 2024-01-01T12:00:00Z",
    "   leading spaces\r\n\r\nwindows lines\n\n\n   \ttabs and  double  spaces   ",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "Привет, мир! Ελληνικά κείμενα. עברית. العربية ١٢٣٤٥.",
    "",
    " ",
    "\n",
    "<think>not a special here</think> <｜User｜> ｜DSML｜",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokens, merges = official_vocab()
    return Tokenizer.from_vocab(tokens, merges)


@pytest.fixture(scope="module")
def ref() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(tokenizer_json_path())


def _ref_ids(ref: tokenizers.Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]


def _stdlib_sources(n: int = 200) -> list[str]:
    """``n`` Python standard library sources, every k-th of the sorted file list."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    step = max(1, len(files) // n)
    texts = []
    for path in files[::step][:n]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


# -- construction ---------------------------------------------------------------------


def test_shape_and_special_ids(tok: Tokenizer) -> None:
    assert tok.n_vocab == 129_280
    assert (tok.bos, tok.eos, tok.user, tok.assistant) == (0, 1, 128803, 128804)
    assert (tok.think, tok.think_end, tok.dsml) == (128821, 128822, 128825)


def test_pre_tokenizer_and_decoder_are_the_official_ones(tok: Tokenizer) -> None:
    built = json.loads(tok._hf.to_str())
    official = tokenizer_json()
    assert built["pre_tokenizer"] == official["pre_tokenizer"]
    assert built["decoder"] == official["decoder"]
    assert built["model"]["byte_fallback"] is False
    assert built["model"]["unk_token"] is None
    assert built["added_tokens"] == []


def test_from_gguf_reads_the_two_arrays() -> None:
    tokens, merges = official_vocab()
    f = SimpleNamespace(
        path="model.gguf",
        metadata={"tokenizer.ggml.tokens": list(tokens), "tokenizer.ggml.merges": list(merges)},
    )
    t = Tokenizer.from_gguf(f)
    assert t.n_vocab == len(tokens) and t.source == "model.gguf"
    assert t.encode("Hello world") == [19923, 2058]


def test_from_a_gguf_file_on_disk(tmp_path: Path, tok: Tokenizer) -> None:
    """A tokenizer-only GGUF written by gguf-py and read back by the workbench reader."""
    reader = pytest.importorskip("workbench.gguf.reader")
    tokens, merges = official_vocab()
    path = write_tokenizer_gguf(tmp_path / "tokenizer-only.gguf", tokens, merges)
    with reader.GGUFFile(path) as f:
        t = Tokenizer.from_gguf(f)
    assert t.source == str(path)
    text = SAMPLES[1] + SAMPLES[5]
    assert t.encode(text) == tok.encode(text)
    assert (t.bos, t.eos, t.dsml) == (tok.bos, tok.eos, tok.dsml)


def test_from_gguf_missing_key_names_file_and_key() -> None:
    f = SimpleNamespace(path="bad.gguf", metadata={"tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match=r"bad\.gguf.*tokenizer\.ggml\.merges"):
        Tokenizer.from_gguf(f)


@pytest.mark.parametrize("special", ["<think>", "｜DSML｜", "<｜User｜>"])
def test_missing_special_is_named(special: str) -> None:
    tokens, merges = official_vocab()
    broken = [t if t != special else t + "x" for t in tokens]
    with pytest.raises(TokenizerError, match=f"required special token {special!r}"):
        Tokenizer.from_vocab(broken, merges, source="v.gguf")


def test_bad_merge_and_bad_entry_are_reported() -> None:
    tokens, merges = official_vocab()
    with pytest.raises(TokenizerError, match=r"merges\[5\]"):
        Tokenizer.from_vocab(tokens, [*merges[:5], "nonsense"])
    with pytest.raises(TokenizerError, match=r"merges\[0\].*'zzzq'"):
        Tokenizer.from_vocab(tokens, ["zzzq a"])
    with pytest.raises(TokenizerError, match=r"tokens\[3\] is int"):
        Tokenizer.from_vocab([*tokens[:3], 7, *tokens[4:]], merges)
    with pytest.raises(TokenizerError, match="single-byte tokens"):
        Tokenizer.from_vocab([t for t in tokens if t != "Ġ"], merges)


# -- ids identical to the official tokenizer ------------------------------------------


def test_samples_match_official(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    plain = [s for s in SAMPLES if not any(x in s for x in SPECIAL_TEXTS)]
    expected = _ref_ids(ref, plain)
    for text, want in zip(plain, expected):
        assert tok.encode(text) == want, text
    assert tok.encode_batch(plain) == expected


def test_known_splits(tok: Tokenizer) -> None:
    # "    return" pre-splits as "   " + " return" (one space joins the word)
    ids = tok.encode("    return")
    assert [tok.token_bytes(i) for i in ids] == [b"   ", b" return"]
    # digits group by at most three
    assert [tok.token_bytes(i) for i in tok.encode("2024")] == [b"202", b"4"]
    # non-ASCII punctuation keeps its trailing newlines (official regex, not ds4's approximation)
    assert "»\n\n".encode() in [tok.token_bytes(i) for i in tok.encode("«Sì»\n\nMa")]


def test_stdlib_sources_match_official(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    texts = _stdlib_sources()
    assert len(texts) >= 190
    got = tok.encode_batch(texts)
    want = _ref_ids(ref, texts)
    mismatched = [k for k, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} files differ"
    for text, ids in zip(texts[:20], got[:20]):
        assert tok.decode(ids) == text.encode("utf-8")


def test_promessi_sposi_matches_official(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    if not PROMESSI.exists():
        pytest.skip(f"{PROMESSI} not present")
    text = PROMESSI.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert len(ids) == 417_059
    assert tok.decode(ids) == text.encode("utf-8")


# -- decoding -------------------------------------------------------------------------


def test_round_trip(tok: Tokenizer) -> None:
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text.encode("utf-8")
        assert tok.decode_text(ids) == text


def test_every_token_decodes_like_the_official_decoder(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    texts = ref.decode_batch([[i] for i in range(tok.n_vocab)], skip_special_tokens=False)
    checked = 0
    for i, text in enumerate(texts):
        raw = tok.token_bytes(i)
        try:
            expected = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a partial UTF-8 sequence: HF shows U+FFFD, bytes are checked below
        assert text == expected, i
        checked += 1
    assert checked > 120_000


def test_token_bytes(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    assert tok.token_bytes(tok.bos) == "<｜begin▁of▁sentence｜>".encode()
    assert tok.token_bytes(tok.dsml) == "｜DSML｜".encode()
    assert tok.token_bytes(tok.think) == b"<think>"
    assert tok.token_bytes(ref.token_to_id("Ġthe")) == b" the"
    assert tok.token_bytes(ref.token_to_id("Ċ")) == b"\n"
    assert tok.token_bytes(ref.token_to_id("âĢ¦")) == "…".encode()
    # a lone lead byte of a UTF-8 sequence: bytes exact, text replaced
    lead = ref.token_to_id("Ã")
    assert tok.token_bytes(lead) == b"\xc3"
    assert tok.decode([lead, tok.eos]) == b"\xc3" + "<｜end▁of▁sentence｜>".encode()
    assert tok.decode_text([lead, tok.eos]) == "\ufffd<｜end▁of▁sentence｜>"


def test_decode_rejects_out_of_range(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="129280"):
        tok.decode([5, 129_280])
    with pytest.raises(TokenizerError, match="-1"):
        tok.token_bytes(-1)


# -- special tokens -------------------------------------------------------------------


def test_plain_encode_never_makes_specials(tok: Tokenizer) -> None:
    text = "".join(SPECIAL_TEXTS) + "<｜latest_reminder｜><｜fim▁hole｜><|EOT|>"
    ids = tok.encode(text)
    assert all(i < 128_000 for i in ids)
    assert tok.decode(ids) == text.encode()


def test_rendered_recognises_exactly_the_seven(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    text = "<｜begin▁of▁sentence｜><｜User｜>Hello, what is 2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
    ids = tok.encode_rendered(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert [i for i in ids if i >= 128_000 or i < 3] == [0, 128803, 128804, 128822, 1]

    others = "a<tool_result>b</tool_result><｜latest_reminder｜>c<｜fim▁hole｜>"
    assert tok.encode_rendered(others) == tok.encode(others)

    # the DSML brackets: "</" then the ｜DSML｜ token
    ids = tok.encode_rendered("</｜DSML｜parameter>")
    assert [tok.token_bytes(i) for i in ids[:2]] == [b"</", "｜DSML｜".encode()]
    assert tok.decode(ids) == "</｜DSML｜parameter>".encode()

    # the text between specials is encoded span by span
    spans = ["x  ", "  y"]
    assert tok.encode_rendered(spans[0] + "<think>" + spans[1]) == [
        *tok.encode(spans[0]),
        tok.think,
        *tok.encode(spans[1]),
    ]
    assert tok.encode_rendered("") == []
    assert tok.encode_rendered("<think></think>") == [tok.think, tok.think_end]


@pytest.mark.bench
def test_throughput_close_to_tokenizers(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    if not PROMESSI.exists():
        pytest.skip(f"{PROMESSI} not present")
    text = PROMESSI.read_text(encoding="utf-8")

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ours = best(lambda: tok.encode(text))
    theirs = best(lambda: ref.encode(text, add_special_tokens=False).ids)
    assert ours <= 1.10 * theirs, (ours, theirs)
