"""GGUFFile: agreement with gguf.GGUFReader, zero-copy views, and one clear GGUFError per corruption."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from gguf_helpers import build, enc_kv, enc_str, enc_tensor, small_file, write_tiny, write_tokenizer_gguf
from workbench.errors import WorkbenchError
from workbench.gguf.reader import GGUFError, GGUFFile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _write(tmp_path: Path, data: bytes, name: str = "f.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _error(path: Path) -> str:
    """Open ``path``, expect a GGUFError whose message starts with the path; return it."""
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ": "), msg
    assert "\n" not in msg
    return msg


# ---- agreement with the reference reader ----------------------------------------------------
def test_matches_gguf_reader(tiny):
    ref = gguf.GGUFReader(tiny)
    with GGUFFile(tiny) as f:
        assert f.version == 3 and f.alignment == 32 and f.file_size == tiny.stat().st_size
        assert list(f.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            vtype = field.types[0].value
            if vtype == 9:
                assert f.metadata_types[key] == (9, field.types[1].value)
                expected = field.contents()
            else:
                assert f.metadata_types[key] == vtype
                expected = field.contents()
            got = f.metadata[key]
            if isinstance(expected, float) or (isinstance(expected, list) and expected and isinstance(expected[0], float)):
                np.testing.assert_allclose(got, expected)
            else:
                assert got == expected, key
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for rt in ref.tensors:
            t = f.tensors[rt.name]
            assert t.ggml_type == rt.tensor_type.value
            assert t.dims == tuple(int(d) for d in rt.shape)
            assert t.shape == tuple(reversed(t.dims))
            assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes
            raw = f.raw(rt.name)
            assert raw.dtype == np.uint8 and raw.shape[:-1] == t.shape[:-1]
            assert raw.nbytes == t.nbytes
            assert raw.tobytes() == np.asarray(rt.data).tobytes()
        assert f.data_offset == min(t.offset for t in f.tensors.values())


def test_raw_rows_are_whole_blocks_and_decode(tiny):
    with GGUFFile(tiny) as f:
        q = f.tensors["output.weight"]
        assert q.type_name == "Q8_0" and q.shape == (64, 256)
        assert f.raw("output.weight").shape == (64, 256 // 32 * 34)
        e = f.tensors["blk.0.ffn_gate_exps.weight"]
        assert e.type_name == "IQ2_XXS" and e.dims == (256, 256, 4) and e.shape == (4, 256, 256)
        assert f.raw(e.name).shape == (4, 256, 66)
        # a dequantized Q8_0 row from our view equals the reference dequantization of the same row
        rows = f.raw("output.weight")
        ref = gguf.quants.dequantize(rows[5:6], gguf.GGMLQuantizationType.Q8_0)
        blocks = rows[5].reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        ours = (d * blocks[:, 2:].view(np.int8)).reshape(-1)
        np.testing.assert_array_equal(ours, ref.reshape(-1))
        f16 = f.raw("token_embd.weight").view(np.float16)
        assert f16.shape == (64, 256)


def test_raw_is_zero_copy_and_outlives_close(tiny):
    f = GGUFFile(tiny)
    a = f.raw("output_norm.weight")
    assert not a.flags.owndata and not a.flags.writeable
    before = a.copy()
    f.close()
    f.close()  # idempotent
    np.testing.assert_array_equal(a, before)  # the view still reads the mapping
    with pytest.raises(GGUFError, match="closed"):
        f.raw("output_norm.weight")


def test_unknown_tensor_name(tiny):
    with GGUFFile(tiny) as f, pytest.raises(GGUFError, match="no tensor named 'nope'"):
        f.raw("nope")


def test_small_file_every_value_kind(tmp_path):
    p = _write(tmp_path, small_file())
    with GGUFFile(p) as f:
        assert f.metadata == {"general.name": "small", "a.u8": 7, "a.i16": -5, "a.u64": 1 << 40, "a.f64": 0.25,
                              "a.bool": True, "a.f32s": [1.5, -2.0], "a.strs": ["x", "yz", ""],
                              "a.nested": [[1, 2], [3]]}
        assert f.metadata_types == {"general.name": 8, "a.u8": 0, "a.i16": 3, "a.u64": 10, "a.f64": 12, "a.bool": 7,
                                    "a.f32s": (9, 6), "a.strs": (9, 8), "a.nested": (9, 9)}
        assert f.raw("f").view(np.float32).tolist() == list(range(8))
        assert f.raw("q").shape == (2, 34)
        assert f.tensors["q"].offset == f.data_offset + 32
        assert f.data_offset % 32 == 0


def test_string_arrays_long_items_and_lookup_without_decoding(tmp_path):
    """Items of 128 bytes or more (length fields with non-ASCII bytes) decode right, and
    ``string_items`` finds items only at item starts, before the array is decoded."""
    items = ["ab", "é" * 100, "z" * 300, "", "<tok>"]
    p = _write(tmp_path, build([enc_kv("k", 9, (8, items))], [], b""))
    with GGUFFile(p) as f:
        assert f.metadata.string_items("k", ["<tok>", "ab", "b", "zz", "é"]) == (5, {"<tok>", "ab"})
        assert f.metadata["k"] == items
        assert f.metadata.string_items("k", ["", "b"]) == (5, {""})


@pytest.mark.parametrize("bad", [b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xf5\x80",
                                 b"ok\xe2\x82", b"\x80"], ids=repr)
def test_string_array_utf8_check_is_pythons(tmp_path, bad):
    """Surrogates, overlong forms, code points past U+10FFFF, stray and cut sequences: refused
    by the reader's check (native or not) exactly as Python's decoder refuses them."""
    good = "\U0001f600 é ok".encode()
    with pytest.raises(UnicodeDecodeError):
        bad.decode("utf-8")
    p = _write(tmp_path, build([enc_kv("k", 9, (8, [good, bad, good]))], [], b""))
    with pytest.raises(GGUFError, match=r"'k'\[1\] is not valid UTF-8"):
        GGUFFile(p)


def test_alignment_honoured(tmp_path):
    kvs = [enc_kv("general.alignment", 4, 64)]
    p = _write(tmp_path, build(kvs, [enc_tensor("a", (4,), 0, 0), enc_tensor("b", (4,), 0, 64)], b"\1" * 80,
                               alignment=64))
    with GGUFFile(p) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert f.tensors["b"].offset == f.data_offset + 64


# ---- corruptions: one clear error each ------------------------------------------------------
def _one_tensor(dims=(8,), ggml_type=0, offset=0, data=b"\0" * 32, **kw) -> bytes:
    return build([enc_kv("general.name", 8, "x")], [enc_tensor("t", dims, ggml_type, offset, **kw)], data)


CORRUPT = {
    "empty": (b"", "empty"),
    "not gguf": (b"hello world, this is a text file\n", "not a GGUF file"),
    "version 1": (build([], [], b"", version=1), "version 1 is not supported"),
    "version 2": (build([], [], b"", version=2), "version 2 is not supported"),
    "big-endian": (build([], [], b"", version=3 << 24), "big-endian"),
    "absurd n_kv": (build([], [], b"", n_kv=1 << 60), "metadata entries"),
    "absurd n_tensors": (build([], [], b"", n_tensors=1 << 60), "tensors, the remaining"),
    "key longer than file": (build([enc_str("k", length=1 << 62)], [], b"", n_kv=1), "need 4611686018427387904 bytes"),
    "string longer than file": (build([enc_str("k") + struct.pack("<I", 8) + enc_str("v", length=1 << 50)], [], b""),
                                "the value of 'k'"),
    "array longer than file": (build([enc_str("k") + struct.pack("<IIQ", 9, 10, 1 << 61)], [], b""),
                               "2305843009213693952 items of u64"),
    "string array longer than file": (build([enc_str("k") + struct.pack("<IIQ", 9, 8, 1 << 40)], [], b""),
                                      "items of string"),
    "string item longer than file": (build([enc_str("k") + struct.pack("<IIQ", 9, 8, 2) + enc_str("a")
                                            + enc_str("b", length=1 << 40)], [], b""), "'k'[1]"),
    "unknown value type": (build([enc_str("k") + struct.pack("<I", 13) + b"\0" * 8], [], b""), "unknown value type 13"),
    "unknown array item type": (build([enc_str("k") + struct.pack("<IIQ", 9, 77, 1) + b"\0" * 8], [], b""),
                                "unknown array item type 77"),
    "arrays nested too deep": (build([enc_str("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 2000 + struct.pack("<IQ", 4, 0)],
                                     [], b""), "nested deeper than 8"),
    "bad utf-8 key": (build([enc_kv(b"k\xff", 4, 1)], [], b""), "not valid UTF-8"),
    "bad utf-8 string array": (build([enc_kv("k", 9, (8, ["ok", b"\xc3"]))], [], b""), "'k'[1] is not valid UTF-8"),
    "bad utf-8 among long items": (build([enc_kv("k", 9, (8, ["x" * 200, b"ok\xc3", "y"]))], [], b""),
                                   "'k'[1] is not valid UTF-8"),
    # a lead byte whose continuation would be the next item's length byte (0x80: 128 bytes)
    "utf-8 split by a length field": (build([enc_kv("k", 9, (8, ["a", b"\xc3", "y" * 0x80]))], [], b""),
                                      "'k'[1] is not valid UTF-8"),
    "duplicate key": (build([enc_kv("k", 4, 1), enc_kv("k", 4, 2)], [], b""), "duplicate metadata key 'k'"),
    "alignment zero": (build([enc_kv("general.alignment", 4, 0)], [], b""), "bad general.alignment 0"),
    "alignment not power of two": (build([enc_kv("general.alignment", 4, 48)], [], b""), "bad general.alignment 48"),
    "alignment wrong type": (build([enc_kv("general.alignment", 10, 32)], [], b""), "(u64)"),
    "ndim 0": (_one_tensor(dims=(), data=b""), "has 0 dims"),
    "ndim 9": (_one_tensor(dims=(1,) * 9, data=b"\0" * 4), "has 9 dims"),
    "zero dim": (_one_tensor(dims=(8, 0)), "zero dim"),
    "overflowing dims": (_one_tensor(dims=(1 << 40, 1 << 40)), "overflow"),
    "huge dims": (_one_tensor(dims=(1 << 30, 1 << 10)), "more than the whole file"),
    "dims[0] not whole blocks": (_one_tensor(dims=(33, 1), ggml_type=8, data=b"\0" * 64),
                                 "dims[0] = 33 is not a multiple of the Q8_0 block size 32"),
    "unknown ggml type": (_one_tensor(ggml_type=99), "unknown ggml type id 99"),
    "data past end": (_one_tensor(dims=(16,)), "runs past the end of the file"),
    "offset past end": (_one_tensor(offset=1 << 20), "runs past the end of the file"),
    "misaligned offset": (_one_tensor(dims=(4,), offset=4), "offset 4 is not a multiple of the alignment 32"),
    "overlap": (build([], [enc_tensor("a", (16,), 0, 0), enc_tensor("b", (8,), 0, 32)], b"\0" * 64),
                "overlap"),
    "duplicate tensor": (build([], [enc_tensor("a", (8,), 0, 0), enc_tensor("a", (8,), 0, 32)], b"\0" * 64),
                         "duplicate tensor name 'a'"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corruption_is_one_clear_error(tmp_path, case):
    data, phrase = CORRUPT[case]
    p = _write(tmp_path, data)
    t0 = time.perf_counter()
    msg = _error(p)
    assert time.perf_counter() - t0 < 0.5  # no huge allocation or long scan first
    assert phrase in msg, msg


def test_overlap_message_offsets(tmp_path):
    # the header of the overlap case: 24 bytes + 2 infos of 8+1+4+8+4+8 = 33 bytes -> data at 96
    data = build([], [enc_tensor("a", (16,), 0, 0), enc_tensor("b", (8,), 0, 32)], b"\0" * 64)
    p = _write(tmp_path, data)
    assert "tensors 'a' [96, 160) and 'b' [128, 160) overlap" in _error(p)


def test_gguf_error_is_a_workbench_error():
    assert issubclass(GGUFError, WorkbenchError)


def test_missing_file(tmp_path):
    assert "cannot open" in _error(tmp_path / "absent.gguf")


def test_truncation_at_every_offset(tmp_path):
    """Every proper prefix of a well-formed file (every header boundary included) is a
    GGUFError, never another exception or a hang."""
    data = small_file()
    p = tmp_path / "cut.gguf"
    for n in range(len(data)):
        p.write_bytes(data[:n])
        with pytest.raises(GGUFError) as info:
            GGUFFile(p)
        assert str(info.value).startswith(str(p))
    p.write_bytes(data)
    GGUFFile(p).close()


def test_truncated_real_layout_file(tiny, tmp_path):
    data = tiny.read_bytes()
    p = tmp_path / "cut.gguf"
    with GGUFFile(tiny) as f:
        cuts = [f.data_offset - 1, f.data_offset + 1, len(data) - 1] + list(range(0, 4000, 97))
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            GGUFFile(p)


def test_random_mutations_never_crash(tmp_path):
    """Flipped bytes anywhere in the header: the file opens or fails with a GGUFError."""
    data = bytearray(small_file())
    rng = np.random.default_rng(0)
    p = tmp_path / "mut.gguf"
    header_end = len(data) - 100
    for _ in range(400):
        m = bytearray(data)
        for pos in rng.integers(0, header_end, rng.integers(1, 4)):
            m[pos] = int(rng.integers(0, 256))
        p.write_bytes(bytes(m))
        try:
            GGUFFile(p).close()
        except GGUFError as err:
            assert str(err).startswith(str(p))


# ---- speed on the real tokenizer arrays ----------------------------------------------------
def test_real_tokenizer_arrays_parse_fast(tmp_path):
    from workbench.vocab import official_vocab

    tokens, merges = official_vocab()
    p = write_tokenizer_gguf(tmp_path / "vocab.gguf", tokens, merges)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with GGUFFile(p) as f:
            best = min(best, time.perf_counter() - t0)
            assert f.metadata["tokenizer.ggml.tokens"] == list(tokens)
            assert f.metadata["tokenizer.ggml.merges"] == list(merges)
            assert f.metadata_types["tokenizer.ggml.tokens"] == (9, 8)
    assert len(tokens) == 129280 and len(merges) == 127741
    assert best < 0.5, f"parsing 129,280 tokens + 127,741 merges took {best:.3f} s"
