"""The streaming GGUF writer (workbench/gguf/writer.py, on gguf.GGUFWriter) and the synthetic ds4-layout models
(workbench/synth.py, ``workbench synth``).

Files are read back with the ``gguf`` PyPI package (``GGUFReader``, ``gguf.quants``), and the
expected tensor table and metadata are written out here from ds4-architecture.md §1.2/§1.3,
independently of the code under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf import GGUFValue
from gguf import GGUFValueType as V
from gguf.quants import dequantize

from workbench import synth
from workbench.cli import main as cli_main
from workbench.errors import WorkbenchError
from workbench.gguf.layout import ds4_compat_problems, validate_ds4
from workbench.gguf.reader import GGUFFile
from workbench.gguf.writer import GGUFWriteError, TensorInfo, write_gguf
from workbench.spec.args import ModelArgs
from workbench.synth import metadata, plan_tensors, resolve_preset, synthesize
from workbench.vocab import official_vocab

# ---- expectations from the spec ------------------------------------------------------------

# The tiny preset as the task defines it.
TINY = dict(n_layer=6, E=256, V=129280, H=4, HD=128, ROT=64, QR=128, OG=2, OR=64, NE=8, NU=2, FF=256,
            NHASH=3, IH=4, ID=128, TOPK=8, HC=4, SWA=128, SINKHORN=20, CTX=65536)
# The real widths (§0).
REAL = dict(E=4096, V=129280, H=64, HD=512, ROT=64, QR=1024, OG=8, OR=1024, NE=256, NU=6, FF=2048,
            IH=64, ID=128, TOPK=512, HC=4, SWA=128, SINKHORN=20, CTX=1048576)


def ds4_ratios(n_layer: int) -> list[int]:
    return [0 if L < 2 else (4 if L % 2 == 0 else 128) for L in range(n_layer)]


def ds4_table(d: dict, n_layer: int, n_hash: int, experts: tuple[Q, Q, Q]) -> dict[str, tuple[list[int], Q]]:
    """name -> (GGUF dims, type), §1.3 with the widths in ``d``; exp_probs_b on non-hash layers."""
    E, V_, HC = d["E"], d["V"], d["HC"]
    hc_dim, mix, q_dim = HC * E, 2 * HC + HC * HC, d["H"] * d["HD"]
    F16, F32, Q8 = Q.F16, Q.F32, Q.Q8_0
    t: dict[str, tuple[list[int], Q]] = {
        "token_embd.weight": ([E, V_], F16),
        "output_hc_fn.weight": ([hc_dim, HC], F16),
        "output_hc_scale.weight": ([1], F32),
        "output_hc_base.weight": ([HC], F32),
        "output_norm.weight": ([E], F32),
        "output.weight": ([E, V_], Q8),
    }
    for L, r in enumerate(ds4_ratios(n_layer)):
        b = f"blk.{L}."
        t.update({
            b + "hc_attn_fn.weight": ([hc_dim, mix], F16),
            b + "hc_attn_scale.weight": ([3], F32),
            b + "hc_attn_base.weight": ([mix], F32),
            b + "attn_norm.weight": ([E], F32),
            b + "attn_q_a.weight": ([E, d["QR"]], Q8),
            b + "attn_q_a_norm.weight": ([d["QR"]], F32),
            b + "attn_q_b.weight": ([d["QR"], q_dim], Q8),
            b + "attn_kv.weight": ([E, d["HD"]], Q8),
            b + "attn_kv_a_norm.weight": ([d["HD"]], F32),
            b + "attn_sinks.weight": ([d["H"]], F32),
            b + "attn_output_a.weight": ([q_dim // d["OG"], d["OG"] * d["OR"]], Q8),
            b + "attn_output_b.weight": ([d["OG"] * d["OR"], E], Q8),
            b + "hc_ffn_fn.weight": ([hc_dim, mix], F16),
            b + "hc_ffn_scale.weight": ([3], F32),
            b + "hc_ffn_base.weight": ([mix], F32),
            b + "ffn_norm.weight": ([E], F32),
            b + "ffn_gate_inp.weight": ([E, d["NE"]], F16),
            b + "ffn_gate_exps.weight": ([E, d["FF"], d["NE"]], experts[0]),
            b + "ffn_up_exps.weight": ([E, d["FF"], d["NE"]], experts[1]),
            b + "ffn_down_exps.weight": ([d["FF"], E, d["NE"]], experts[2]),
            b + "ffn_gate_shexp.weight": ([E, d["FF"]], Q8),
            b + "ffn_up_shexp.weight": ([E, d["FF"]], Q8),
            b + "ffn_down_shexp.weight": ([d["FF"], E], Q8),
        })
        if r == 4:
            t.update({
                b + "attn_compressor_ape.weight": ([2 * d["HD"], 4], F16),
                b + "attn_compressor_kv.weight": ([E, 2 * d["HD"]], F16),
                b + "attn_compressor_gate.weight": ([E, 2 * d["HD"]], F16),
                b + "indexer.attn_q_b.weight": ([d["QR"], d["IH"] * d["ID"]], F16),
                b + "indexer.proj.weight": ([E, d["IH"]], F16),
                b + "indexer_compressor_ape.weight": ([2 * d["ID"], 4], F16),
                b + "indexer_compressor_kv.weight": ([E, 2 * d["ID"]], F16),
                b + "indexer_compressor_gate.weight": ([E, 2 * d["ID"]], F16),
                b + "indexer_compressor_norm.weight": ([d["ID"]], F32),
            })
        if r == 128:
            t.update({
                b + "attn_compressor_ape.weight": ([d["HD"], 128], F16),
                b + "attn_compressor_kv.weight": ([E, d["HD"]], F16),
                b + "attn_compressor_gate.weight": ([E, d["HD"]], F16),
            })
        if r:
            t[b + "attn_compressor_norm.weight"] = ([d["HD"]], F32)
        if L < n_hash:
            t[b + "ffn_gate_tid2eid.weight"] = ([d["NU"], V_], Q.I32)
        else:
            t[b + "exp_probs_b.bias"] = ([d["NE"]], F32)
    return t


def ds4_metadata(d: dict, n_layer: int, n_hash: int) -> dict[str, tuple[object, V]]:
    """Every deepseek4.* key of §1.2 with the widths in ``d``: key -> (value, GGUF type)."""
    u32, f32 = V.UINT32, V.FLOAT32
    m = {
        "block_count": (n_layer, u32), "embedding_length": (d["E"], u32), "vocab_size": (d["V"], u32),
        "attention.head_count": (d["H"], u32), "attention.head_count_kv": (1, u32),
        "attention.key_length": (d["HD"], u32), "attention.value_length": (d["HD"], u32),
        "rope.dimension_count": (d["ROT"], u32), "attention.q_lora_rank": (d["QR"], u32),
        "attention.output_lora_rank": (d["OR"], u32), "attention.output_group_count": (d["OG"], u32),
        "expert_count": (d["NE"], u32), "expert_used_count": (d["NU"], u32),
        "expert_feed_forward_length": (d["FF"], u32), "expert_shared_count": (1, u32),
        "hash_layer_count": (n_hash, u32), "expert_group_count": (0, u32),
        "expert_group_used_count": (0, u32), "attention.sliding_window": (d["SWA"], u32),
        "attention.indexer.head_count": (d["IH"], u32), "attention.indexer.key_length": (d["ID"], u32),
        "attention.indexer.top_k": (d["TOPK"], u32), "hyper_connection.count": (d["HC"], u32),
        "hyper_connection.sinkhorn_iterations": (d["SINKHORN"], u32),
        "attention.compress_ratios": (ds4_ratios(n_layer), u32),
        "swiglu_clamp_exp": ([10.0] * n_layer, f32),
        "rope.scaling.original_context_length": (65536, u32),
        "rope.freq_base": (10000.0, f32), "rope.scaling.factor": (16.0, f32),
        "rope.scaling.yarn_beta_fast": (32.0, f32), "rope.scaling.yarn_beta_slow": (1.0, f32),
        "attention.compress_rope_freq_base": (160000.0, f32), "expert_weights_scale": (1.5, f32),
        "attention.layer_norm_rms_epsilon": (1e-6, f32), "hyper_connection.epsilon": (1e-6, f32),
        "expert_weights_norm": (True, V.BOOL), "context_length": (d["CTX"], u32),
    }
    return {"deepseek4." + k: v for k, v in m.items()}


Q2 = (Q.IQ2_XXS, Q.IQ2_XXS, Q.Q2_K)
Q4 = (Q.Q4_K, Q.Q4_K, Q.Q4_K)


# ---- helpers --------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def field_value(reader: GGUFReader, key: str) -> tuple[object, V]:
    """(value, type) of a metadata key; arrays give (list, item type)."""
    field = reader.fields[key]
    types = field.types
    value = field.contents()
    return value, (types[-1] if types[0] == V.ARRAY else types[0])


def values(t) -> np.ndarray:
    """A GGUFReader tensor as float64 in logical shape (dequantized where quantized)."""
    if t.tensor_type in (Q.F32, Q.F16, Q.I32):
        return np.asarray(t.data, dtype=np.float64)
    return dequantize(t.data, t.tensor_type).astype(np.float64)


def assert_same_args(got: ModelArgs, want: ModelArgs) -> None:
    """Equal hyperparameters; floats to f32 precision (the file stores f32)."""
    for f in dataclasses.fields(ModelArgs):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a == (pytest.approx(b, rel=1e-6) if isinstance(b, (float, tuple)) else b), f.name


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


@pytest.fixture(scope="module")
def tiny_reader(tiny_gguf: Path) -> GGUFReader:
    return GGUFReader(tiny_gguf)


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize("tiny-q4", tmp_path_factory.mktemp("q4") / "tiny-q4.gguf", seed=0)


# ---- writer -----------------------------------------------------------------------------------

ARCH = {"general.architecture": GGUFValue("test", V.STRING)}


def test_writer_round_trip_every_value_type_and_custom_alignment(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    meta = {
        **ARCH,
        "general.alignment": GGUFValue(64, V.UINT32),
        "t.u8": GGUFValue(255, V.UINT8), "t.i8": GGUFValue(-128, V.INT8),
        "t.u16": GGUFValue(65535, V.UINT16), "t.i16": GGUFValue(-32768, V.INT16),
        "t.u32": GGUFValue(2**32 - 1, V.UINT32), "t.i32": GGUFValue(-2**31, V.INT32),
        "t.f32": GGUFValue(1.5, V.FLOAT32), "t.bool": GGUFValue(True, V.BOOL), "t.str": GGUFValue("héllo ｜", V.STRING),
        "t.u64": GGUFValue(2**64 - 1, V.UINT64), "t.i64": GGUFValue(-2**63, V.INT64),
        "t.f64": GGUFValue(math.pi, V.FLOAT64),
        "a.str": GGUFValue(["a", "", "Ġ t", "<｜User｜>"], V.ARRAY, V.STRING),
        "a.u32": GGUFValue([0, 4, 128], V.ARRAY, V.UINT32),
        "a.i32": GGUFValue([-1, 2], V.ARRAY, V.INT32),
        "a.f32": GGUFValue([10.0, 0.25], V.ARRAY, V.FLOAT32),
        "a.f64": GGUFValue([1e-300], V.ARRAY, V.FLOAT64),
        "a.bool": GGUFValue([True, False], V.ARRAY, V.BOOL),
        "a.u64": GGUFValue([2**40], V.ARRAY, V.UINT64),
    }
    f32 = rng.standard_normal((3, 5)).astype(np.float32)  # logical [3, 5] -> dims [5, 3]
    f16 = rng.standard_normal((7,)).astype(np.float16)
    i32 = rng.integers(-9, 9, (2, 3)).astype(np.int32)
    q8 = rng.integers(0, 256, (2, 2 * 34), dtype=np.uint8)  # 2 rows of 64 elements
    q8[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    q8[:, 34:36] = np.frombuffer(np.float16(-0.02).tobytes(), np.uint8)
    tensors = [
        (TensorInfo("a", (5, 3), 0), lambda: [f32[:1], f32[1:]]),  # two chunks
        (TensorInfo("b", (7,), 1), lambda: [f16.tobytes()]),
        (TensorInfo("c", (3, 2), 26), lambda: [i32]),
        (TensorInfo("d", (64, 2), 8), lambda: [q8]),
        (TensorInfo("e", (1,), 0), lambda: [np.float32(7.0).tobytes()]),
    ]
    out = write_gguf(tmp_path / "sub" / "all.gguf", meta, tensors)
    r = GGUFReader(out)
    for key, mv in meta.items():
        value, vtype = field_value(r, key)
        if mv.type == V.ARRAY:
            assert list(value) == pytest.approx(mv.value), key
            assert vtype == int(mv.sub_type), key
        else:
            assert vtype == int(mv.type), key
            assert value == (pytest.approx(mv.value) if isinstance(mv.value, float) else mv.value), key
    got = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == ["a", "b", "c", "d", "e"]
    assert r.data_offset % 64 == 0
    assert all(t.data_offset % 64 == 0 for t in r.tensors)
    np.testing.assert_array_equal(got["a"].data, f32)
    np.testing.assert_array_equal(got["b"].data, f16)
    np.testing.assert_array_equal(got["c"].data, i32)
    np.testing.assert_array_equal(np.asarray(got["d"].data).reshape(2, -1), q8)
    assert list(got["d"].shape) == [64, 2] and got["d"].tensor_type == Q.Q8_0
    np.testing.assert_array_equal(got["e"].data, [7.0])
    assert out.stat().st_size == r.data_offset + 64 + 64 + 64 + 192 + 64  # each tensor padded to 64
    assert sorted(p.name for p in out.parent.iterdir()) == ["all.gguf"]


def test_writer_default_alignment_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    data = np.arange(10, dtype=np.float32)
    tensors = [(TensorInfo(f"t{i}", (10,), 0), lambda: [data]) for i in range(3)]
    out = write_gguf(tmp_path / "p.gguf", {**ARCH, "general.name": GGUFValue("x", V.STRING)}, tensors,
                     progress=lambda done, total: calls.append((done, total)))
    r = GGUFReader(out)
    assert r.data_offset % 32 == 0
    assert [t.data_offset - r.data_offset for t in r.tensors] == [0, 64, 128]  # 40 B padded to 64
    size = out.stat().st_size
    assert size == r.data_offset + 3 * 64
    assert calls[-1] == (size, size)
    assert all(t == size for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_writer_streams_a_large_tensor_in_bounded_memory(tmp_path: Path) -> None:
    """A 64 MiB tensor from 1 MiB chunks: peak traced memory stays a few chunks."""
    import tracemalloc

    chunk, n = 1 << 20, 64

    def source():
        for i in range(n):
            yield np.full(chunk, i, dtype=np.uint8)

    tracemalloc.start()
    try:
        out = write_gguf(tmp_path / "big.gguf", ARCH, [(TensorInfo("big", (n * chunk // 4,), 0), source)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * chunk, f"peak {peak / 2**20:.1f} MiB"
    r = GGUFReader(out)
    data = np.asarray(r.tensors[0].data).view(np.uint8)
    assert data.size == n * chunk and data[-1] == n - 1 and data[chunk] == 1


def _one(name: str = "w", dims: tuple[int, ...] = (4,), ggml_type: int = 0, n: int = 16):
    return (TensorInfo(name, dims, ggml_type), lambda: [bytes(n)])


@pytest.mark.parametrize("meta, tensors, message", [
    (ARCH, [_one(n=12)], "got 12 bytes"),
    (ARCH, [_one(n=20)], "more than 16"),
    (ARCH, [_one(), _one()], "duplicate"),
    (ARCH, [_one(dims=(48,), ggml_type=8, n=51)], "not a multiple"),
    (ARCH, [_one(name="x" * 64)], "name"),
    (ARCH, [_one(dims=(1, 1, 1, 1, 4))], "dims"),
    ({**ARCH, "k": GGUFValue(2**32, V.UINT32)}, [_one()], "does not fit"),
    ({**ARCH, "k": GGUFValue([1, 200], V.ARRAY, V.INT8)}, [_one()], "200 does not fit INT8"),
    ({**ARCH, "k": GGUFValue(1e300, V.FLOAT32)}, [_one()], "float too large"),
    ({**ARCH, "k": GGUFValue([], V.ARRAY, V.UINT32)}, [_one()], "Empty array"),
    ({**ARCH, "general.alignment": GGUFValue(12, V.UINT32)}, [_one()], "alignment"),
    ({**ARCH, "k": 5}, [_one()], "GGUFValue"),
    ({}, [_one()], "general.architecture"),
])
def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path: Path, meta, tensors, message) -> None:
    out = tmp_path / "bad.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(GGUFWriteError, match=message) as err:
        write_gguf(out, meta, tensors)
    assert str(out) in str(err.value)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_writer_removes_temporary_file_when_a_chunk_source_fails(tmp_path: Path) -> None:
    def failing():
        yield bytes(16)
        raise RuntimeError("generator broke")

    out = tmp_path / "f.gguf"
    with pytest.raises(RuntimeError, match="generator broke"):
        write_gguf(out, ARCH, [_one(), (TensorInfo("x", (4,), 0), failing)])
    assert list(tmp_path.iterdir()) == []


# ---- synthetic models: determinism and CLI --------------------------------------------------

def test_tiny_is_deterministic_per_seed_and_independent_of_chunking(
        tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_BYTES", 64 << 10)  # many more, smaller chunks
    again = synthesize("tiny", tmp_path / "again.gguf", seed=0)
    assert sha256(again) == sha256(tiny_gguf)
    other = synthesize("tiny", tmp_path / "other.gguf", seed=1)
    assert sha256(other) != sha256(tiny_gguf)
    assert other.stat().st_size == tiny_gguf.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf", "other.gguf"]


def test_cli_synth_json_and_bad_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m" / "tiny-q4.gguf"
    assert cli_main(["synth", "--preset", "tiny-q4", "--out", str(out), "--seed", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and result["bytes"] == out.stat().st_size
    assert result["tensors"] == len(ds4_table(TINY, 6, 3, Q4)) == len(GGUFFile(out).tensors)
    assert result["seed"] == 3 and result["seconds"] >= 0
    assert cli_main(["synth", "--preset", "huge", "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "huge" in err and "real-dims-N" in err and "\n" not in err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("name", ["real-dims-0", "real-dims-44", "real-dims-", "real-dims-1x", "tiny2"])
def test_bad_preset_names(name: str) -> None:
    with pytest.raises(WorkbenchError, match="preset"):
        resolve_preset(name)


def test_negative_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="seed"):
        synthesize("tiny", tmp_path / "x.gguf", seed=-1)


# ---- synthetic models: layout, metadata, tokenizer ------------------------------------------

def test_tiny_tensor_table_names_types_and_gguf_dims(tiny_reader: GGUFReader) -> None:
    expected = ds4_table(TINY, 6, 3, Q2)
    got = {t.name: ([int(x) for x in t.shape], t.tensor_type) for t in tiny_reader.tensors}
    assert sorted(got) == sorted(expected)
    mismatched = {n: (got[n], expected[n]) for n in expected if got[n] != expected[n]}
    assert mismatched == {}
    assert len(got) == 6 + 6 * 23 + 4 * 4 + 2 * 6 + 3 + 3


def test_tiny_q4_differs_only_in_expert_types(tiny_q4: Path) -> None:
    f = GGUFFile(tiny_q4)
    got = {n: (list(t.dims), Q(t.ggml_type)) for n, t in f.tensors.items()}
    assert got == ds4_table(TINY, 6, 3, Q4)
    for name, t in f.tensors.items():
        if t.ggml_type == Q.Q4_K:
            x = dequantize(f.raw(name), Q.Q4_K).astype(np.float64)
            assert rms(x) == pytest.approx(1 / math.sqrt(t.dims[0]), rel=0.1), name
            assert abs(x.mean()) < 0.02 * rms(x), name


def test_tiny_metadata(tiny_reader: GGUFReader) -> None:
    expected = ds4_metadata(TINY, 6, 3)
    for key, (value, vtype) in expected.items():
        got, got_type = field_value(tiny_reader, key)
        assert got_type == vtype, key
        if isinstance(value, list):
            assert list(got) == pytest.approx(value, rel=1e-6), key
        elif isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-6), key
        else:
            assert got == value, key
    assert field_value(tiny_reader, "general.architecture") == ("deepseek4", V.STRING)
    assert "tiny" in field_value(tiny_reader, "general.name")[0]
    assert field_value(tiny_reader, "tokenizer.ggml.model") == ("gpt2", V.STRING)
    assert field_value(tiny_reader, "tokenizer.ggml.pre") == ("joyai-llm", V.STRING)
    assert field_value(tiny_reader, "tokenizer.ggml.bos_token_id") == (0, V.UINT32)
    assert field_value(tiny_reader, "tokenizer.ggml.eos_token_id") == (1, V.UINT32)
    assert "general.alignment" not in tiny_reader.fields  # default 32
    assert tiny_reader.alignment == 32


def test_tiny_tokenizer_is_the_official_vocabulary(tiny_reader: GGUFReader) -> None:
    tokens, merges = official_vocab()
    got_tokens, ttype = field_value(tiny_reader, "tokenizer.ggml.tokens")
    got_merges, mtype = field_value(tiny_reader, "tokenizer.ggml.merges")
    assert ttype == mtype == V.STRING
    assert len(got_tokens) == 129280
    assert tuple(got_tokens) == tokens
    assert tuple(got_merges) == merges
    assert got_tokens[0] == "<｜begin▁of▁sentence｜>" and got_tokens[1] == "<｜end▁of▁sentence｜>"


def test_workbench_reader_validates_tiny_and_tiny_q4(tiny_gguf: Path, tiny_q4: Path) -> None:
    for path, preset in ((tiny_gguf, "tiny"), (tiny_q4, "tiny-q4")):
        f = GGUFFile(path)
        assert validate_ds4(f) == [], path
        assert_same_args(ModelArgs.from_metadata(f.metadata), resolve_preset(preset).args)


# ---- synthetic models: weight statistics -----------------------------------------------------

LINEAR_SUFFIXES = ("attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight",
                   "attn_output_b.weight", "compressor_kv.weight", "indexer.attn_q_b.weight",
                   "indexer.proj.weight", "_exps.weight", "_shexp.weight", "output.weight")


def test_tiny_weights_have_the_intended_scales(tiny_reader: GGUFReader) -> None:
    """Projections RMS ~ 1/sqrt(fan_in) with mean ~0 (every quant type, every expert slab);
    norms ~1; small sinks, biases, APE, router and compressor gates; HC fns small enough
    that the mix values are O(1); the embedding unit-RMS."""
    seen: set[Q] = set()
    for t in tiny_reader.tensors:
        x, fan_in, name = values(t), int(t.shape[0]), t.name
        assert np.all(np.isfinite(x)), name
        if name.endswith(LINEAR_SUFFIXES):
            target = 1 / math.sqrt(fan_in)
            assert target / 1.5 < rms(x) < target * 1.5, name
            assert abs(x.mean()) < 0.05 * rms(x), name
            if name.endswith("_exps.weight"):  # each expert slab on its own
                slabs = x.reshape(x.shape[0], -1)
                per = np.sqrt(np.mean(slabs ** 2, axis=1))
                assert np.all((per > target / 1.5) & (per < target * 1.5)), name
            seen.add(t.tensor_type)
        elif name.endswith("norm.weight"):
            assert abs(x.mean() - 1) < 0.05 and 0.8 < x.min() and x.max() < 1.2, name
        elif name.endswith(("hc_attn_fn.weight", "hc_ffn_fn.weight", "output_hc_fn.weight")):
            mix_std = rms(x) * math.sqrt(fan_in)  # std of fn @ (unit-RMS vector)
            assert 0.1 < mix_std < 2, name
        elif name.endswith(("attn_sinks.weight", "compressor_ape.weight")):
            assert np.abs(x).max() < 0.5, name
        elif name.endswith("exp_probs_b.bias"):
            assert np.abs(x).max() < 0.05, name
        elif name.endswith(("ffn_gate_inp.weight", "compressor_gate.weight")):
            assert rms(x) * math.sqrt(fan_in) < 1.0, name  # logits/scores of std < 1
        elif name == "token_embd.weight":
            assert 0.8 < rms(x) < 1.2 and abs(x.mean()) < 0.01
    assert seen >= {Q.Q8_0, Q.IQ2_XXS, Q.Q2_K}


def test_tiny_hyper_connection_parameters(tiny_reader: GGUFReader) -> None:
    """Pre weights ≈ 1/n_hc, post gains ≈ 1, combine diagonal-heavy, scales ≈ 1."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    hc = TINY["HC"]
    for t in tiny_reader.tensors:
        x = values(t)
        if t.name.endswith(("hc_attn_base.weight", "hc_ffn_base.weight")):
            pre, post, comb = x[:hc], x[hc:2 * hc], x[2 * hc:].reshape(hc, hc)
            assert np.all(np.abs(sigmoid(pre) - 1 / hc) < 0.05), t.name
            assert np.all(np.abs(2 * sigmoid(post) - 1) < 0.15), t.name
            off = comb[~np.eye(hc, dtype=bool)]
            assert np.diag(comb).min() > off.max() + 1, t.name
        elif t.name == "output_hc_base.weight":
            assert np.all(np.abs(sigmoid(x) - 1 / hc) < 0.05)
        elif t.name.endswith("_scale.weight"):
            assert np.all((x > 0.5) & (x < 1.5)), t.name


def test_tiny_tid2eid_rows_are_distinct_valid_experts(tiny_reader: GGUFReader) -> None:
    tables = {t.name: np.asarray(t.data) for t in tiny_reader.tensors if "tid2eid" in t.name}
    assert sorted(tables) == [f"blk.{L}.ffn_gate_tid2eid.weight" for L in range(3)]
    for name, ids in tables.items():
        assert ids.dtype == np.int32 and ids.shape == (TINY["V"], TINY["NU"]), name
        assert ids.min() >= 0 and ids.max() < TINY["NE"], name
        assert np.all(ids[:, 0] != ids[:, 1]), name
        counts = np.bincount(ids.ravel(), minlength=TINY["NE"])
        assert counts.min() > 0.9 * counts.mean(), name  # every expert used, about evenly
    a, b = tables["blk.0.ffn_gate_tid2eid.weight"], tables["blk.1.ffn_gate_tid2eid.weight"]
    assert np.mean(a != b) > 0.5  # layers get different tables


def test_tiny_activations_stay_finite_and_the_indexer_selects(tiny_gguf: Path) -> None:
    """Run the float64 NumPy reference (tests/npref.py) over 48 tokens of the tiny model:
    the HC state stays O(1), logits are finite with std ~1, and on ratio-4 layers the
    indexer already picks top-8 of 12 compressed rows."""
    import npref

    ref = npref.RefModel(tiny_gguf)
    tokens = np.random.default_rng(0).integers(0, TINY["V"], 48).tolist()
    for tok in tokens:
        x = ref.advance(tok)
        assert np.all(np.isfinite(x)) and 0.3 < rms(x) < 10
    logits = ref.logits(x)
    assert np.all(np.isfinite(logits)) and 0.3 < logits.std() < 3
    for L, r in enumerate(ds4_ratios(6)):
        if r == 4:
            assert len(ref.comp[L]) == 12 and ref.selected[L] is not None and len(ref.selected[L]) == 8


# ---- real dims: the planned table and header, without writing GBs ---------------------------

@pytest.mark.parametrize("n_layer", [1, 4, 43])
def test_real_dims_plan_and_metadata(n_layer: int) -> None:
    p = resolve_preset(f"real-dims-{n_layer}")
    n_hash = min(3, n_layer)
    plan = plan_tensors(p)
    got = {t.name: (list(t.dims), Q(t.ggml_type)) for t in plan}
    assert len(got) == len(plan)
    assert got == ds4_table(dict(REAL), n_layer, n_hash, Q2)
    meta = metadata(p, seed=0)
    for key, (value, vtype) in ds4_metadata(dict(REAL), n_layer, n_hash).items():
        mv = meta[key]
        if isinstance(value, list):
            assert mv.type == V.ARRAY and mv.sub_type == vtype and mv.value == pytest.approx(value)
        elif isinstance(value, float):
            assert mv.type == vtype and mv.value == pytest.approx(value, rel=1e-6), key
        else:
            assert mv.type == vtype and mv.value == value, key
    assert_same_args(ModelArgs.from_metadata({k: v.value for k, v in meta.items()}), p.args)
    if n_layer == 43:  # the full schedule is exactly ds4's model (§1.2, §1.3 tensor count)
        assert ds4_compat_problems(p.args) == []
        assert len(plan) == 1288 + 40  # required tensors + exp_probs_b on the 40 non-hash layers
    if n_layer == 1:
        size = sum(t.nbytes for t in plan)
        assert 3.5e9 < size < 3.7e9  # embedding 1.06 GB + output 0.56 GB + one layer ~1.95 GB


@pytest.mark.slow
def test_real_dims_1_file_parses_and_validates(tmp_path: Path) -> None:
    path = synthesize("real-dims-1", tmp_path / "rd1.gguf")
    try:
        f = GGUFFile(path)
        assert validate_ds4(f) == []
        x = dequantize(f.raw("blk.0.ffn_down_exps.weight")[:2], Q.Q2_K)  # two experts
        assert rms(x) == pytest.approx(1 / math.sqrt(2048), rel=0.1)
        f.close()
    finally:
        path.unlink()  # 3.6 GB: do not leave it in pytest's kept temp dirs


@pytest.mark.slow
def test_tiny_stays_well_conditioned_over_two_thousand_tokens(tiny_gguf: Path) -> None:
    import npref

    ref = npref.RefModel(tiny_gguf)
    for tok in np.random.default_rng(1).integers(0, TINY["V"], 2000).tolist():
        x = ref.advance(tok)
    assert np.all(np.isfinite(x)) and 0.3 < rms(x) < 10
    logits = ref.logits(x)
    assert np.all(np.isfinite(logits)) and 0.3 < logits.std() < 3


# ---- today's expert formats: MXFP4, mixed q2/q4 ----------------------------------------------

def test_expert_formats_per_layer() -> None:
    from workbench.synth import EXPERT_FORMATS

    mx4 = (Q.MXFP4,) * 3
    assert [tuple(map(Q, e)) for e in resolve_preset("tiny-mxfp4").experts] == [mx4] * 6
    assert [tuple(map(Q, e)) for e in resolve_preset("tiny-q2q4").experts] == [Q2] * 5 + [Q4]
    # real dims: ds4f-q2-q4 has Q4_K on layers 37-42; fewer layers keep the last one Q4_K
    assert [tuple(map(Q, e)) for e in resolve_preset("real-dims-43", "q2q4").experts] == [Q2] * 37 + [Q4] * 6
    assert [tuple(map(Q, e)) for e in resolve_preset("real-dims-2", "q2q4").experts] == [Q2, Q4]
    assert [tuple(map(Q, e)) for e in resolve_preset("real-dims-1", "mxfp4").experts] == [mx4]
    assert set(EXPERT_FORMATS) == {"q2", "q4", "mxfp4", "q2q4"}
    with pytest.raises(WorkbenchError, match="expert format 'q3'"):
        resolve_preset("tiny", "q3")
    plan = {t.name: Q(t.ggml_type) for t in plan_tensors(resolve_preset("real-dims-2", "mxfp4"))}
    assert plan["blk.1.ffn_down_exps.weight"] == Q.MXFP4 and plan["blk.1.ffn_down_shexp.weight"] == Q.Q8_0


@pytest.mark.parametrize("preset,experts", [("tiny-mxfp4", None), ("tiny-q2q4", None), ("tiny", "q2q4")])
def test_tiny_expert_presets_validate_and_have_the_intended_scales(tmp_path: Path, preset: str, experts: str | None,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / f"{preset}.gguf"
    argv = ["synth", "--preset", preset, "--out", str(out), "--json"] + (["--experts", experts] if experts else [])
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["experts"] == experts
    f = GGUFFile(out)
    try:
        assert validate_ds4(f) == []
        for L in range(6):
            for part in ("gate", "up", "down"):
                t = f.tensors[f"blk.{L}.ffn_{part}_exps.weight"]
                x = dequantize(f.raw(t.name)[:2], Q(t.ggml_type)).astype(np.float64)  # two experts
                target = 1 / math.sqrt(t.dims[0])
                assert target / 1.5 < rms(x) < target * 1.5 and abs(x.mean()) < 0.05 * rms(x), t.name
        last = Q(f.tensors["blk.5.ffn_gate_exps.weight"].ggml_type)
        assert last == (Q.MXFP4 if preset == "tiny-mxfp4" else Q.Q4_K)
    finally:
        f.close()
